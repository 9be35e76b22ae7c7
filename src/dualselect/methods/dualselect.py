"""DualSelect ("Two to Tango", EMNLP 2026): coupled task-reference selection with a
reference-gradient correction. The procedure, step by step, is in docs/dualselect-algorithm.md of
the brief; this module is its explicit form. The arithmetic of selection is in
selection/dualselect.py (pure functions); this file only gathers losses and gradients and keeps the
two directions:

  d_T  task direction: sum of the warm-up batch means, then the mean g_T of the last epoch
  g_R  reference direction: weighted mean gradient of the K_R references chosen at the epoch's refresh
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..grads import set_grads
from ..schedule import PlannedStep, batch_plan
from ..selection.dualselect import (
    RunningTopK,
    cosine,
    cosines,
    reference_scores,
    select_task,
    task_scores,
    weighted_direction,
)
from . import register
from .context import TrainContext


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DualSelectConfig:
    warmup_steps: int = _opt(10, "W: task-only warm-up steps that build the first task direction d_T (0: d_T = 0)")
    k_task: int = _opt(4, "k_T: task samples kept per mini-batch (<= 0: all; ignored when budget is set)")
    k_ref: int = _opt(32, "K_R: references kept at each refresh (paper: ceil(0.1 * |D_R|))")
    mode: Literal["hard", "soft"] = _opt("hard", "hard: top-k, weight 1; soft: entropy-regularised softmax weights, then top-k")
    budget: float | None = _opt(None, "paper's token-budget rule: keep the lowest-score samples until they hold this "
                                      "fraction of the batch's response tokens (hard mode), e.g. 0.9")
    mu_task: float = _opt(1.0, "mu_T: weight of the task loss in the task score")
    mu_ref: float = _opt(1.0, "mu_R: weight of the reference loss in the reference score")
    nu: float = _opt(1.0, "nu: weight of the gradient cosine in both scores")
    tau_task: float = _opt(0.1, "tau_T: temperature of the soft task weights")
    tau_ref: float = _opt(0.1, "tau_R: temperature of the soft reference weights")
    rho: float = _opt(0.2, "rho: strength of the correction; each step follows g_T + rho * g_R")
    ref_pool_limit: int | None = _opt(None, "score only the first N references at each refresh")
    score_mode: Literal["train", "eval"] = _opt(
        "train", "model mode while computing per-sample gradients: train (default, as the authors' release: LoRA dropout "
                 "active, a fresh mask per sample; the update reuses these gradients) or eval (dropout off: deterministic)")
    ref_chunk: int = _opt(8, "references per engine call during a refresh (memory: chunk + K_R gradients)")

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.k_ref < 1:
            raise ValueError("k_ref must be >= 1")
        if self.budget is not None and not (0 < self.budget <= 1):
            raise ValueError("budget must be in (0, 1]")
        if self.budget is not None and self.mode != "hard":
            raise ValueError("budget works with mode 'hard' only")
        if self.tau_task <= 0 or self.tau_ref <= 0:
            raise ValueError("tau_task and tau_ref must be > 0")
        if self.ref_chunk < 1:
            raise ValueError("ref_chunk must be >= 1")


@register("dualselect")
class DualSelect:
    Config = DualSelectConfig

    def __init__(self, cfg: DualSelectConfig, ctx: TrainContext):
        if not ctx.reference:
            raise ValueError("dualselect needs a reference pool: set data.reference")
        self.cfg, self.ctx = cfg, ctx
        n_params = sum(p.numel() for p in ctx.params)
        zeros = lambda: torch.zeros(n_params, dtype=torch.float32, device=ctx.device)  # noqa: E731
        self.d_t = zeros()  # task direction used by the next refresh
        self.g_r = zeros()  # reference direction of the current epoch
        self.sum_gt = zeros()  # running sum of this epoch's g_T
        self.n_gt = 0

    def plan(self) -> list[PlannedStep]:
        c = self.ctx
        return batch_plan(len(c.task), c.batch_size, c.epochs, c.seed, warmup_steps=self.cfg.warmup_steps)

    @contextlib.contextmanager
    def _scoring(self):
        model = self.ctx.model
        was_training = model.training
        model.train(self.cfg.score_mode == "train")
        try:
            yield
        finally:
            model.train(was_training)

    def per_sample_grads(self, samples):
        """Per-sample losses and gradients in the configured score_mode (also used by `select`)."""
        c = self.ctx
        with self._scoring():
            return c.engine(c.model, samples, c.device, c.autocast)

    # -- 2a. lazy reference refresh -------------------------------------------------------------
    def refresh(self, epoch: int) -> None:
        cfg, c = self.cfg, self.ctx
        refs = c.reference[: cfg.ref_pool_limit] if cfg.ref_pool_limit else c.reference
        top = RunningTopK(cfg.k_ref, cfg.mode, cfg.tau_ref)
        losses, coss, all_scores = [], [], []
        chunks = range(0, len(refs), cfg.ref_chunk)
        for start in c.progress(chunks, desc=f"refresh epoch {epoch}", total=len(chunks)):
            out = self.per_sample_grads(refs[start:start + cfg.ref_chunk])
            cos = cosines(out.grads, self.d_t)
            scores = reference_scores(out.losses, cos, cfg.mu_ref, cfg.nu)
            for j in range(len(scores)):
                top.push(float(scores[j]), start + j, out.grads[j].clone())
            losses += out.losses.tolist()
            coss += cos.tolist()
            all_scores += scores.tolist()
            del out
        sel, kept = top.result()
        self.g_r = weighted_direction(torch.stack(kept), sel.weights)
        del kept
        self.sum_gt.zero_()
        self.n_gt = 0
        if c.selection_log:
            ids = [refs[i].id for i in sel.index]
            c.selection_log.write({
                "kind": "refresh", "epoch": epoch, "ids": ids, "index": sel.index, "weights": sel.weights,
                "scores": [all_scores[i] for i in sel.index],
                "losses": [losses[i] for i in sel.index], "cosines": [coss[i] for i in sel.index],
                "loss_terms": [cfg.mu_ref * losses[i] for i in sel.index],
                "cosine_terms": [-cfg.nu * coss[i] for i in sel.index],
                "n_scored": len(refs), "d_t_norm": float(self.d_t.norm()), "g_r_norm": float(self.g_r.norm()),
                "candidates": {"ids": [r.id for r in refs], "losses": losses, "cosines": coss},
            })

    def on_epoch_start(self, epoch: int) -> None:
        if epoch >= 1:
            self.refresh(epoch)

    # -- warm-up and 2b/2c. task filtering + corrected step -----------------------------------------
    def step(self, planned: PlannedStep) -> dict:
        cfg, c = self.cfg, self.ctx
        out = self.per_sample_grads([c.task[i] for i in planned.ids])
        metrics = {"loss": float(out.losses.mean()), "tokens": int(out.tokens.sum()), "n_samples": len(planned.ids)}
        if planned.phase == "warmup":
            g = out.grads.mean(dim=0)
            self.d_t += g
            set_grads(c.params, g)
            if c.selection_log:
                c.selection_log.write({"kind": "warmup", "step": planned.index,
                                       "ids": [c.task[i].id for i in planned.ids], "losses": out.losses.tolist(),
                                       "tokens": out.tokens.tolist()})
            return metrics

        cos = cosines(out.grads, self.g_r)
        scores = task_scores(out.losses, cos, cfg.mu_task, cfg.nu)
        sel = select_task(scores, cfg.k_task, cfg.mode, cfg.tau_task, tokens=out.tokens.tolist(), budget=cfg.budget)
        g_t = weighted_direction(out.grads[sel.index], sel.weights)
        self.sum_gt += g_t
        self.n_gt += 1
        set_grads(c.params, g_t + cfg.rho * self.g_r)
        kept_losses = [float(out.losses[i]) for i in sel.index]
        tr_cos = cosine(g_t, self.g_r)
        if c.selection_log:
            c.selection_log.write({
                "kind": "step", "step": planned.index, "epoch": planned.epoch,
                "ids": [c.task[planned.ids[i]].id for i in sel.index], "index": [planned.ids[i] for i in sel.index],
                "weights": sel.weights, "scores": [float(scores[i]) for i in sel.index], "losses": kept_losses,
                "cosines": [float(cos[i]) for i in sel.index],
                "candidates": {"ids": [c.task[i].id for i in planned.ids], "losses": out.losses.tolist(),
                               "cosines": cos.tolist(), "scores": scores.tolist(), "tokens": out.tokens.tolist()},
                "task_ref_cosine": tr_cos,
            })
        metrics.update(kept=len(sel.index), kept_loss=sum(kept_losses) / len(kept_losses), task_ref_cosine=tr_cos)
        return metrics

    def on_epoch_end(self, epoch: int) -> None:
        if epoch >= 1 and self.n_gt > 0:
            self.d_t = self.sum_gt / self.n_gt

    def state_dict(self) -> dict:
        return {"d_t": self.d_t.cpu(), "g_r": self.g_r.cpu(), "sum_gt": self.sum_gt.cpu(), "n_gt": self.n_gt}

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.device
        self.d_t, self.g_r, self.sum_gt = (state[k].to(dev) for k in ("d_t", "g_r", "sum_gt"))
        self.n_gt = state["n_gt"]
