"""Lisa: Lazy Safety Alignment (Huang, Hu, Ilhan, Tekin, Liu, "Lisa: Lazy Safety Alignment for Large
Language Models against Harmful Fine-tuning Attack", NeurIPS 2024, arXiv 2405.18641).

Bi-state optimisation: the run alternates between an alignment state (steps on batches of the
alignment data, data.reference: harmful prompt -> refusal, benign -> helpful) and a fine-tuning state
(steps on the task batches). In both states the loss gets a proximal term rho/2 * ||theta - anchor||^2
whose anchor is the adapter at the latest state switch, i.e. the last iterate of the other state;
it limits the "excess drift" of each state towards its own optimum.

Defaults, paper / authors' release vs ours:

  ==========================  ===============================  =========================================
  option                      paper / release                  ours
  ==========================  ===============================  =========================================
  align_steps / task_steps    100 / 900 (1:9, release script)  10 / 90: the same 1:9 split in blocks 10x
                                                               shorter, so that our short runs (hundreds
                                                               of steps, not ~20k) still alternate
  rho                         1 (release script)               1
  first state                 alignment                        alignment
  proximal term from          step 0.1 * total (the release    step 0 (the release's comment ties the
                              skips the first 10% of steps)    delay to GSM8K convergence; we keep the
                                                               plain rule, no delay option)
  task step budget            total steps fixed; alignment     the task steps are exactly plain SFT's
                              steps replace task batches       (train.epochs passes, batch_plan order);
                                                               alignment steps are extra optimiser steps
  ==========================  ===============================  =========================================

Our reading where the paper is not precise:

- The anchor of the first state is the initial adapter (the release initialises both checkpoints to
  it). At every switch the anchor becomes the adapter as it is at that moment, before the first step
  of the new state. With align_steps=0 there is never a switch: every step is a task step pulled
  towards the initial adapter (with rho=0 as well, this is plain SFT).
- The gradient is that of (mean over the batch of each sample's mean response-token NLL + the
  proximal term): the data part by backward(), rho * (theta - anchor) added to .grad. The loop then
  clips the sum and applies AdamW (the release also runs both states through one AdamW).
- The plan ends with the last task batch (no trailing alignment block). An alignment step carries the
  epoch of the task step after it. Its samples are reported as align_samples / align_tokens;
  trained_samples / trained_tokens count task data only (0 on alignment steps), so run_info's budget
  shows the same task budget as SFT, and steps_by_phase counts "align" and "train" apart.
- Alignment batches (ctx.batch_size each) cycle through the alignment data, one seeded shuffle per
  pass (see selection/lisa.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import FieldError
from ..grads import batch_losses
from ..schedule import PlannedStep, batch_plan
from ..selection.lisa import bistate_plan
from . import register
from .context import TrainContext


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class LisaConfig:
    align_steps: int = _opt(10, "optimiser steps per alignment state, on data.reference batches (paper: 100; "
                                "0: no alignment steps)")
    task_steps: int = _opt(90, "optimiser steps per fine-tuning state, on task batches (paper: 900)")
    rho: float = _opt(1.0, "proximal strength: each state adds rho/2 * ||theta - anchor||^2, anchor = the adapter "
                           "at the latest state switch (paper: 1; 0: plain bi-state optimisation)")

    def __post_init__(self):
        if self.align_steps < 0:
            raise FieldError("align_steps", f"must be >= 0, got {self.align_steps!r}")
        if self.task_steps < 1:
            raise FieldError("task_steps", f"must be >= 1, got {self.task_steps!r}")
        if not 0 <= self.rho < float("inf"):  # also rejects NaN
            raise FieldError("rho", f"must be a finite number >= 0, got {self.rho!r}")


@register("lisa", summary="bi-state optimisation: alternate alignment-data and task steps, each pulled towards "
                          "the adapter at the last state switch by a proximal term",
          paper='Huang et al., "Lisa: Lazy Safety Alignment for Large Language Models against Harmful '
                'Fine-tuning Attack", NeurIPS 2024 (arXiv 2405.18641)', needs="task+alignment")
class Lisa:
    Config = LisaConfig

    def __init__(self, cfg: LisaConfig, ctx: TrainContext):
        if not ctx.reference:
            raise ValueError("lisa needs alignment data (harmful prompt -> refusal, benign -> helpful): "
                             "set data.reference")
        self.cfg, self.ctx = cfg, ctx
        self.anchor = self._weights()  # the initial adapter, until the first switch
        self.state: str | None = None  # phase of the last step taken (None before the first)
        self.switches = 0

    def _weights(self) -> list[torch.Tensor]:
        return [p.detach().float().clone() for p in self.ctx.params]

    def plan(self) -> list[PlannedStep]:
        c, cfg = self.ctx, self.cfg
        task_plan = batch_plan(len(c.task), c.batch_size, c.epochs, c.seed)
        return bistate_plan(task_plan, len(c.reference), c.batch_size, cfg.align_steps, cfg.task_steps, c.seed)

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def sample_ids(self, planned: PlannedStep) -> list[str]:
        """Ids of the step's samples (alignment steps draw on data.reference), for the training loop's messages."""
        data = self.ctx.reference if planned.phase == "align" else self.ctx.task
        return [data[i].id for i in planned.ids]

    def step(self, planned: PlannedStep) -> dict:
        cfg, c = self.cfg, self.ctx
        switched = self.state is not None and planned.phase != self.state
        if switched:  # the other state's last iterate becomes the anchor of this state
            self.anchor = self._weights()
            self.switches += 1
        self.state = planned.phase

        data = c.reference if planned.phase == "align" else c.task
        losses, tokens = batch_losses(c.model, [data[i] for i in planned.ids], c.pad_id, c.device, c.autocast)
        loss = losses.mean()
        loss.backward()
        drift = torch.zeros((), dtype=torch.float32, device=c.device)  # ||theta - anchor||^2
        with torch.no_grad():
            for p, a in zip(c.params, self.anchor):
                diff = p.detach().float() - a
                drift += (diff * diff).sum()
                prox = (cfg.rho * diff).to(p.dtype)  # gradient of rho/2 * ||p - a||^2
                p.grad = prox if p.grad is None else p.grad + prox
        drift = float(drift)

        n_tok, n = int(tokens.sum()), len(planned.ids)
        metrics = {"loss": loss.item(), "tokens": n_tok, "n_samples": n, "switched": switched, "drift": drift,
                   "proximal": cfg.rho / 2 * drift}
        if planned.phase == "align":
            metrics.update(trained_samples=0, trained_tokens=0, align_samples=n, align_tokens=n_tok)
        else:
            metrics.update(trained_samples=n, trained_tokens=n_tok, align_samples=0, align_tokens=0)
        return metrics

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"anchor": [a.cpu() for a in self.anchor], "state": self.state, "switches": self.switches}

    def load_state_dict(self, state: dict) -> None:
        self.anchor = [a.to(self.ctx.device) for a in state["anchor"]]
        self.state, self.switches = state["state"], state["switches"]
