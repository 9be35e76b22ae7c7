"""SafeInstr (Bianchi et al., "Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language
Models that Follow Instructions", ICLR 2024, arXiv 2309.07875): fixed safety examples (harmful request ->
safe answer, from data.reference) are mixed into the task data, then plain SFT on the mixture.

Paper vs ours:

  ==============  ==========================================  ===========================================
  what            paper                                       ours
  ==============  ==========================================  ===========================================
  safety data     their 2,483 safety instructions             data.reference (e.g. safety_tuned_llamas,
                  (safety_tuned_llamas)                       the same file, or any refusal pool)
  how many        100 - 2,000 added to 20,000 Alpaca rows     `count`, or `ratio` x the task set size
                  (0.5 - 10 %); about 3 % already helps       (default 0.03), rounded half up, >= 1
  which           a random sample of the safety data          a seeded random sample (`pick: random`,
                                                              seed train.seed) or the first N (`first`)
  training        full fine-tuning on the shuffled mixture    LoRA SFT on the shuffled mixture
  ==============  ==========================================  ===========================================

Budget: the mixture has more samples than the task set, so an epoch has more optimiser steps than SFT's
(the paper's design: the safety examples are added, not substituted). trained_samples / trained_tokens count
the task samples of each step; the safety samples are in safety_samples / safety_tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from ..grads import batch_losses
from ..schedule import PlannedStep, batch_plan
from . import register
from .context import TrainContext


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


def safety_count(n_task: int, n_pool: int, ratio: float, count: int | None) -> int:
    """How many safety examples join the task set: `count`, else round-half-up(ratio * n_task), at least 1;
    never more than the pool holds (a larger request is an error, not a silent cap)."""
    m = count if count is not None else max(1, int(ratio * n_task + 0.5))
    if m > n_pool:
        raise ValueError(f"safeinstr wants {m} safety examples but data.reference holds {n_pool}")
    return m


def pick_safety(n_pool: int, m: int, pick: str, seed: int) -> list[int]:
    """Positions in the reference pool of the m safety examples (ascending)."""
    if pick == "first":
        return list(range(m))
    return sorted(random.Random(f"safeinstr-{seed}").sample(range(n_pool), m))


@dataclass
class SafeInstrConfig:
    ratio: float = _opt(0.03, "safety examples as a fraction of the task set size (paper: about 3 % helps; "
                              "ignored when count is set)")
    count: int | None = _opt(None, "exact number of safety examples to mix in (overrides ratio)")
    pick: Literal["random", "first"] = _opt("random", "which safety examples: a seeded random sample of "
                                                      "data.reference, or its first N")

    def __post_init__(self):
        if not (0 < self.ratio <= 10):
            raise ValueError(f"ratio must be in (0, 10], got {self.ratio}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"count must be >= 1 (or null for ratio), got {self.count}")


@register("safeinstr", summary="mix a fixed set of safety examples from the reference pool into the task data, "
                               "then plain SFT on the mixture",
          paper='Bianchi et al., "Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models '
                'that Follow Instructions", ICLR 2024 (arXiv 2309.07875)', needs="task+reference")
class SafeInstr:
    Config = SafeInstrConfig

    def __init__(self, cfg: SafeInstrConfig, ctx: TrainContext):
        if not ctx.reference:
            raise ValueError("safeinstr needs safety examples to mix in: set data.reference")
        self.cfg, self.ctx = cfg, ctx
        m = safety_count(len(ctx.task), len(ctx.reference), cfg.ratio, cfg.count)
        self.safety = pick_safety(len(ctx.reference), m, cfg.pick, ctx.seed)
        # the mixture: task positions 0..n-1, then the chosen safety examples
        self.mixture = list(ctx.task) + [ctx.reference[i] for i in self.safety]

    def plan(self) -> list[PlannedStep]:
        c = self.ctx
        return batch_plan(len(self.mixture), c.batch_size, c.epochs, c.seed)

    def on_epoch_start(self, epoch: int) -> None:
        c = self.ctx
        if epoch == 1 and c.selection_log:
            c.selection_log.write({"kind": "mixture", "n_task": len(c.task), "n_safety": len(self.safety),
                                   "safety_index": self.safety, "safety_ids": [c.reference[i].id for i in self.safety]})

    def sample_ids(self, planned: PlannedStep) -> list[str]:
        """Ids of the step's samples (positions in the task + safety mixture), for the training loop's messages."""
        return [self.mixture[i].id for i in planned.ids]

    def step(self, planned: PlannedStep) -> dict:
        c = self.ctx
        batch = [self.mixture[i] for i in planned.ids]
        losses, tokens = batch_losses(c.model, batch, c.pad_id, c.device, c.autocast)
        loss = losses.mean()
        loss.backward()
        is_task = [i < len(c.task) for i in planned.ids]
        task_tok = sum(int(t) for t, keep in zip(tokens, is_task) if keep)
        return {"loss": loss.item(), "tokens": int(tokens.sum()), "n_samples": len(batch),
                "trained_samples": sum(is_task), "trained_tokens": task_tok,
                "safety_samples": len(batch) - sum(is_task), "safety_tokens": int(tokens.sum()) - task_tok}

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"safety": self.safety}

    def load_state_dict(self, state: dict) -> None:
        if state["safety"] != self.safety:
            raise ValueError("safeinstr: the checkpoint mixed in other safety examples (data.reference changed?)")
