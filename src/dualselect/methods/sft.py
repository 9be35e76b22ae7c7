"""Plain LoRA supervised fine-tuning: the baseline every method is compared with.

The loss of a batch is the mean over its samples of each sample's mean response-token NLL (the same
quantity DualSelect's warm-up and selection use), computed in one padded forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grads import batch_losses, flatten, set_grads
from ..schedule import PlannedStep, batch_plan
from ..selection.dtypes import wide_dtype
from . import register
from .context import TrainContext


def supervised_step(ctx: TrainContext, batch) -> dict:
    """One SFT update on `batch` (Encoded samples): backward of the mean over samples of each sample's mean
    response NLL, into .grad; returns the step's metrics (every sample and token is trained on). Shared by the
    methods whose training stage is plain SFT on a selected set (dsir, seal, random)."""
    if ctx.comm.world_size > 1:
        return _shared_supervised_step(ctx, batch)
    losses, tokens = batch_losses(ctx.model, batch, ctx.pad_id, ctx.device, ctx.autocast)
    loss = losses.mean()
    loss.backward()
    n_tok = int(tokens.sum())
    return {"loss": loss.item(), "tokens": n_tok, "n_samples": len(batch), "trained_samples": len(batch),
            "trained_tokens": n_tok}


def _shared_supervised_step(ctx: TrainContext, batch) -> dict:
    """supervised_step with the batch shared among several processes (distributed.py): each backpropagates the
    sum of its own samples' losses divided by the whole batch's size, so the sum over processes of their
    gradients (summed here; the same on every process) is the gradient of the whole batch's mean loss."""
    start, end = ctx.comm.share(len(batch))
    wide = wide_dtype(ctx.device)
    stats = torch.zeros(2, dtype=wide, device=ctx.device)  # this share's loss sum and supervised tokens
    if end > start:  # a batch smaller than the number of processes leaves some without samples
        losses, tokens = batch_losses(ctx.model, batch[start:end], ctx.pad_id, ctx.device, ctx.autocast)
        (losses.sum() / len(batch)).backward()
        stats = torch.stack([losses.detach().sum().to(wide), tokens.sum().to(wide)])
    set_grads(ctx.params, ctx.comm.sum(flatten([p.grad for p in ctx.params], ctx.params)))
    loss_sum, n_tok = ctx.comm.sum(stats).tolist()
    n_tok = int(n_tok)
    return {"loss": loss_sum / len(batch), "tokens": n_tok, "n_samples": len(batch), "trained_samples": len(batch),
            "trained_tokens": n_tok}


@dataclass
class SFTConfig:
    """Plain SFT has no options of its own (see the train section)."""


@register("sft", summary="plain LoRA supervised fine-tuning on every task sample (the baseline)",
          paper="-", needs="task")
class SFT:
    Config = SFTConfig

    def __init__(self, cfg: SFTConfig, ctx: TrainContext):
        self.cfg, self.ctx = cfg, ctx

    def plan(self) -> list[PlannedStep]:
        c = self.ctx
        return batch_plan(len(c.task), c.batch_size, c.epochs, c.seed)

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def step(self, planned: PlannedStep) -> dict:
        return supervised_step(self.ctx, [self.ctx.task[i] for i in planned.ids])

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
