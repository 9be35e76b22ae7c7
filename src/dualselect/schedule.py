"""Which task samples each optimiser step sees: a pure function of (n, batch size, epochs, seed)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class PlannedStep:
    index: int  # global step number, from 0
    phase: str  # "warmup" or "train"
    epoch: int  # 0 for warm-up, 1.. for epochs
    ids: tuple[int, ...]  # positions in the task list
    first_of_epoch: bool
    last_of_epoch: bool


def _batches(order: list[int], batch_size: int) -> list[tuple[int, ...]]:
    return [tuple(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def plan_of(raw: list[tuple[str, int, tuple[int, ...]]]) -> list[PlannedStep]:
    """Numbered steps from (phase, epoch, ids) rows, with first_of_epoch / last_of_epoch set where the epoch
    changes."""
    plan = []
    for i, (phase, epoch, ids) in enumerate(raw):
        first = i == 0 or raw[i - 1][1] != epoch
        last = i == len(raw) - 1 or raw[i + 1][1] != epoch
        plan.append(PlannedStep(i, phase, epoch, ids, first, last))
    return plan


def batch_plan(n: int, batch_size: int, epochs: int, seed: int, warmup_steps: int = 0) -> list[PlannedStep]:
    """The authors' release order: one `random.Random(seed)`; each shuffle starts from range(n).

    Warm-up (if any) shuffles once and cycles its batches without reshuffling; then every epoch
    shuffles once. The last batch of a pass may be smaller."""
    if n < 1:
        raise ValueError("no task samples to train on")
    rng = random.Random(seed)
    raw: list[tuple[str, int, tuple[int, ...]]] = []
    if warmup_steps > 0:
        order = list(range(n))
        rng.shuffle(order)
        batches = _batches(order, batch_size)
        raw += [("warmup", 0, batches[i % len(batches)]) for i in range(warmup_steps)]
    for epoch in range(1, epochs + 1):
        order = list(range(n))
        rng.shuffle(order)
        raw += [("train", epoch, b) for b in _batches(order, batch_size)]
    return plan_of(raw)


def warmup_within(plan: list[PlannedStep], warmup_steps: int) -> list[PlannedStep]:
    """The same steps (ids, order, count) as `plan` (a plan without warm-up), with its first `warmup_steps`
    steps relabelled as the warm-up (phase "warmup", epoch 0): the warm-up counts toward the step budget.
    first_of_epoch / last_of_epoch are recomputed, so epoch 1 now starts after the warm-up."""
    if not 0 <= warmup_steps < len(plan):
        raise ValueError(f"warm-up steps within the budget must be fewer than the {len(plan)} planned steps, "
                         f"got {warmup_steps}")
    raw = [("warmup", 0, s.ids) if i < warmup_steps else (s.phase, s.epoch, s.ids) for i, s in enumerate(plan)]
    return plan_of(raw)
