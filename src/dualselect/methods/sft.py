"""Plain LoRA supervised fine-tuning: the baseline every method is compared with.

The loss of a batch is the mean over its samples of each sample's mean response-token NLL (the same
quantity DualSelect's warm-up and selection use), computed in one padded forward pass."""

from __future__ import annotations

from dataclasses import dataclass

from ..grads import batch_losses
from ..schedule import PlannedStep, batch_plan
from . import register
from .context import TrainContext


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
        c = self.ctx
        losses, tokens = batch_losses(c.model, [c.task[i] for i in planned.ids], c.pad_id, c.device, c.autocast)
        loss = losses.mean()
        loss.backward()
        n_tok = int(tokens.sum())
        return {"loss": loss.item(), "tokens": n_tok, "n_samples": len(planned.ids),
                "trained_samples": len(planned.ids), "trained_tokens": n_tok}

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
