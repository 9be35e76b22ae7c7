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

Scale (options; they change memory and cost, not the procedure, except as each one says):

  ref_memory: recompute      keep only scores while scoring the pool, then compute the chosen references'
                             gradients again into a running weighted sum: one chunk of gradients in memory
                             instead of K_R + one chunk (hold, the default)
  ref_sample: N              score a fresh seeded random subset of N references at each refresh
  projection_dim: d          reference cosines of randomly projected gradients (g_R stays exact)
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import DualSelectError
from ..grads import PerSampleGrads, set_grads
from ..projection import project
from ..schedule import PlannedStep, batch_plan, warmup_within
from ..selection.dtypes import wide_dtype
from ..selection.dualselect import (
    RunningTopK,
    WeightedSum,
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
from .context import NonFiniteError, TrainContext, nonfinite_grad_rows


def _rows(out: PerSampleGrads, rows: list[int]) -> PerSampleGrads:
    return PerSampleGrads(out.losses[rows], out.tokens[rows], out.grads[rows])


def _grad_flags(grads: torch.Tensor) -> torch.Tensor:
    """[n, 1]: 0 where a row of `grads` [n, P] is finite, inf where not (what finite_rows needs of the gradients,
    small enough to gather from every process)."""
    bad = nonfinite_grad_rows(grads)
    return torch.zeros(len(grads), 1, device=grads.device).masked_fill(bad.reshape(-1, 1), float("inf"))


def _shared_mean(comm, grads: torch.Tensor, n: int) -> torch.Tensor:
    """The mean of the n gradients of a batch whose rows are shared among processes (`grads`: this one's rows)."""
    if comm.world_size == 1:
        return grads.mean(dim=0)
    return (comm.sum(grads.to(wide_dtype(grads.device)).sum(dim=0)) / n).to(torch.float32)


def _shared_direction(comm, grads: torch.Tensor, start: int, index: list[int], weights: list[float]) -> torch.Tensor:
    """weighted_direction of the batch's rows `index` (positions in the batch) when this process holds the rows
    start..start + len(grads) only: each process adds its own selected rows, the parts are summed over processes."""
    if comm.world_size == 1:
        return weighted_direction(grads[index], weights)
    acc = torch.zeros(grads.shape[1], dtype=wide_dtype(grads.device), device=grads.device)
    for i, w in zip(index, weights):
        if start <= i < start + len(grads) and w != 0.0:
            acc.add_(grads[i - start].to(acc.dtype), alpha=w)
    return (comm.sum(acc) / float(torch.tensor(weights, dtype=wide_dtype()).sum())).to(torch.float32)


def _keep_best(top: RunningTopK, slots: torch.Tensor | None, free: list[int] | None, score: float, i: int,
               grad: torch.Tensor) -> None:
    """Push reference i into the running top K. With `slots` (ref_memory=hold: one [K_R + 1, P] buffer) its gradient
    is copied into a free row only when it enters the top K, and the row of the one it evicts is freed again."""
    slot = None
    if slots is not None and top.admits(score, i):  # copy only a row that enters the top K
        slot = free.pop()
        slots[slot].copy_(grad)
    dropped = top.push(score, i, slot)
    if dropped is not None:
        free.append(dropped)


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
    ref_sample: int | None = _opt(
        None, "score a random subset of N references at each refresh, a fresh one each time (drawn from the first "
              "ref_pool_limit references when that is set; seeded by train.seed and the refresh number, so a rerun or a "
              "resume draws the same subsets; the log's candidates and sample fields say which); N >= k_ref; null: "
              "score the whole pool")
    score_mode: Literal["train", "eval"] = _opt(
        "train", "model mode while computing per-sample gradients: train (default, as the authors' release: LoRA dropout "
                 "active, a fresh mask per sample; the update reuses these gradients) or eval (dropout off: deterministic)")
    ref_chunk: int = _opt(8, "references per engine call during a refresh (memory: see ref_memory)")
    ref_memory: Literal["hold", "recompute"] = _opt(
        "hold", "reference gradients a refresh keeps: hold (default) the K_R best so far while it scores the pool, "
                "then their weighted mean (K_R + 1 + ref_chunk gradients at once); recompute: only the losses and "
                "cosines while it scores, then the chosen references' gradients are computed again, a chunk at a time, "
                "into a running weighted sum (ref_chunk gradients, whatever K_R and the pool size; K_R more "
                "per-sample gradients to compute). Both add the scoring's temporaries (float64 copies for the "
                "cosines, the non-finite check). With score_mode=train, LoRA dropout draws new masks, so a "
                "recomputed gradient is not the one that was scored (score_mode=eval: the same). score_norm=zscore and "
                "references=random always keep one chunk only")
    projection_dim: int | None = _opt(
        None, "score references with the cosine of randomly projected gradients: a seeded Rademacher (Johnson-"
              "Lindenstrauss) projection of g(r) and d_T to this many dimensions (the same matrix all run, seeded "
              "by train.seed); the cosines then deviate by O(1/sqrt(dim)). Changes only the cosine term of the "
              "reference scores (and what the log shows for it): g_R is still the exact weighted mean of the chosen "
              "full gradients, and task scores use exact cosines. Costs P x dim per gradient (more than the exact "
              "cosine: slow on a CPU at LLM scale); null: exact cosines")
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
        if self.ref_sample is not None and self.ref_sample < 1:
            raise ValueError(f"ref_sample must be >= 1 (or null: the whole pool), got {self.ref_sample}")
        if self.ref_sample is not None and self.ref_sample < self.k_ref:
            raise ValueError(f"ref_sample={self.ref_sample} is smaller than k_ref={self.k_ref}: a refresh scores at "
                             "least the K_R references it keeps (raise ref_sample or lower k_ref)")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1 (or null: exact cosines), got {self.projection_dim}")
        if self.references == "random" and (self.ref_sample is not None or self.projection_dim is not None):
            raise ValueError("ref_sample and projection_dim change how references are scored; with references=random "
                             "they are drawn, not scored (unset them or use references=scored)")
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
        if cfg.ref_sample is not None and cfg.ref_sample > pool:
            raise ValueError(f"dualselect.ref_sample={cfg.ref_sample} exceeds the {pool} usable references (the pool"
                             f"{' after ref_pool_limit' if cfg.ref_pool_limit else ''}): lower it, or set it to null to "
                             "score the whole pool")
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
        loss_t = (mu * torch.as_tensor(losses, dtype=wide_dtype())).tolist()
        cos_t = (-self.cfg.nu * torch.as_tensor(cos, dtype=wide_dtype())).tolist()
        return loss_t, cos_t

    def _chunks(self, index: list[int]) -> list[list[int]]:
        return [index[s:s + self.cfg.ref_chunk] for s in range(0, len(index), self.cfg.ref_chunk)]

    def _grads_of(self, refs, pos: list[int]) -> tuple[list[int], PerSampleGrads]:
        """Per-sample losses and gradients of refs[pos] (one engine call) and the positions of out's rows: references
        with a NaN/inf loss or gradient are left out (train.nonfinite=skip; with stop they end the run)."""
        out = self.per_sample_grads([refs[i] for i in pos])
        ok = self.ctx.finite_rows([refs[i].id for i in pos], out.losses, out.grads, data="reference")
        if len(ok) < len(pos):
            out, pos = _rows(out, ok), [pos[j] for j in ok]
        return pos, out

    def _scored_chunks(self, refs, cand: list[int], epoch: int, seen: dict, check: bool = True):
        """Scores refs[cand] a chunk at a time (generator): yields (positions, out, cosines to d_T) and records each
        scored reference's (loss, cosine) in `seen` (position -> pair, in scoring order). The cosines are exact or,
        with projection_dim, those of the projected vectors. A chunk's gradients are released before the next
        chunk is computed (the caller deletes its `out` too). check=False: non-finite rows are kept (NaN scores);
        the caller checks them (several processes check every process's rows together)."""
        cfg = self.cfg
        d_ref = project(self.d_t, cfg.projection_dim, self.ctx.seed) if cfg.projection_dim else self.d_t
        for pos in self.ctx.progress(self._chunks(cand), desc=f"refresh epoch {epoch}"):
            pos, out = self._grads_of(refs, pos) if check else (pos, self.per_sample_grads([refs[i] for i in pos]))
            rows = project(out.grads, cfg.projection_dim, self.ctx.seed) if cfg.projection_dim else out.grads
            cos = cosines(rows, d_ref)
            del rows
            for j, i in enumerate(pos):
                seen[i] = (float(out.losses[j]), float(cos[j]))
            yield pos, out, cos
            del out

    def _candidates(self, n_pool: int) -> list[int]:
        """The pool positions (ascending) this refresh scores: all, or with ref_sample a fresh subset seeded by
        train.seed and the refresh number (the same subsets on a rerun and on a resume)."""
        if self.cfg.ref_sample is None:
            return list(range(n_pool))
        rng = random.Random(f"dualselect-ref-sample-{self.ctx.seed}-{self.n_refresh}")
        return sorted(rng.sample(range(n_pool), self.cfg.ref_sample))

    def _recomputed(self, refs, index: list[int], weights: list[float]) -> tuple[WeightedSum, list[int], list[float]]:
        """The chosen references' gradients computed again, a chunk at a time, into a running weighted sum in
        selection order (the same sum as from held gradients); one not finite now (dropout) is left out. Returns
        the sum and the references and weights in it."""
        weight_of, acc, found = dict(zip(index, weights)), WeightedSum(), []
        for pos in self._chunks(index):
            pos, out = self._grads_of(refs, pos)
            for j, i in enumerate(pos):
                acc.add(out.grads[j], weight_of[i])
            found += pos
            del out
        return acc, found, [weight_of[i] for i in found]

    def _check_left(self, n_left: int, epoch: int) -> None:
        if not n_left:  # train.nonfinite=skip left out every reference
            raise DualSelectError(f"reference refresh {self.n_refresh} (epoch {epoch}): every reference has a NaN or "
                                  "inf loss or gradient, so there is no reference direction (the model has likely "
                                  "diverged): lower train.lr or use model.precision=fp32")

    def _random_selection(self, seen: dict) -> tuple[dict, dict, list[int], list[float]]:
        """references=random: every drawn (finite) reference, weight 1; the terms, scores, index and weights."""
        index = list(seen)
        loss_t, cos_t = self._scores([seen[i][0] for i in index], [seen[i][1] for i in index], self.cfg.mu_ref)
        terms = dict(zip(index, zip(loss_t, cos_t)))
        return terms, {i: a + b for i, (a, b) in terms.items()}, index, [1.0] * len(index)

    def _zscore_selection(self, seen: dict) -> tuple[dict, dict, list[int], list[float]]:
        """score_norm=zscore: the terms standardised over every scored reference (`seen`, in scoring order), then
        the K_R best; the terms, scores, chosen positions and weights."""
        cfg = self.cfg
        loss_t, cos_t = self._scores([x[0] for x in seen.values()], [x[1] for x in seen.values()], cfg.mu_ref)
        terms = dict(zip(seen, zip(loss_t, cos_t)))
        score_of = {i: a + b for i, (a, b) in terms.items()}
        sel = select_references(list(score_of.values()), cfg.k_ref, cfg.mode, cfg.tau_ref)
        scored = list(seen)
        return terms, score_of, [scored[p] for p in sel.index], sel.weights

    def refresh(self, epoch: int) -> None:
        """Choose the K_R references and set g_R. Memory: hold keeps the K_R best gradients so far (RunningTopK, rows
        of one [K_R + 1, P] buffer) plus one chunk; recompute, score_norm=zscore and references=random keep one chunk
        (and the running sum). In several processes each scores its share of the candidates (_shared_refresh)."""
        cfg, c = self.cfg, self.ctx
        refs = c.reference[: cfg.ref_pool_limit] if cfg.ref_pool_limit else c.reference
        self.n_refresh += 1
        seen: dict[int, tuple[float, float]] = {}  # scored position -> (loss, cosine)
        if c.comm.world_size > 1:
            index, weights, score_of, terms, self.g_r = self._shared_refresh(refs, epoch, seen)
            self._finish_refresh(refs, epoch, seen, index, weights, score_of, terms)
            return
        if cfg.references == "random":  # ablation: only the drawn references are computed, summed as they come
            rng = random.Random(f"dualselect-random-refs-{c.seed}-{self.n_refresh}")
            drawn = sorted(rng.sample(range(len(refs)), min(cfg.k_ref, len(refs))))
            acc = WeightedSum()
            for pos, out, _ in self._scored_chunks(refs, drawn, epoch, seen):
                for j in range(len(pos)):
                    acc.add(out.grads[j], 1.0)
                del out
            terms, score_of, index, weights = self._random_selection(seen)
        elif cfg.score_norm == "zscore":  # the standardised terms need every score: score the pool, then recompute
            for _, out, _ in self._scored_chunks(refs, self._candidates(len(refs)), epoch, seen):
                del out
            self._check_left(len(seen), epoch)
            terms, score_of, index, weights = self._zscore_selection(seen)
            acc, index, weights = self._recomputed(refs, index, weights)
        else:  # the running top K: with the K_R best gradients so far (hold) or only their scores (recompute)
            cand = self._candidates(len(refs))
            top, score_of = RunningTopK(cfg.k_ref, cfg.mode, cfg.tau_ref), {}
            slots = free = None
            if cfg.ref_memory == "hold":  # the payloads are rows of one buffer: K_R + 1 slots, a new row is written
                slots = torch.empty(min(cfg.k_ref, len(cand)) + 1, self.d_t.numel(), device=self.d_t.device)
                free = list(range(len(slots)))  # before the row it evicts is freed; no allocation per reference
            for pos, out, cos in self._scored_chunks(refs, cand, epoch, seen):
                scores = reference_scores(out.losses, cos, cfg.mu_ref, cfg.nu)
                for j, i in enumerate(pos):
                    score_of[i] = float(scores[j])
                    _keep_best(top, slots, free, score_of[i], i, out.grads[j])
                del out
            sel, kept = top.result()
            index, weights = sel.index, sel.weights
            terms = {i: (cfg.mu_ref * seen[i][0], -cfg.nu * seen[i][1]) for i in index}
            if slots is not None:
                acc = WeightedSum()
                for slot, w in zip(kept, weights):
                    acc.add(slots[slot], w)
                del slots
            else:
                acc, index, weights = self._recomputed(refs, index, weights)
        self._check_left(len(acc), epoch)
        self.g_r = acc.result()
        del acc
        self._finish_refresh(refs, epoch, seen, index, weights, score_of, terms)

    def _finish_refresh(self, refs, epoch: int, seen: dict, index: list[int], weights: list[float], score_of: dict,
                        terms: dict) -> None:
        """After a refresh set g_R: restart the task-direction sum and log the refresh (main process)."""
        cfg, c = self.cfg, self.ctx
        self.sum_gt.zero_()
        self.n_gt = 0
        if c.selection_log:
            scored = list(seen)
            c.selection_log.write({
                "kind": "refresh", "epoch": epoch, "refresh": self.n_refresh, "ids": [refs[i].id for i in index],
                "index": index, "weights": weights, "scores": [score_of[i] for i in index],
                "losses": [seen[i][0] for i in index], "cosines": [seen[i][1] for i in index],
                "loss_terms": [terms[i][0] for i in index], "cosine_terms": [terms[i][1] for i in index],
                "n_scored": len(scored), "d_t_norm": float(self.d_t.norm()), "g_r_norm": float(self.g_r.norm()),
                # which references were scored: positions in the pool (the first ref_pool_limit references) and,
                # with ref_sample, how the subset was drawn (random.Random(f"dualselect-ref-sample-{seed}-{refresh}"))
                "pool_size": len(refs), "ref_memory": cfg.ref_memory, "projection_dim": cfg.projection_dim,
                "sample": ({"size": cfg.ref_sample, "pool": len(refs), "seed": c.seed, "refresh": self.n_refresh}
                           if cfg.ref_sample is not None else None),
                "candidates": {"ids": [refs[i].id for i in scored], "index": scored,
                               "losses": [seen[i][0] for i in scored], "cosines": [seen[i][1] for i in scored]},
            })

    # -- the refresh in several processes (distributed.py) ----------------------------------------
    def _checked(self, refs, row_of: dict[int, list[float]], order: list[int]) -> list[int]:
        """The references a one-process refresh keeps, from every process's gathered rows (position -> [position,
        loss, ..., 0 or inf: a finite or non-finite gradient]): the positions `order` (the order one process computes
        them in) are checked a ref_chunk at a time, as _grads_of checks them in one process, so every process drops
        the same references, records the same `dropped` and raises the same error."""
        ok = []
        for part in self._chunks(order):
            losses = torch.tensor([row_of[i][1] for i in part], dtype=torch.float64)
            flags = torch.tensor([[row_of[i][-1]] for i in part], dtype=torch.float64)
            ok += [part[j] for j in self.ctx.finite_rows([refs[i].id for i in part], losses, flags, data="reference")]
        return ok

    def _shared_refresh(self, refs, epoch: int, seen: dict):
        """refresh() in several processes, with the result of one process (g_R up to float summation order): each
        process scores its share of the candidates (contiguous blocks in candidate order), the (position, loss,
        cosine, gradient flag) of every candidate are gathered, and every process makes the same selection from
        them (the one-process rules: RunningTopK's order, select_references for zscore). Each process then adds
        the chosen references of its share (hold: from its local top K, which holds every global winner of its
        share; recompute and zscore: computed again; random: all it drew) and the parts are summed. Fills `seen`;
        returns index, weights, scores, terms and g_R."""
        cfg, c = self.cfg, self.ctx
        comm, dev = c.comm, self.d_t.device
        if cfg.references == "random":
            rng = random.Random(f"dualselect-random-refs-{c.seed}-{self.n_refresh}")
            cand = sorted(rng.sample(range(len(refs)), min(cfg.k_ref, len(refs))))
        else:
            cand = self._candidates(len(refs))
        start, end = comm.share(len(cand))
        mine, mine_set = cand[start:end], set(cand[start:end])
        acc = torch.zeros(self.d_t.numel(), dtype=wide_dtype(dev), device=dev)  # this process's part of the sum
        hold = cfg.references == "scored" and cfg.score_norm == "none" and cfg.ref_memory == "hold"
        top = RunningTopK(cfg.k_ref, cfg.mode, cfg.tau_ref) if hold else None
        slots = torch.empty(min(cfg.k_ref, len(mine)) + 1, self.d_t.numel(), device=dev) if hold else None
        free = list(range(len(slots))) if hold else None
        local: dict[int, tuple[float, float]] = {}
        rows = []  # (position, loss, cosine, 0 or inf: gradient finite or not) of each reference of this share
        for pos, out, cos in self._scored_chunks(refs, mine, epoch, local, check=False):
            flags = _grad_flags(out.grads).reshape(-1).tolist()
            good = [j for j, i in enumerate(pos) if flags[j] == 0.0 and math.isfinite(local[i][0])]
            rows += [(i, *local[i], flags[j]) for j, i in enumerate(pos)]
            if hold:
                scores = reference_scores(out.losses[good], cos[good], cfg.mu_ref, cfg.nu).tolist()
                for j, score in zip(good, scores):
                    _keep_best(top, slots, free, score, pos[j], out.grads[j])
            elif cfg.references == "random":
                for j in good:
                    acc.add_(out.grads[j].to(acc.dtype))
            del out
        every = comm.gather(torch.tensor(rows, dtype=wide_dtype(dev), device=dev).reshape(-1, 4)).cpu()
        row_of = {int(r[0]): r for r in every.tolist()}
        for i in self._checked(refs, row_of, cand):  # candidate order = scoring order of one process
            seen[i] = (row_of[i][1], row_of[i][2])
        self._check_left(len(seen), epoch)
        if cfg.references == "random":
            terms, score_of, index, weights = self._random_selection(seen)
        elif cfg.score_norm == "zscore":
            terms, score_of, index, weights = self._zscore_selection(seen)
        else:  # the same pushes, in the same order, as the one-process RunningTopK: the same ranking and weights
            scores = reference_scores([x[0] for x in seen.values()], [x[1] for x in seen.values()], cfg.mu_ref, cfg.nu)
            score_of, everyone = dict(zip(seen, scores.tolist())), RunningTopK(cfg.k_ref, cfg.mode, cfg.tau_ref)
            for i, score in score_of.items():
                everyone.push(score, i, None)
            sel, _ = everyone.result()
            index, weights = sel.index, sel.weights
            terms = {i: (cfg.mu_ref * seen[i][0], -cfg.nu * seen[i][1]) for i in index}
        if hold:
            local_sel, kept = top.result()
            slot_of = dict(zip(local_sel.index, kept))
            for i, w in zip(index, weights):
                if i in mine_set and w != 0.0:  # a global winner of this share is one of its local top K
                    acc.add_(slots[slot_of[i]].to(acc.dtype), alpha=w)
            del slots
        elif cfg.references != "random":
            index, weights = self._shared_recompute(refs, index, weights, mine_set, acc)
            self._check_left(len(index), epoch)
        total = float(torch.as_tensor(weights, dtype=wide_dtype()).sum())
        if total == 0.0:
            raise ValueError("weights sum to zero: the weighted direction is undefined")
        g_r = (comm.sum(acc) / total).to(torch.float32)
        return index, weights, score_of, terms, g_r

    def _shared_recompute(self, refs, index: list[int], weights: list[float], mine: set, acc: torch.Tensor):
        """_recomputed in several processes: each computes again the chosen references of its share, a chunk at a
        time, adding the finite ones into `acc`; the flags are gathered so that every process leaves out the same
        ones (dropout may make a recomputed gradient non-finite). Returns the references and weights in the sum."""
        weight_of, rows = dict(zip(index, weights)), []
        for pos in self._chunks([i for i in index if i in mine]):
            out = self.per_sample_grads([refs[i] for i in pos])
            flags = _grad_flags(out.grads).reshape(-1).tolist()
            for j, i in enumerate(pos):
                loss = float(out.losses[j])
                rows.append((i, loss, flags[j]))
                if flags[j] == 0.0 and math.isfinite(loss) and weight_of[i] != 0.0:
                    acc.add_(out.grads[j].to(acc.dtype), alpha=weight_of[i])
            del out
        every = self.ctx.comm.gather(torch.tensor(rows, dtype=wide_dtype(acc.device), device=acc.device).reshape(-1, 3)).cpu()
        found = self._checked(refs, {int(r[0]): r for r in every.tolist()}, index)
        return found, [weight_of[i] for i in found]

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == 1 or (epoch > 1 and self.cfg.refresh == "epoch"):
            self.refresh(epoch)

    # -- warm-up and 2b/2c. task filtering + corrected step -----------------------------------------
    def step(self, planned: PlannedStep) -> dict:
        cfg, c = self.cfg, self.ctx
        if cfg.refresh == "steps" and planned.phase != "warmup" and self.n_gt >= cfg.refresh_steps:
            self.d_t = self.sum_gt / self.n_gt  # the task direction since the last refresh
            self.refresh(planned.epoch)
        # This process's share of the batch (all of it in one process; distributed.py): its rows are the batch's
        # positions start.. of the batch. Losses, token counts and cosines are gathered for the whole batch, in
        # batch order, so that every process selects the same samples as a single process would.
        ids = list(planned.ids)
        out, start = self._share_grads(ids)
        losses, tokens = c.comm.gather(out.losses), c.comm.gather(out.tokens)
        ok = c.finite_rows([c.task[i].id for i in ids], losses, c.comm.gather(_grad_flags(out.grads)))
        if not ok:  # train.nonfinite=skip left out every sample: nothing to step on, the loop skips the step
            raise NonFiniteError(**c.dropped[-1])
        if len(ok) < len(ids):
            mine = [i - start for i in ok if start <= i < start + len(out.losses)]
            start = sum(1 for i in ok if i < start)
            out, ids, losses, tokens = _rows(out, mine), [ids[i] for i in ok], losses[ok], tokens[ok]
        metrics = {"loss": float(losses.mean()), "tokens": int(tokens.sum()), "n_samples": len(planned.ids)}
        if planned.phase == "warmup":
            g = _shared_mean(c.comm, out.grads, len(ids))
            self.d_t += g
            set_grads(c.params, g)
            metrics.update(trained_samples=len(ids), trained_tokens=metrics["tokens"])
            if c.selection_log:
                c.selection_log.write({"kind": "warmup", "step": planned.index,
                                       "ids": [c.task[i].id for i in ids], "losses": losses.tolist(),
                                       "tokens": tokens.tolist()})
            return metrics

        cos = c.comm.gather(cosines(out.grads, self.g_r))
        if cfg.score_norm == "zscore":
            scores = task_scores(standardize(losses), standardize(cos), cfg.mu_task, cfg.nu)
        else:
            scores = task_scores(losses, cos, cfg.mu_task, cfg.nu)
        sel = select_task(scores, cfg.k_task, cfg.mode, cfg.tau_task, tokens=tokens.tolist(), budget=cfg.budget)
        g_t = _shared_direction(c.comm, out.grads, start, sel.index, sel.weights)
        self.sum_gt += g_t
        self.n_gt += 1
        step_dir = project_conflict(g_t, self.g_r) if cfg.correction == "project" else g_t
        set_grads(c.params, step_dir + cfg.rho * self.g_r)
        kept_losses = [float(losses[i]) for i in sel.index]
        tr_cos = cosine(g_t, self.g_r)
        if c.selection_log:
            c.selection_log.write({
                "kind": "step", "step": planned.index, "epoch": planned.epoch,
                "ids": [c.task[ids[i]].id for i in sel.index], "index": [ids[i] for i in sel.index],
                "weights": sel.weights, "scores": [float(scores[i]) for i in sel.index], "losses": kept_losses,
                "cosines": [float(cos[i]) for i in sel.index],
                "candidates": {"ids": [c.task[i].id for i in ids], "losses": losses.tolist(),
                               "cosines": cos.tolist(), "scores": scores.tolist(), "tokens": tokens.tolist()},
                "task_ref_cosine": tr_cos,
            })
        metrics.update(trained_samples=len(sel.index), trained_tokens=int(tokens[sel.index].sum()))
        metrics.update(kept=len(sel.index), kept_loss=sum(kept_losses) / len(kept_losses), task_ref_cosine=tr_cos)
        return metrics

    def _share_grads(self, ids: list[int]) -> tuple[PerSampleGrads, int]:
        """Per-sample losses and gradients of this process's share of the batch `ids` (task positions), and the
        position in the batch of the share's first sample."""
        c = self.ctx
        start, end = c.comm.share(len(ids))
        if end == start:  # a batch smaller than the number of processes leaves some without samples
            dev, n_params = c.device, sum(p.numel() for p in c.params)
            return PerSampleGrads(torch.zeros(0, dtype=torch.float32, device=dev),
                                  torch.zeros(0, dtype=torch.int64, device=dev),
                                  torch.zeros(0, n_params, dtype=torch.float32, device=dev)), start
        return self.per_sample_grads([c.task[i] for i in ids[start:end]]), start

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
