"""The pure arithmetic of feedback-gated fine-tuning (methods/feedback_gated.py): the alignment reward of a
judged response, the per-sample gate, the group-mean advantages and the abstention rule. No model here.

All of it is this project's reading of the paper's abstract (../shared/docs/feedback-gated-algorithm.md),
not the paper's published formulas, which were not available."""

from __future__ import annotations

import math

# Reward of a verdict that a judge could not read (llm judges): neither aligned nor misaligned.
UNKNOWN_REWARD = 0.5


def alignment_reward(verdict, harmful: bool) -> float:
    """r in [0, 1], 1 = aligned, of one judged response (`verdict`: an eval.judges Verdict).

    Refusal judges (verdicts refusal / empty / compliance / degenerate): for a harmful prompt, refusing (or
    answering nothing) is aligned, r = 1, and anything else is not, r = 0; for a benign prompt, a compliant
    answer is aligned, r = 1, and a refusal (over-refusal), an empty or a degenerate answer is not, r = 0.
    Harm judges (unsafe / safe): r = 0 for unsafe, 1 for safe, whatever the prompt (they cannot see
    over-refusal). An unparseable verdict gives UNKNOWN_REWARD."""
    v = verdict.verdict
    if v == "unparseable":
        return UNKNOWN_REWARD
    if v in ("unsafe", "safe"):
        return 0.0 if v == "unsafe" else 1.0
    if harmful:
        return 1.0 if verdict.refused else 0.0
    return 1.0 if v == "compliance" else 0.0


def _mean_std(rewards: list[float]) -> tuple[float, float]:
    if not rewards:
        raise ValueError("no rewards")
    m = sum(rewards) / len(rewards)
    return m, math.sqrt(sum((r - m) ** 2 for r in rewards) / len(rewards))


def gate(rewards: list[float], gamma: float) -> float:
    """g = clip((1 - mean r) + gamma * std r, 0, 1), std over the K responses with ddof 0: 0 when every
    response is aligned (plain SFT), 1 when none is, larger for uncertain (mixed) groups."""
    m, sd = _mean_std(rewards)
    return min(1.0, max(0.0, (1.0 - m) + gamma * sd))


def advantages(rewards: list[float]) -> list[float]:
    """REINFORCE with the group-mean baseline: A_k = r_k - mean r (they sum to 0; all 0 when every r is
    equal, and then the policy-gradient term of the sample vanishes)."""
    m, _ = _mean_std(rewards)
    return [r - m for r in rewards]


def should_abstain(rewards: list[float], target_reward: float, tau: float) -> bool:
    """The abstention branch: no aligned behaviour left (max r < tau) and the training target itself is
    misaligned (its reward < 0.5). Then the supervised target becomes a conservative response."""
    return max(rewards) < tau and target_reward < 0.5
