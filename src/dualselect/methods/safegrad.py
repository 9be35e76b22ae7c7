"""SafeGrad: gradient surgery against a safety-reference gradient (Yi, Li, Zhang, Nie, Li, Huang, Liu,
"Gradient Surgery for Safe LLM Fine-Tuning", arXiv 2508.07172, 2025).

Every step computes the task gradient g_T (the batch's mean loss) and a reference gradient g_R (the mean
loss of a reference mini-batch); when they conflict, ``<g_T, g_R> < 0``, the component of g_T along g_R is
removed, ``g = g_T - <g_T, g_R> / |g_R|^2 * g_R`` (so ``<g, g_R> = 0``), else ``g = g_T``; the loop applies
g (plus ``align_weight * g_R`` if set). The projection is selection/dualselect.py's project_conflict.

Paper vs ours (the paper's public description: abstract and summaries; its full text was not in reach):

  ==================  ========================================  ========================================
  what                paper                                     ours
  ==================  ========================================  ========================================
  surgery             project g_T onto the plane orthogonal     the same
                      to the alignment gradient on conflict
  alignment loss      KL divergence to the well-aligned         ref_loss=nll (default): the reference
                      foundation model on alignment data        responses' mean NLL; ref_loss=kl: the
                                                                paper's, see below
  alignment term in   our reading: the alignment loss is also   align_weight (default 0: pure surgery;
  the update          optimised (multi-objective), weight 1     1: our reading of the paper)
  g_R refresh         every step                                every `ref_every` steps (default 1)
  reference batch     (not stated in the abstract)              ref_batch_size (8), seeded cycling
                                                                shuffle of data.reference
  task steps          -                                         the same plan as SFT
  ==================  ========================================  ========================================

Our reading of ``ref_loss=kl``: the foundation model is the model with the LoRA adapter disabled (the
base weights, frozen), and the loss of a reference sample is the mean over its supervised response
positions of ``KL(p_base || p_theta)`` over the vocabulary (the aligned model's distribution is the
target), averaged over the mini-batch. With a fresh adapter (LoRA B = 0) the two models coincide at the
start, so g_R = 0 and the first steps are plain SFT until the adapter has moved.

Budget: trained_samples / trained_tokens count the task batch only (as dualselect, whose reference
correction is not counted either); the reference samples a step used are in ref_samples / ref_tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..data.formatting import Encoded, collate
from ..grads import batch_losses, flatten, set_grads
from ..schedule import PlannedStep, batch_plan
from ..selection.dtypes import wide_dtype
from ..selection.dualselect import in_conflict, project_conflict
from . import register
from .context import TrainContext


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


def reference_batch(n: int, batch_size: int, seed: int, b: int) -> tuple[int, ...]:
    """The b-th reference mini-batch (positions in the reference pool), a pure function.

    The pool is cycled in passes; each pass is a fresh shuffle of range(n) (seeded from `seed` and the pass
    number) cut into batches of `batch_size` (the last batch of a pass may be smaller)."""
    if n < 1:
        raise ValueError("no reference samples")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    per_pass = -(-n // batch_size)
    p, j = divmod(b, per_pass)
    order = list(range(n))
    random.Random(f"safegrad-reference-{seed}-{p}").shuffle(order)
    return tuple(order[j * batch_size:(j + 1) * batch_size])


@dataclass
class SafeGradConfig:
    ref_batch_size: int = _opt(8, "reference samples in the mini-batch whose mean loss gives g_R")
    ref_every: int = _opt(1, "recompute g_R every N steps (1: every step, the paper's); reuse the last otherwise")
    ref_loss: Literal["nll", "kl"] = _opt(
        "nll", "loss whose gradient is g_R: nll (the reference responses' mean NLL) or kl (the paper's: "
               "KL(base || model) over the vocabulary at the reference responses' positions, base = adapter off)")
    align_weight: float = _opt(0.0, "the update is the surgered g_T + align_weight * g_R (0: surgery only; "
                                    "1: our reading of the paper, which also optimises the alignment loss)")

    def __post_init__(self):
        if isinstance(self.ref_batch_size, bool) or not isinstance(self.ref_batch_size, int) or self.ref_batch_size < 1:
            raise ValueError(f"ref_batch_size must be a positive integer, got {self.ref_batch_size!r}")
        if isinstance(self.ref_every, bool) or not isinstance(self.ref_every, int) or self.ref_every < 1:
            raise ValueError(f"ref_every must be a positive integer (1: every step), got {self.ref_every!r}")
        if self.ref_loss not in ("nll", "kl"):
            raise ValueError(f"ref_loss must be 'nll' or 'kl', got {self.ref_loss!r}")
        if isinstance(self.align_weight, bool) or not isinstance(self.align_weight, (int, float)) \
                or not (self.align_weight >= 0 and self.align_weight != float("inf")):
            raise ValueError(f"align_weight must be a finite number >= 0, got {self.align_weight!r}")


@register("safegrad", summary="remove from each task gradient its component against a safety-reference gradient "
                               "when the two conflict (gradient surgery)",
          paper='Yi et al., "Gradient Surgery for Safe LLM Fine-Tuning" (SafeGrad), arXiv 2508.07172 (2025)',
          needs="task+reference")
class SafeGrad:
    Config = SafeGradConfig

    def __init__(self, cfg: SafeGradConfig, ctx: TrainContext):
        if not ctx.reference:
            raise ValueError("safegrad needs a reference pool (the safety data whose gradient is protected): "
                             "set data.reference")
        if cfg.ref_loss == "kl" and not hasattr(ctx.model, "disable_adapter"):
            raise ValueError("safegrad ref_loss=kl needs a LoRA (PEFT) model: the base model is the model with "
                             "the adapter disabled")
        self.cfg, self.ctx = cfg, ctx
        self.g_ref: torch.Tensor | None = None  # the last reference gradient (reused between refreshes)
        self.ref_loss_value: float | None = None

    def plan(self) -> list[PlannedStep]:
        c = self.ctx
        return batch_plan(len(c.task), c.batch_size, c.epochs, c.seed)

    def on_epoch_start(self, epoch: int) -> None:
        pass

    # -- gradients ----------------------------------------------------------------------------------
    def _grad(self, loss: torch.Tensor) -> torch.Tensor:
        params = self.ctx.params
        return flatten(torch.autograd.grad(loss, params, allow_unused=True), params)

    def _kl_losses(self, batch: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample mean over supervised positions of KL(p_base || p_theta), and the token counts."""
        c = self.ctx
        t = {k: v.to(c.device) for k, v in collate(batch, c.pad_id).items()}
        targets = t["labels"][:, 1:]
        mask = targets != -100  # position i predicts token i + 1
        with c.autocast():
            logits = c.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits[:, :-1]
            with torch.no_grad(), c.model.disable_adapter():
                base = c.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits[:, :-1]
        log_q = F.log_softmax(logits[mask].float(), dim=-1)  # [n_supervised, V]
        log_p = F.log_softmax(base[mask].float(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        tokens = mask.sum(dim=1)
        row = mask.nonzero()[:, 0]
        per_sample = torch.zeros(len(batch), dtype=kl.dtype, device=kl.device).index_add(0, row, kl)
        return per_sample / tokens.clamp(min=1), tokens

    def reference_gradient(self, ids: tuple[int, ...]) -> tuple[torch.Tensor, float, int]:
        """g_R of the reference samples at `ids`: the gradient of their mean loss; also the loss and tokens."""
        c = self.ctx
        batch = [c.reference[i] for i in ids]
        if self.cfg.ref_loss == "kl":
            losses, tokens = self._kl_losses(batch)
        else:
            losses, tokens = batch_losses(c.model, batch, c.pad_id, c.device, c.autocast)
        loss = losses.mean()
        return self._grad(loss), loss.item(), int(tokens.sum())

    # -- one step -------------------------------------------------------------------------------------
    def step(self, planned: PlannedStep) -> dict:
        cfg, c = self.cfg, self.ctx
        refresh = self.g_ref is None or planned.index % cfg.ref_every == 0
        ref_ids: tuple[int, ...] = ()
        ref_tokens = 0
        if refresh:
            b = planned.index // cfg.ref_every
            ref_ids = reference_batch(len(c.reference), cfg.ref_batch_size, c.seed, b)
            self.g_ref, self.ref_loss_value, ref_tokens = self.reference_gradient(ref_ids)

        losses, tokens = batch_losses(c.model, [c.task[i] for i in planned.ids], c.pad_id, c.device, c.autocast)
        loss = losses.mean()
        g_task = self._grad(loss)

        g_r = self.g_ref
        wide = wide_dtype(g_task.device)  # float64, float32 on a device without it (MPS)
        dot = float(torch.dot(g_task.to(wide), g_r.to(wide)))
        norms = float(g_task.to(wide).norm()) * float(g_r.to(wide).norm())
        cos = dot / norms if norms > 0 else 0.0
        conflict = in_conflict(g_task, g_r)
        g = project_conflict(g_task, g_r)
        if cfg.align_weight:
            g = g + cfg.align_weight * g_r
        set_grads(c.params, g)

        if c.selection_log:
            record = {"kind": "step", "step": planned.index, "epoch": planned.epoch,
                      "ids": [c.task[i].id for i in planned.ids], "conflict": conflict, "dot": dot,
                      "task_ref_cosine": cos, "ref_refreshed": refresh}
            if refresh:
                record.update(ref_ids=[c.reference[i].id for i in ref_ids], ref_index=list(ref_ids),
                              ref_loss=self.ref_loss_value)
            c.selection_log.write(record)
        n_tok = int(tokens.sum())
        return {"loss": loss.item(), "tokens": n_tok, "n_samples": len(planned.ids),
                "trained_samples": len(planned.ids), "trained_tokens": n_tok,
                "ref_loss": self.ref_loss_value, "ref_samples": len(ref_ids), "ref_tokens": ref_tokens,
                "conflict": int(conflict), "task_ref_cosine": cos}

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"g_ref": None if self.g_ref is None else self.g_ref.cpu(), "ref_loss": self.ref_loss_value}

    def load_state_dict(self, state: dict) -> None:
        g = state["g_ref"]
        self.g_ref = None if g is None else g.to(self.ctx.device)
        self.ref_loss_value = state["ref_loss"]
