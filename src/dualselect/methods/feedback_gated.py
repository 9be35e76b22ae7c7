"""Feedback-gated alignment-aware fine-tuning ("Alignment-Aware Model Adaptation via Feedback-Guided
Optimization", arXiv 2602.02258, 2026; a digest names the method AWARE).

An external alignment judge scores K responses sampled from the current model for every training prompt; a
per-sample gate moves each sample from the supervised update (aligned samples) towards a policy-gradient
update driven by the judge (misaligned or uncertain samples), and fully misaligned samples are taught to
abstain. Only the paper's abstract was available: what it states is marked [paper], the rest is this
project's reading [ours], and every choice of ours is an option below.

  [paper] an external alignment signal enters through a policy-gradient regulariser;
  [paper] a per-sample adaptive gate balances supervised and alignment-driven gradients (uncertain or
          misaligned samples get more alignment gradient, well-aligned ones plain supervised updates);
  [paper] abstention (a conservative response) is learned for fully misaligned inputs.
  [ours]  per step and prompt x with target y:
          1. sample K responses (k, max_new_tokens, temperature, top_p) through generation.sample_responses;
          2. reward r_k = A(x, y_k) in [0, 1] from an evaluation judge (judge, judge_options): with a refusal
             judge, refusing a harmful prompt and answering a benign one are aligned (1), the opposite is
             misaligned (0); with a harm judge, safe = 1, unsafe = 0 (selection/feedback.alignment_reward).
             Whether x is harmful comes from the data's label column, else from a prompt classifier
             (prompt_labels, label_column; eval/prompt_classifier.py);
          3. gate g = clip((1 - mean r) + gamma * std r, 0, 1), no gradient (fixed_gate overrides it);
          4. L_PG = mean_k (r_k - mean r) * NLL(y_k | x): REINFORCE with the group-mean baseline, NLL the
             mean token negative log-likelihood of the sampled tokens (minimising it raises the mean token
             log-prob of the better-scored responses);
          5. abstention: if max r < tau_abs and the target y itself is judged misaligned, y is replaced by a
             conservative response (abstain_response: a template, or a refusal from data.reference);
          6. per-sample loss (1 - g) * L_SFT(x, y) + lam * g * L_PG(x), batch mean, one optimiser step.
  [ours]  an abstained sample's supervised term has weight abstain_weight (1), not (1 - g): when no
          response is aligned, r is all 0 and g = 1, so (1 - g) would erase the conservative target
          (with binary rewards and tau_abs <= 1 abstention implies g = 1).
Defaults [ours]: K 4, max_new_tokens 24 (short: a refusal shows in its opening, and it keeps a CPU step
cheap), temperature 1, top_p 1 (top_k off: plain ancestral sampling), lam 1, gamma 0.5, tau_abs 0.5.
With every gate 0 and abstention off this is exactly SFT (and no sampling is done).

Sampling draws from its own RNG stream (seeded from train.seed; saved in the checkpoint), so a resumed run
samples what an uninterrupted one would. The step's rewards, gates, abstentions and sampled responses go to
the selection log; the prompt label of every task example and where it came from to prompt_labels.jsonl.
Budget: trained_samples counts the samples that carry a loss term; trained_tokens the supervised target
tokens; pg_samples / pg_tokens the sampled responses that enter the policy-gradient term.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..config import FieldError, _opt
from ..data.formatting import IGNORE_INDEX, Encoded
from ..data.records import Example
from ..eval.judges import get_judge
from ..eval.prompt_classifier import LexiconPromptClassifier, PromptLabel, column_label
from ..eval.run import judge_many
from ..generation import sample_responses
from ..grads import batch_losses
from ..logs import write_jsonl
from ..schedule import PlannedStep, batch_plan
from ..selection.feedback import advantages, alignment_reward, gate, should_abstain
from . import register
from .context import TrainContext


@dataclass
class FeedbackGatedConfig:
    k: int = _opt(4, "[ours] responses sampled per training prompt and step")
    max_new_tokens: int = _opt(24, "[ours] length limit of a sampled response")
    temperature: float = _opt(1.0, "[ours] sampling temperature")
    top_p: float = _opt(1.0, "[ours] nucleus sampling mass (1: plain ancestral sampling)")
    lam: float = _opt(1.0, "[ours] lambda, weight of the policy-gradient term")
    gamma: float = _opt(0.5, "[ours] gate = clip((1 - mean r) + gamma * std r, 0, 1)")
    tau_abs: float = _opt(0.5, "[ours] abstain when max r < tau_abs and the target is judged misaligned")
    judge: str = _opt("keyword", "[ours] the alignment judge: an eval judge (keyword, classifier or llm); refusal "
                                 "judges reward refusing harmful and answering benign prompts, harm judges safe answers")
    judge_options: dict[str, Any] = _opt({}, "[ours] options of the judge (as eval.judge_options)")
    prompt_labels: Literal["auto", "column", "classifier"] = _opt(
        "auto", "[ours] whether a prompt is harmful: auto = the label column where a record has it, else the "
                "prompt classifier (prompt-lexicon-v1); column = every record must have it; classifier = always "
                "the classifier")
    label_column: str = _opt("harmful", "[ours] the record field with the prompt label (true/false, 1/0, "
                                        "harmful/benign, unsafe/safe)")
    abstain: bool = _opt(True, "[paper] the abstention branch (false: never replace a target)")
    abstain_response: Literal["template", "reference"] = _opt(
        "template", "[ours] the conservative response: template = abstain_template; reference = a refusal drawn "
                    "(seeded per sample) from data.reference's responses")
    abstain_template: str = _opt("I'm sorry, but I can't help with that.", "[ours] the template refusal")
    abstain_weight: float = _opt(1.0, "[ours] weight of the supervised term on a conservative target (the "
                                      "gate's 1 - g would be 0 there)")
    fixed_gate: float | None = _opt(None, "[ours] ablation: every gate is this value instead of the formula "
                                          "(0 with abstain=false: plain SFT)")

    def __post_init__(self):
        for name, low in (("k", 1), ("max_new_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise FieldError(name, f"must be an integer >= {low}, got {v!r}")
        for name in ("temperature", "lam", "gamma", "abstain_weight"):
            v = getattr(self, name)
            strict = name == "temperature"
            if not (v > 0 if strict else v >= 0) or v == float("inf"):
                raise FieldError(name, f"must be a finite number {'>' if strict else '>='} 0, got {v!r}")
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.tau_abs <= 1:
            raise FieldError("tau_abs", f"must be in [0, 1], got {self.tau_abs!r}")
        if self.fixed_gate is not None and not 0 <= self.fixed_gate <= 1:
            raise FieldError("fixed_gate", f"must be in [0, 1] or null, got {self.fixed_gate!r}")
        if not self.label_column:
            raise FieldError("label_column", "must not be empty")
        if not self.abstain_template.strip():
            raise FieldError("abstain_template", "must not be empty")


def prompt_labels(examples: list[Example], mode: str, column: str) -> list[PromptLabel]:
    """Whether each example's prompt is harmful: from its `column` field (mode auto/column) or the classifier."""
    clf = LexiconPromptClassifier()
    out = []
    for ex in examples:
        if mode != "classifier" and column in ex.meta:
            try:
                out.append(column_label(ex.meta[column]))
            except ValueError as e:
                raise ValueError(f"record '{ex.id}': field '{column}': {e}") from None
        elif mode == "column":
            raise ValueError(f"record '{ex.id}' has no '{column}' field (feedback-gated.prompt_labels=column needs "
                             "it on every record; auto falls back to the prompt classifier)")
        else:
            out.append(clf.classify(ex.prompt))
    return out


