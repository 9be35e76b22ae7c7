"""DualSelect ("Two to Tango", EMNLP 2026): coupled task-reference selection with a
reference-gradient correction. The procedure, step by step, is in docs/dualselect-algorithm.md of
the brief; this module is its explicit form. The arithmetic of selection is in
selection/dualselect.py (pure functions); this file only gathers losses and gradients and keeps the
two directions:

  d_T  task direction: sum of the warm-up batch means, then the mean g_T of the last epoch
  g_R  reference direction: weighted mean gradient of the K_R references chosen at the epoch's refresh

Ablations (options; defaults = the paper's procedure), to see which term does the work:

  refresh: once              static references, chosen once from the warm-up direction
  refresh: steps             refresh every `refresh_steps` steps (d_T = mean g_T since the last refresh)
  references: random         K_R references drawn at random (seeded) at each refresh, weight 1
  k_task: 0                  no task filter: keep every sample (correction only)
  rho: 0                     no correction (filter only)
  correction: project        remove g_T's component against g_R when they conflict (then + rho * g_R;
                             rho: 0 gives the pure projection of the authors' analysis scripts)
  mu_task: 0 / nu: 0         one-term scores: cosine only / loss only
  score_norm: zscore         ours, not the paper's: standardise the loss term and the cosine term within
                             each candidate set (the batch; the scored pool) before mu and nu weigh them, so
                             that nu weighs the gradient term on the same scale as the loss (a zscore
                             refresh computes the chosen references' gradients a second time)
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import DualSelectError
from ..grads import PerSampleGrads, set_grads
from ..schedule import PlannedStep, batch_plan, warmup_within
from ..selection.dualselect import (
    RunningTopK,
    cosine,
    cosines,
    reference_scores,
    select_references,
    select_task,
    project_conflict,
    standardize,
    task_scores,
    weighted_direction,
)
from . import register
from .context import NonFiniteError, TrainContext


def _rows(out: PerSampleGrads, rows: list[int]) -> PerSampleGrads:
    return PerSampleGrads(out.losses[rows], out.tokens[rows], out.grads[rows])


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DualSelectConfig:
    warmup_steps: int = _opt(10, "W: task-only warm-up steps that build the first task direction d_T (0: d_T = 0)")
    warmup_in_budget: bool = _opt(
        False, "false (the authors' release): the W warm-up steps come before the epochs, W steps more than sft; "
               "true: they are the first W batches of sft's own plan (same steps, same order, same count as sft) "
               "and the first refresh follows them")
    k_task: int = _opt(4, "k_T: task samples kept per mini-batch (0: all, the no-filter ablation; ignored when budget is set)")
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
    refresh: Literal["epoch", "once", "steps"] = _opt(
        "epoch", "when references are refreshed: epoch (paper: at the start of every epoch), once (ablation: only "
                 "at the first epoch, from the warm-up direction), steps (ablation: every refresh_steps steps)")
    refresh_steps: int | None = _opt(None, "with refresh=steps: filtered steps between refreshes")
    references: Literal["scored", "random"] = _opt(
        "scored", "scored (paper: the K_R highest reference scores) or random (ablation: K_R references drawn at "
                  "random at each refresh, seeded, weight 1)")
    correction: Literal["add", "project"] = _opt(
        "add", "add (paper: step along g_T + rho * g_R) or project (ablation: g_T without its component against "
               "g_R when <g_T, g_R> < 0, then + rho * g_R; rho=0: the pure projection)")
    score_norm: Literal["none", "zscore"] = _opt(
        "none", "none (paper) or zscore (ours, not the paper's: standardise the loss and the cosine terms within "
                "each candidate set before mu and nu weigh them, so nu weighs the gradient term on the loss's scale)")

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.k_task < 0:
            raise ValueError(f"k_task must be >= 0 (0 keeps every sample), got {self.k_task}")
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
        if self.ref_pool_limit is not None and self.ref_pool_limit < 1:
            raise ValueError(f"ref_pool_limit must be >= 1 (or null: the whole pool), got {self.ref_pool_limit}")
        if self.refresh == "steps" and (self.refresh_steps is None or self.refresh_steps < 1):
            raise ValueError("refresh=steps needs refresh_steps >= 1")
        if self.refresh != "steps" and self.refresh_steps is not None:
            raise ValueError(f"refresh_steps is set but refresh is '{self.refresh}' (set refresh=steps)")


@register("dualselect", summary="refresh the most conflicting references per epoch, keep the task samples that agree "
                                 "with them, add a reference-gradient correction",
          paper='"Two to Tango: Coupled Task-Reference Selection for Safe LLM Fine-tuning", EMNLP 2026 '
                "(arXiv 2606.09866)", needs="task+reference")
class DualSelect:
    Config = DualSelectConfig

    def __init__(self, cfg: DualSelectConfig, ctx: TrainContext):
        if not ctx.reference:
            raise ValueError("dualselect needs a reference pool: set data.reference")
        pool = min(len(ctx.reference), cfg.ref_pool_limit or len(ctx.reference))
        if pool < cfg.k_ref:
            raise ValueError(f"the reference pool has {pool} usable examples, fewer than dualselect.k_ref={cfg.k_ref} "
                             "(a refresh would keep all of them, selecting nothing): lower dualselect.k_ref or add "
                             "references to data.reference")
        self.cfg, self.ctx = cfg, ctx
        n_params = sum(p.numel() for p in ctx.params)
        zeros = lambda: torch.zeros(n_params, dtype=torch.float32, device=ctx.device)  # noqa: E731
        self.d_t = zeros()  # task direction used by the next refresh
        self.g_r = zeros()  # reference direction of the current epoch
        self.sum_gt = zeros()  # running sum of the g_T since the last refresh
        self.n_gt = 0
        self.n_refresh = 0

    def plan(self) -> list[PlannedStep]:
        c = self.ctx
        if self.cfg.warmup_in_budget:
            return warmup_within(batch_plan(len(c.task), c.batch_size, c.epochs, c.seed), self.cfg.warmup_steps)
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
    def _scores(self, losses, cos, mu: float) -> tuple[list[float], list[float]]:
        """The loss and cosine terms of the scores of one candidate set (score = loss term + cosine term)."""
        if self.cfg.score_norm == "zscore":
            losses, cos = standardize(losses), standardize(cos)
        loss_t = (mu * torch.as_tensor(losses, dtype=torch.float64)).tolist()
        cos_t = (-self.cfg.nu * torch.as_tensor(cos, dtype=torch.float64)).tolist()
        return loss_t, cos_t

    def _grads_of(self, refs, index: list[int]):
        """Per-sample losses, cosines to d_T and gradients of refs[index], chunk by chunk (generator): yields
        (the positions in refs of out's rows, out, cosines); references with a NaN/inf loss or gradient are left
        out (train.nonfinite=skip; with stop they end the run)."""
        for start in range(0, len(index), self.cfg.ref_chunk):
            pos = index[start:start + self.cfg.ref_chunk]
            out = self.per_sample_grads([refs[i] for i in pos])
            ok = self.ctx.finite_rows([refs[i].id for i in pos], out.losses, out.grads, data="reference")
            if len(ok) < len(pos):
                out, pos = _rows(out, ok), [pos[j] for j in ok]
            yield pos, out, cosines(out.grads, self.d_t)

    def _check_left(self, kept: list, epoch: int) -> None:
        if not kept:  # train.nonfinite=skip left out every reference
            raise DualSelectError(f"reference refresh {self.n_refresh} (epoch {epoch}): every reference has a NaN or "
                                  "inf loss or gradient, so there is no reference direction (the model has likely "
                                  "diverged): lower train.lr or use model.precision=fp32")

    def refresh(self, epoch: int) -> None:
        cfg, c = self.cfg, self.ctx
        refs = c.reference[: cfg.ref_pool_limit] if cfg.ref_pool_limit else c.reference
        self.n_refresh += 1
        losses, coss = [0.0] * len(refs), [0.0] * len(refs)
        chunks = range(0, len(refs), cfg.ref_chunk)
        if cfg.references == "random":  # ablation: only the drawn references are computed
            rng = random.Random(f"dualselect-random-refs-{c.seed}-{self.n_refresh}")
            drawn = sorted(rng.sample(range(len(refs)), min(cfg.k_ref, len(refs))))
            kept, index = [], []
            for pos, out, cos in self._grads_of(refs, drawn):
                for j, i in enumerate(pos):
                    losses[i], coss[i] = float(out.losses[j]), float(cos[j])
                    kept.append(out.grads[j].clone())
                    index.append(i)
                del out
            scored, weights = index, [1.0] * len(index)
            loss_t, cos_t = self._scores([losses[i] for i in index], [coss[i] for i in index], cfg.mu_ref)
            all_scores = [0.0] * len(refs)
            for i, a, b in zip(index, loss_t, cos_t):
                all_scores[i] = a + b
            terms = dict(zip(index, zip(loss_t, cos_t)))
        elif cfg.score_norm == "zscore":  # the scores need the whole pool: score it, then recompute the kept ones
            scored = []
            for pos, out, cos in c.progress(self._grads_of(refs, list(range(len(refs)))),
                                            desc=f"refresh epoch {epoch}", total=len(chunks)):
                for j, i in enumerate(pos):
                    losses[i], coss[i] = float(out.losses[j]), float(cos[j])
                scored += pos
                del out
            self._check_left(scored, epoch)
            loss_t, cos_t = self._scores([losses[i] for i in scored], [coss[i] for i in scored], cfg.mu_ref)
            all_scores = [0.0] * len(refs)
            for i, a, b in zip(scored, loss_t, cos_t):
                all_scores[i] = a + b
            terms = dict(zip(scored, zip(loss_t, cos_t)))
            sel = select_references([all_scores[i] for i in scored], cfg.k_ref, cfg.mode, cfg.tau_ref)
            index, weights = [scored[p] for p in sel.index], sel.weights
            kept, found = [], set()
            for pos, out, _ in self._grads_of(refs, index):  # recomputed: one not finite now (dropout) is left out
                kept += [g.clone() for g in out.grads]
                found.update(pos)
            weights = [w for i, w in zip(index, weights) if i in found]
            index = [i for i in index if i in found]
        else:
            top = RunningTopK(cfg.k_ref, cfg.mode, cfg.tau_ref)
            all_scores = [0.0] * len(refs)
            scored = []
            for pos, out, cos in c.progress(self._grads_of(refs, list(range(len(refs)))),
                                            desc=f"refresh epoch {epoch}", total=len(chunks)):
                scores = reference_scores(out.losses, cos, cfg.mu_ref, cfg.nu)
                for j, i in enumerate(pos):
                    top.push(float(scores[j]), i, out.grads[j].clone())
                    losses[i], coss[i] = float(out.losses[j]), float(cos[j])
                    all_scores[i] = float(scores[j])
                scored += pos
                del out
            sel, kept = top.result()
            index, weights = sel.index, sel.weights
            terms = {i: (cfg.mu_ref * losses[i], -cfg.nu * coss[i]) for i in index}
        self._check_left(kept, epoch)
        self.g_r = weighted_direction(torch.stack(kept), weights)
        del kept
        self.sum_gt.zero_()
        self.n_gt = 0
        if c.selection_log:
            c.selection_log.write({
                "kind": "refresh", "epoch": epoch, "refresh": self.n_refresh, "ids": [refs[i].id for i in index],
                "index": index, "weights": weights, "scores": [all_scores[i] for i in index],
                "losses": [losses[i] for i in index], "cosines": [coss[i] for i in index],
                "loss_terms": [terms[i][0] for i in index], "cosine_terms": [terms[i][1] for i in index],
                "n_scored": len(scored), "d_t_norm": float(self.d_t.norm()), "g_r_norm": float(self.g_r.norm()),
                "candidates": {"ids": [refs[i].id for i in scored], "losses": [losses[i] for i in scored],
                               "cosines": [coss[i] for i in scored]},
            })

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == 1 or (epoch > 1 and self.cfg.refresh == "epoch"):
            self.refresh(epoch)

    # -- warm-up and 2b/2c. task filtering + corrected step -----------------------------------------
    def step(self, planned: PlannedStep) -> dict:
        cfg, c = self.cfg, self.ctx
        if cfg.refresh == "steps" and planned.phase != "warmup" and self.n_gt >= cfg.refresh_steps:
            self.d_t = self.sum_gt / self.n_gt  # the task direction since the last refresh
            self.refresh(planned.epoch)
        ids = list(planned.ids)
        out = self.per_sample_grads([c.task[i] for i in ids])
        ok = c.finite_rows([c.task[i].id for i in ids], out.losses, out.grads)
        if not ok:  # train.nonfinite=skip left out every sample: nothing to step on, the loop skips the step
            raise NonFiniteError(**c.dropped[-1])
        if len(ok) < len(ids):
            out, ids = _rows(out, ok), [ids[i] for i in ok]
        metrics = {"loss": float(out.losses.mean()), "tokens": int(out.tokens.sum()), "n_samples": len(planned.ids)}
        if planned.phase == "warmup":
            g = out.grads.mean(dim=0)
            self.d_t += g
            set_grads(c.params, g)
            metrics.update(trained_samples=len(ids), trained_tokens=metrics["tokens"])
            if c.selection_log:
                c.selection_log.write({"kind": "warmup", "step": planned.index,
                                       "ids": [c.task[i].id for i in ids], "losses": out.losses.tolist(),
                                       "tokens": out.tokens.tolist()})
            return metrics

        cos = cosines(out.grads, self.g_r)
        if cfg.score_norm == "zscore":
            scores = task_scores(standardize(out.losses), standardize(cos), cfg.mu_task, cfg.nu)
        else:
            scores = task_scores(out.losses, cos, cfg.mu_task, cfg.nu)
        sel = select_task(scores, cfg.k_task, cfg.mode, cfg.tau_task, tokens=out.tokens.tolist(), budget=cfg.budget)
        g_t = weighted_direction(out.grads[sel.index], sel.weights)
        self.sum_gt += g_t
        self.n_gt += 1
        step_dir = project_conflict(g_t, self.g_r) if cfg.correction == "project" else g_t
        set_grads(c.params, step_dir + cfg.rho * self.g_r)
        kept_losses = [float(out.losses[i]) for i in sel.index]
        tr_cos = cosine(g_t, self.g_r)
        if c.selection_log:
            c.selection_log.write({
                "kind": "step", "step": planned.index, "epoch": planned.epoch,
                "ids": [c.task[ids[i]].id for i in sel.index], "index": [ids[i] for i in sel.index],
                "weights": sel.weights, "scores": [float(scores[i]) for i in sel.index], "losses": kept_losses,
                "cosines": [float(cos[i]) for i in sel.index],
                "candidates": {"ids": [c.task[i].id for i in ids], "losses": out.losses.tolist(),
                               "cosines": cos.tolist(), "scores": scores.tolist(), "tokens": out.tokens.tolist()},
                "task_ref_cosine": tr_cos,
            })
        metrics.update(trained_samples=len(sel.index), trained_tokens=int(out.tokens[sel.index].sum()))
        metrics.update(kept=len(sel.index), kept_loss=sum(kept_losses) / len(kept_losses), task_ref_cosine=tr_cos)
        return metrics

    def on_epoch_end(self, epoch: int) -> None:
        if epoch >= 1 and self.n_gt > 0 and self.cfg.refresh == "epoch":
            self.d_t = self.sum_gt / self.n_gt

    def state_dict(self) -> dict:
        return {"d_t": self.d_t.cpu(), "g_r": self.g_r.cpu(), "sum_gt": self.sum_gt.cpu(), "n_gt": self.n_gt,
                "n_refresh": self.n_refresh}

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.device
        self.d_t, self.g_r, self.sum_gt = (state[k].to(dev) for k in ("d_t", "g_r", "sum_gt"))
        self.n_gt = state["n_gt"]
        self.n_refresh = state.get("n_refresh", 0)
