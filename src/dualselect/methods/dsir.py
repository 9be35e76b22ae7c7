"""DSIR: data selection by importance resampling (Xie, Santurkar, Ma, Liang, "Data Selection for
Language Models via Importance Resampling", NeurIPS 2023, arXiv 2302.03169).

Before training, every task sample gets an importance log-weight
``log p_target(x) - log p_raw(x)`` under two bag-of-hashed-n-grams models, target = the reference pool
(data.reference), raw = the task set; a fraction `keep` of the task set is resampled by these weights
(without replacement), and plain SFT (as methods/sft.py) trains on the kept samples for train.epochs.
The arithmetic is in selection/dsir.py.

Paper / authors' release vs ours:

  ================  =======================================  =========================================
  what              paper (release)                          ours
  ================  =======================================  =========================================
  text of a sample  the raw text, lower-cased, word-         the token ids of prompt + response (the
                    tokenized (nltk)                         Encoded's input_ids, template tokens
                                                             included, after data.max_length)
  features          unigrams + bigrams hashed into 10000     the same (ngrams=2, buckets=10000), over
                    bins                                     token ids instead of words
  smoothing         1e-8 added to each bin's probability     additive: `smoothing` (1.0) added to each
                                                             bin's count
  how many kept     a fixed number of documents              a fraction `keep` of the task set (0.5),
                                                             round(keep * n), at least 1
  resampling        Gumbel top-k on log-weights (default),   the same (mode=gumbel, noise seeded from
                    or top-k                                 train.seed), or mode=topk
  after selection   pre-train / continue training on it      plain LoRA SFT on the kept samples
  ================  =======================================  =========================================

Our reading: ctx carries token ids, not text, so the features are over token ids (a tokenizer is not
in reach of the method); the chat template's special tokens appear in both sets and roughly cancel
in the log-ratio. The selection is a pure function of the data, the options and the seed, so a
resumed run recomputes the same kept set (the checkpoint stores it and checks that it is the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..schedule import PlannedStep, batch_plan
from ..selection.dsir import (
    MODES,
    bag_log_probs,
    keep_count,
    log_importance_weights,
    ngram_features,
    select,
)
from . import register
from .sft import supervised_step
from .context import TrainContext


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DSIRConfig:
    keep: float = _opt(0.5, "fraction of the task set kept (round(keep * n), at least 1)")
    buckets: int = _opt(10000, "hash bins of the n-gram features (paper: 10000)")
    ngrams: int = _opt(2, "n-gram orders 1..ngrams are features (paper: 2, unigrams + bigrams)")
    smoothing: float = _opt(1.0, "additive smoothing: pseudo-count added to every bin of both bag-of-n-grams models")
    mode: Literal["gumbel", "topk"] = _opt(
        "gumbel", "gumbel: importance resampling without replacement (Gumbel top-k, seeded from train.seed, the "
                  "paper's); topk: the highest log-weights, deterministic")

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not (0 < self.keep <= 1):
            raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        if isinstance(self.buckets, bool) or not isinstance(self.buckets, int) or self.buckets < 1:
            raise ValueError(f"buckets must be a positive integer, got {self.buckets!r}")
        if isinstance(self.ngrams, bool) or not isinstance(self.ngrams, int) or self.ngrams < 1:
            raise ValueError(f"ngrams must be a positive integer (2: unigrams + bigrams), got {self.ngrams!r}")
        if isinstance(self.smoothing, bool) or not isinstance(self.smoothing, (int, float)) or not self.smoothing > 0:
            raise ValueError(f"smoothing must be > 0 (a pseudo-count per bin), got {self.smoothing!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@register("dsir", summary="keep the task samples whose hashed n-grams look most like the reference pool "
                           "(importance resampling), then plain SFT on them",
          paper='Xie et al., "Data Selection for Language Models via Importance Resampling", NeurIPS 2023 '
                "(arXiv 2302.03169)", needs="task+reference")
class DSIR:
    Config = DSIRConfig

    def __init__(self, cfg: DSIRConfig, ctx: TrainContext):
        if not ctx.reference:
            raise ValueError("dsir needs a reference pool (the target distribution): set data.reference")
        if not ctx.task:
            raise ValueError("dsir needs task samples to select from")
        self.cfg, self.ctx = cfg, ctx
        task_feats = [ngram_features(e.input_ids, cfg.buckets, cfg.ngrams) for e in ctx.task]
        ref_feats = [ngram_features(e.input_ids, cfg.buckets, cfg.ngrams) for e in ctx.reference]
        log_p_raw = bag_log_probs(task_feats, cfg.buckets, cfg.smoothing)
        log_p_target = bag_log_probs(ref_feats, cfg.buckets, cfg.smoothing)
        self.log_weights = log_importance_weights(task_feats, log_p_target, log_p_raw)
        self.k = keep_count(len(ctx.task), cfg.keep)
        self.ranked, self.keys = select(self.log_weights, self.k, cfg.mode, ctx.seed)
        self.kept = sorted(self.ranked)  # task positions; the training plan runs over this list

    def plan(self) -> list[PlannedStep]:
        c = self.ctx
        plan = batch_plan(len(self.kept), c.batch_size, c.epochs, c.seed)
        return [replace(s, ids=tuple(self.kept[j] for j in s.ids)) for s in plan]

    def on_epoch_start(self, epoch: int) -> None:
        # Logged here, not in __init__: the loop truncates the logs after constructing the method.
        if epoch == 1 and self.ctx.selection_log:
            c = self.ctx
            self.ctx.selection_log.write({
                "kind": "dsir", "mode": self.cfg.mode, "n_task": len(c.task), "n_reference": len(c.reference),
                "k": self.k, "ids": [c.task[i].id for i in self.ranked], "index": self.ranked,
                "log_weights": [self.log_weights[i] for i in self.ranked], "keys": self.keys,
                "candidates": {"ids": [e.id for e in c.task], "log_weights": self.log_weights},
            })

    def step(self, planned: PlannedStep) -> dict:
        return supervised_step(self.ctx, [self.ctx.task[i] for i in planned.ids])

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kept": list(self.kept)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["kept"]) != self.kept:
            raise ValueError("dsir: the checkpoint was trained on another kept set (the task or reference data "
                             "changed since); start a new run")
