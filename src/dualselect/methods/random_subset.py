"""Random selection: the control every selection method must beat. Each mini-batch keeps a seeded random
subset of the size DualSelect keeps (k_task samples, or the same token budget rule), then a plain SFT step
on it; with the same warm-up of full batches DualSelect has, the two see the same batches and train on the
same number of samples.

No paper of its own: "random selection" is the baseline of the DualSelect paper and of SEAL / TOSS. Ours:
the subset of step t is drawn from random.Random(f"random-{seed}-{t}"), a pure function of the run's seed and
the step, so a resumed run draws the same subsets; the draw is a random order of the batch, cut after k_task
samples or, with `budget`, after the kept supervised tokens reach that fraction of the batch's (DualSelect's
budget rule with random scores: selection.select_task)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..schedule import PlannedStep, batch_plan, warmup_within
from ..selection.dualselect import select_task
from . import register
from .sft import supervised_step
from .context import TrainContext


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


def random_subset(n: int, k: int, seed: int, step: int, tokens: list[int] | None = None,
                  budget: float | None = None) -> list[int]:
    """Positions (in batch order) of the random subset that step `step` keeps out of a batch of `n`."""
    rng = random.Random(f"random-{seed}-{step}")
    scores = torch.tensor([rng.random() for _ in range(n)], dtype=torch.float64)
    sel = select_task(scores, k, "hard", tokens=tokens, budget=budget)
    return sorted(sel.index)


@dataclass
class RandomConfig:
    k_task: int = _opt(4, "samples kept per mini-batch, drawn at random (0: all; DualSelect's default 4)")
    budget: float | None = _opt(None, "instead of k_task: keep random samples until they hold this fraction of the "
                                      "batch's response tokens (DualSelect's budget rule), e.g. 0.9")
    warmup_steps: int = _opt(10, "full-batch steps first, as DualSelect's warm-up (its default 10), so both train "
                                 "on the same batches and sample counts")
    warmup_in_budget: bool = _opt(False, "as dualselect.warmup_in_budget: true makes the warm-up the first batches of "
                                         "sft's plan instead of extra steps")

    def __post_init__(self):
        if self.k_task < 0:
            raise ValueError(f"k_task must be >= 0 (0 keeps every sample), got {self.k_task}")
        if self.budget is not None and not (0 < self.budget <= 1):
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@register("random", summary="keep a seeded random subset of each mini-batch, as many samples (or tokens) as "
                            "DualSelect keeps, then an SFT step on it",
          paper="- (the random-selection baseline of DualSelect, SEAL and TOSS)", needs="task")
class RandomSubset:
    Config = RandomConfig

    def __init__(self, cfg: RandomConfig, ctx: TrainContext):
        self.cfg, self.ctx = cfg, ctx

    def plan(self) -> list[PlannedStep]:
        c = self.ctx
        if self.cfg.warmup_in_budget:
            return warmup_within(batch_plan(len(c.task), c.batch_size, c.epochs, c.seed), self.cfg.warmup_steps)
        return batch_plan(len(c.task), c.batch_size, c.epochs, c.seed, warmup_steps=self.cfg.warmup_steps)

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def step(self, planned: PlannedStep) -> dict:
        cfg, c = self.cfg, self.ctx
        batch = [c.task[i] for i in planned.ids]
        if planned.phase == "warmup":
            keep = list(range(len(batch)))
        else:
            keep = random_subset(len(batch), cfg.k_task, c.seed, planned.index,
                                 tokens=[e.n_supervised for e in batch], budget=cfg.budget)
        kept = [batch[i] for i in keep]
        metrics = supervised_step(c, kept)
        if c.selection_log and planned.phase != "warmup":
            c.selection_log.write({"kind": "step", "step": planned.index, "epoch": planned.epoch,
                                   "ids": [e.id for e in kept], "index": [planned.ids[i] for i in keep],
                                   "candidates": {"ids": [e.id for e in batch]}})
        return {**metrics, "tokens": sum(e.n_supervised for e in batch), "n_samples": len(batch), "kept": len(kept)}

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
