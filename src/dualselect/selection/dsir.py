"""DSIR's selection arithmetic as pure functions (no model): hashed n-gram features, the two
bag-of-n-grams models, importance log-weights and the kept set.

Xie et al., "Data Selection for Language Models via Importance Resampling", NeurIPS 2023.

* Features of a sample: every n-gram of orders 1..n (paper: unigrams + bigrams, n = 2) of a sequence
  of token ids, each hashed into one of ``buckets`` bins; a sample is its vector of bin counts.
  An n-gram is hashed as the text of its ids joined by spaces (``"17"``, ``"17 4051"``) with
  blake2b, so the bins do not depend on Python's hash seed.
* A bag-of-n-grams model of a set: the categorical distribution over bins estimated from the set's
  summed counts with additive smoothing, ``p(f) = (c_f + alpha) / (sum_f c_f + alpha * buckets)``.
* Importance log-weight of a sample x with bin counts ``c_f(x)``:
  ``log w(x) = sum_f c_f(x) * (log p_target(f) - log p_raw(f))``.
* Kept set: ``k`` samples by importance resampling without replacement, done as the Gumbel top-k
  trick (the k largest ``log w + G``, ``G ~ Gumbel(0, 1)`` i.i.d., drawn from a generator seeded
  with ``seed``), or deterministically the k largest ``log w`` (``mode="topk"``). Equal keys: the
  earlier position wins. Everything is float64.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from functools import lru_cache
from typing import Sequence

import torch

MODES = ("gumbel", "topk")


@lru_cache(maxsize=1 << 20)
def hash_ngram(gram: tuple[int, ...], buckets: int) -> int:
    """The bin of one n-gram of token ids (a tuple; memoised: the same n-grams recur across samples)."""
    text = " ".join(str(int(t)) for t in gram).encode("ascii")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") % buckets


def ngram_features(ids: Sequence[int], buckets: int, n: int = 2) -> Counter:
    """Bin -> count over every n-gram of orders 1..n of `ids` (a sequence of length L has L - m + 1
    m-grams)."""
    _check_positive(buckets, "buckets")
    _check_positive(n, "n (n-gram order)")
    ids = [int(t) for t in ids]
    counts: Counter = Counter()
    for m in range(1, n + 1):
        for start in range(len(ids) - m + 1):
            counts[hash_ngram(tuple(ids[start:start + m]), buckets)] += 1
    return counts


def bag_log_probs(features: Sequence[Counter], buckets: int, smoothing: float = 1.0) -> torch.Tensor:
    """log p(f) [buckets] (float64) of the bag-of-n-grams model fitted on `features` (one Counter per
    sample), with additive smoothing `smoothing` > 0 added to every bin's count."""
    _check_positive(buckets, "buckets")
    if not (isinstance(smoothing, (int, float)) and math.isfinite(smoothing) and smoothing > 0):
        raise ValueError(f"smoothing must be a positive finite number, got {smoothing!r}")
    counts = torch.zeros(buckets, dtype=torch.float64)
    for feats in features:
        for f, c in feats.items():
            if not 0 <= f < buckets:
                raise ValueError(f"feature bin {f} is outside [0, {buckets})")
            counts[f] += c
    counts += smoothing
    return counts.log() - counts.sum().log()


def log_importance_weights(features: Sequence[Counter], log_p_target: torch.Tensor,
                           log_p_raw: torch.Tensor) -> list[float]:
    """``sum_f c_f(x) * (log p_target(f) - log p_raw(f))`` for every sample x."""
    if log_p_target.shape != log_p_raw.shape or log_p_target.dim() != 1:
        raise ValueError(f"the two models must be 1-D and of one size, got {tuple(log_p_target.shape)} "
                         f"and {tuple(log_p_raw.shape)}")
    diff = (log_p_target.to(torch.float64) - log_p_raw.to(torch.float64)).tolist()
    return [math.fsum(c * diff[f] for f, c in feats.items()) for feats in features]


def keep_count(n: int, fraction: float) -> int:
    """How many of `n` samples a fraction keeps: round(fraction * n) (halves up), at least 1."""
    if n < 1:
        raise ValueError("no samples to select from")
    if not (0 < fraction <= 1):
        raise ValueError(f"the kept fraction must be in (0, 1], got {fraction!r}")
    return max(1, min(n, math.floor(fraction * n + 0.5)))


def gumbel_noise(n: int, seed: int) -> torch.Tensor:
    """n i.i.d. standard Gumbel draws (float64) from a CPU generator seeded with `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(n, generator=g, dtype=torch.float64)
    u = u.clamp(min=torch.finfo(torch.float64).tiny)  # rand is in [0, 1): avoid log(0)
    return -torch.log(-torch.log(u))


def select(log_weights: Sequence[float], k: int, mode: str = "gumbel", seed: int = 0) -> tuple[list[int], list[float]]:
    """Positions of the `k` kept samples, best key first, and their keys.

    gumbel: key = log w + Gumbel noise (importance resampling without replacement); topk: key = log w."""
    if mode not in MODES:
        raise ValueError(f"unknown DSIR selection mode {mode!r}: expected one of {', '.join(MODES)}")
    w = torch.as_tensor(list(log_weights), dtype=torch.float64)
    n = w.numel()
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} samples")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("log-weights must be finite")
    keys = w + gumbel_noise(n, seed) if mode == "gumbel" else w
    order = sorted(range(n), key=lambda i: (-float(keys[i]), i))[:k]
    return order, [float(keys[i]) for i in order]


def _check_positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