def with_response(ex: Example, response: str) -> Example:
    """The example with its final assistant message replaced by `response`."""
    return Example(ex.id, [*ex.messages[:-1], {"role": "assistant", "content": response}], ex.meta)


@register("feedback-gated", summary="per-sample gate between SFT and a judge-driven policy-gradient term on sampled "
                                    "responses; fully misaligned samples learn to abstain",
          paper='"Alignment-Aware Model Adaptation via Feedback-Guided Optimization", arXiv 2602.02258 (2026); '
                "our reading of its abstract", needs="task")
class FeedbackGated:
    Config = FeedbackGatedConfig

    def __init__(self, cfg: FeedbackGatedConfig, ctx: TrainContext):
        if ctx.tokenizer is None or ctx.task_examples is None or ctx.encode is None:
            raise ValueError("feedback-gated needs the tokenizer, the task examples and the encoder in its context "
                             "(run it through dualselect train)")
        if cfg.abstain and cfg.abstain_response == "reference" and not ctx.reference_examples:
            raise ValueError("abstain_response=reference needs data.reference (refusals to draw from)")
        self.cfg, self.ctx = cfg, ctx
        self.labels = prompt_labels(ctx.task_examples, cfg.prompt_labels, cfg.label_column)
        self.judge = get_judge(cfg.judge, **cfg.judge_options)
        self.target_rewards: dict[int, float] = {}  # task index -> reward of its own target (a pure function)
        with torch.random.fork_rng(devices=[]):  # the sampling stream, apart from dropout's and the loop's
            torch.manual_seed(ctx.seed + 7919)
            self.rng_state = torch.get_rng_state()
        self.cuda_rng_state = None

    def plan(self) -> list[PlannedStep]:
        c = self.ctx
        if c.run_dir is not None:
            write_jsonl(c.run_dir / "prompt_labels.jsonl",
                        [{"id": ex.id, "harmful": lab.harmful, "source": lab.source, "score": lab.score,
                          "matched": list(lab.matched)} for ex, lab in zip(c.task_examples, self.labels)])
        return batch_plan(len(c.task), c.batch_size, c.epochs, c.seed)

    def on_epoch_start(self, epoch: int) -> None:
        pass

    # -- pieces -------------------------------------------------------------------------------------
    def _sample(self, examples: list[Example]):
        """K sampled responses per example, from the method's own RNG stream."""
        c, cfg = self.ctx, self.cfg
        cuda = c.device.type == "cuda"
        with torch.random.fork_rng(devices=[c.device] if cuda else []):
            torch.set_rng_state(self.rng_state)
            if cuda and self.cuda_rng_state is not None:
                torch.cuda.set_rng_state(self.cuda_rng_state, c.device)
            groups = sample_responses(c.model, c.tokenizer, [ex.messages for ex in examples], k=cfg.k,
                                      template=c.template, max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, top_p=cfg.top_p, batch_size=len(examples),
                                      device=c.device, autocast=c.autocast)
            self.rng_state = torch.get_rng_state()
            if cuda:
                self.cuda_rng_state = torch.cuda.get_rng_state(c.device)
        return groups

    def _rewards(self, examples, harmful, groups) -> list[list[float]]:
        prompts = [ex.prompt for ex, g in zip(examples, groups) for _ in g]
        verdicts = judge_many(self.judge, prompts, [s.text for g in groups for s in g],
                              [s.truncated for g in groups for s in g])
        flat = [alignment_reward(v, h) for v, h in zip(verdicts, [h for h, g in zip(harmful, groups) for _ in g])]
        k = self.cfg.k
        return [flat[i * k:(i + 1) * k] for i in range(len(groups))]

    def _target_reward(self, i: int) -> float:
        if i not in self.target_rewards:
            ex = self.ctx.task_examples[i]
            v = judge_many(self.judge, [ex.prompt], [ex.response], [False])[0]
            self.target_rewards[i] = alignment_reward(v, self.labels[i].harmful)
        return self.target_rewards[i]

    def conservative(self, i: int) -> Encoded:
        """The task example i with its target replaced by a conservative response."""
        c, cfg = self.ctx, self.cfg
        ex = c.task_examples[i]
        if cfg.abstain_response == "reference":
            refs = c.reference_examples
            text = refs[random.Random(f"feedback-gated-abstain-{c.seed}-{ex.id}").randrange(len(refs))].response
        else:
            text = cfg.abstain_template
        return c.encode(with_response(ex, text))

    # -- one step -------------------------------------------------------------------------------------
    def step(self, planned: PlannedStep) -> dict:
        cfg, c = self.cfg, self.ctx
        ids = list(planned.ids)
        examples = [c.task_examples[i] for i in ids]
        harmful = [self.labels[i].harmful for i in ids]
        b = len(ids)
        t0 = time.time()
        needs_feedback = cfg.abstain or cfg.fixed_gate != 0
        groups = self._sample(examples) if needs_feedback else [[] for _ in ids]
        t_sample = time.time() - t0
        rewards = self._rewards(examples, harmful, groups) if needs_feedback else [[1.0] * cfg.k for _ in ids]
        gates = [gate(r, cfg.gamma) if cfg.fixed_gate is None else float(cfg.fixed_gate) for r in rewards]
        abstained = [cfg.abstain and should_abstain(r, self._target_reward(i), cfg.tau_abs)
                     for i, r in zip(ids, rewards)]

        # supervised term: weight (1 - g), or abstain_weight on a conservative target
        sft_w = [cfg.abstain_weight if a else 1.0 - g for a, g in zip(abstained, gates)]
        sft_rows = [j for j in range(b) if sft_w[j] > 0]
        targets = [self.conservative(ids[j]) if abstained[j] else c.task[ids[j]] for j in sft_rows]
        total = torch.zeros((), device=c.device)
        sft_loss = None
        sft_tokens = 0
        if sft_rows:
            losses, tokens = batch_losses(c.model, targets, c.pad_id, c.device, c.autocast)
            w = torch.tensor([sft_w[j] for j in sft_rows], dtype=losses.dtype, device=losses.device)
            total = total + (w * losses).sum()
            sft_loss = float(losses.detach().mean())
            sft_tokens = int(tokens.sum())

        # policy-gradient term: only samples with a gate > 0 and not all rewards equal (else it is 0)
        pg_seqs, pg_coef, pg_rows = [], [], set()
        for j in range(b):
            adv = advantages(rewards[j])  # without feedback every r is 1: all 0
            if gates[j] <= 0 or not any(adv):
                continue
            pg_rows.add(j)
            for s, a in zip(groups[j], adv):
                if a:
                    pg_seqs.append(Encoded(f"{ids[j]}-pg", s.prompt_ids + s.ids,
                                           [IGNORE_INDEX] * len(s.prompt_ids) + s.ids))
                    pg_coef.append(cfg.lam * gates[j] * a / cfg.k)
        pg_loss = None
        pg_tokens = 0
        if pg_seqs:
            nll, tokens = batch_losses(c.model, pg_seqs, c.pad_id, c.device, c.autocast)
            coef = torch.tensor(pg_coef, dtype=nll.dtype, device=nll.device)
            pg = (coef * nll).sum()
            total = total + pg
            pg_loss = float(pg.detach()) / b
            pg_tokens = int(tokens.sum())
        loss = total / b
        if loss.requires_grad:
            loss.backward()

        if c.selection_log:
            c.selection_log.write({
                "kind": "step", "step": planned.index, "epoch": planned.epoch,
                "ids": [c.task[i].id for i in ids], "harmful": harmful, "rewards": rewards, "gates": gates,
                "abstained": [c.task[i].id for i, a in zip(ids, abstained) if a],
                "target_rewards": [self.target_rewards.get(i) for i in ids],
                "responses": [[s.text for s in g] for g in groups]})
        return {"loss": float(loss.detach()), "tokens": sft_tokens, "n_samples": b,
                "trained_samples": len(set(sft_rows) | pg_rows),
                "trained_tokens": sft_tokens, "sft_loss": sft_loss, "pg_loss": pg_loss,
                "pg_samples": len(pg_seqs), "pg_tokens": pg_tokens,
                "gate_mean": sum(gates) / b, "reward_mean": sum(map(sum, rewards)) / (b * cfg.k),
                "abstained": sum(abstained), "sample_s": round(t_sample, 3)}

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"rng_state": self.rng_state, "cuda_rng_state": self.cuda_rng_state}

    def load_state_dict(self, state: dict) -> None:
        self.rng_state = state["rng_state"]
        self.cuda_rng_state = state["cuda_rng_state"]
