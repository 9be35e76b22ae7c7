"""DualSelect's selection rules as pure functions: scores in, chosen positions and weights out.

Nothing here touches a model. The trainer computes per-sample losses and flattened gradients, and
these functions turn them into cosines, scores, selections and weighted directions.

Conventions
-----------
* Reference score ``s_r = mu_R * loss(r) - nu * cos(g(r), d_T)``: a *high* score means the reference is
  poorly preserved and conflicts with the task direction, so references keep the **highest** scores.
* Task score ``s_i = mu_T * loss(i) - nu * cos(g(i), g_R)``: a *low* score means an easy sample that
  agrees with the reference direction, so task samples keep the **lowest** scores.
* Ranking is always by score, and equal scores are ordered by position: the earlier index wins, in
  every mode (hard or soft, task or reference, batch or streaming). In soft mode the weights are a
  monotone function of the score, so "the k largest weights" and "the k best scores" are the same set;
  ranking by the score avoids ties that appear only because two different weights round (or underflow)
  to the same float.
* All arithmetic on scores, weights and cosines is done in float64 (float32 on a device without float64, Apple
  MPS: selection/dtypes.py); directions come back as float32.

Why a running top-k is enough in soft mode
------------------------------------------
Soft reference weights are ``q_r = exp(s_r / tau) / Z`` with ``Z`` summed over *every* scored
reference, and only the K_R largest are kept. The reference direction is the weighted mean
``g_R = sum_r q_r g(r) / sum_r q_r`` over the kept ones, and there the common factor ``1 / Z``
cancels: g_R depends only on which references are the K_R best by score and on the ratios
``exp((s_r - s_r') / tau)`` between them. So a refresh never needs every reference gradient at once:
:class:`RunningTopK` streams through the pool holding at most K_R gradients (a heap of the best so
far) plus a running, numerically stable log-sum-exp of ``s / tau``. That log-sum-exp is only needed
to report the exact softmax weights (the selection log shows the full-softmax ``q``), not for g_R.
"""

from __future__ import annotations

import heapq
import math
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from .dtypes import wide_dtype

EPS = 1e-12

_MODES = ("hard", "soft")
# Rows of a gradient matrix converted to float64 at a time in `cosines` (bounds the temporary copy).
_COSINE_CHUNK_ELEMENTS = 1 << 24

__all__ = [
    "EPS",
    "Selection",
    "RunningTopK",
    "cosine",
    "cosines",
    "reference_scores",
    "task_scores",
    "select_references",
    "select_task",
    "weighted_direction",
    "WeightedSum",
    "project_conflict",
    "in_conflict",
    "standardize",
]


@dataclass(frozen=True)
class Selection:
    """The outcome of one selection.

    ``index`` holds positions into the candidate list in selection order (best first); ``weights``
    holds the matching weights in the same order (1.0 in hard mode, the softmax weight in soft mode).
    """

    index: list[int]
    weights: list[float]

    def __len__(self) -> int:
        return len(self.index)


# ----------------------------------------------------------------------------------------------
# validation helpers


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"unknown selection mode {mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def _check_tau(tau: Any) -> float:
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"temperature tau must be a positive number, got {tau!r}") from None
    if not (value > 0.0) or math.isinf(value):
        raise ValueError(f"temperature tau must be a positive finite number, got {tau!r}")
    return value


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # int, numpy integer, integer 0-d tensor
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _as_vector(values: Any, name: str) -> torch.Tensor:
    """A 1-D float64 CPU tensor of finite values."""
    if isinstance(values, torch.Tensor):
        t = values.detach().cpu().to(wide_dtype())
    else:
        try:
            t = torch.as_tensor(list(values), dtype=wide_dtype())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a sequence of numbers ({exc})") from None
    if t.dim() == 0:
        raise ValueError(f"{name} must be a 1-D sequence, got a scalar")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).nonzero()[0])
        raise ValueError(f"{name} must be finite; position {bad} is {t[bad].item()}")
    return t


def _order(scores: torch.Tensor, descending: bool) -> list[int]:
    """Positions sorted by score (highest first if ``descending``), ties by ascending position."""
    vals = scores.tolist()
    if descending:
        return sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    return sorted(range(len(vals)), key=lambda i: (vals[i], i))


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """float64 softmax of a 1-D tensor (stable: exp(x - logsumexp(x)))."""
    if x.numel() == 0:
        return x.clone()
    return torch.exp(x - torch.logsumexp(x, dim=0))


# ----------------------------------------------------------------------------------------------
# cosines and scores


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> float:
    """``<a, b> / ((|a| + eps) (|b| + eps))`` of two tensors (flattened), accumulated in float64.

    A zero vector on either side gives exactly 0.0, whatever eps (also eps = 0: never 0/0 = NaN).
    """
    a64 = a.detach().reshape(-1).to(wide_dtype(a.device))
    b64 = b.detach().reshape(-1).to(device=a64.device, dtype=a64.dtype)
    if a64.numel() != b64.numel():
        raise ValueError(f"cosine of tensors with different sizes: {a64.numel()} vs {b64.numel()}")
    norm_a, norm_b = torch.linalg.vector_norm(a64), torch.linalg.vector_norm(b64)
    if float(norm_a) == 0.0 or float(norm_b) == 0.0:
        return 0.0
    return float(torch.dot(a64, b64) / ((norm_a + eps) * (norm_b + eps)))


def cosines(G: torch.Tensor, d: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Row-wise :func:`cosine` of ``G`` [n, P] with ``d`` [P], as a float64 tensor [n].

    Computed in float64 a block of rows at a time (the float64 copy never exceeds a fixed size).
    If ``d`` is the zero vector (e.g. no warm-up), every cosine is exactly 0; so is that of a zero row of ``G``
    (a sample whose gradient vanishes), whatever eps.
    """
    if G.dim() != 2:
        raise ValueError(f"cosines expects a 2-D matrix G [n, P], got shape {tuple(G.shape)}")
    d64 = d.detach().reshape(-1).to(device=G.device, dtype=wide_dtype(G.device))
    n, p = G.shape
    if d64.numel() != p:
        raise ValueError(f"cosines: G has {p} columns but d has {d64.numel()} elements")
    out = torch.zeros(n, dtype=d64.dtype, device=G.device)
    d_norm = torch.linalg.vector_norm(d64)
    if n == 0 or float(d_norm) == 0.0:
        return out
    rows = max(1, _COSINE_CHUNK_ELEMENTS // max(p, 1))
    for start in range(0, n, rows):
        block = G[start : start + rows].detach().to(d64.dtype)
        dots = block @ d64
        norms = torch.linalg.vector_norm(block, dim=1)
        out[start : start + rows] = torch.where(norms > 0, dots / ((norms + eps) * (d_norm + eps)), 0.0)
    return out


def _scores(losses: Any, cos: Any, mu: float, nu: float) -> torch.Tensor:
    loss_t = _as_vector(losses, "losses")
    cos_t = _as_vector(cos, "cosines")
    if loss_t.numel() != cos_t.numel():
        raise ValueError(f"{loss_t.numel()} losses but {cos_t.numel()} cosines")
    return float(mu) * loss_t - float(nu) * cos_t


def reference_scores(losses: Any, cos: Any, mu_ref: float = 1.0, nu: float = 1.0) -> torch.Tensor:
    """``s_r = mu_R * loss - nu * cos`` (float64); high = poorly preserved and conflicting = keep."""
    return _scores(losses, cos, mu_ref, nu)


def task_scores(losses: Any, cos: Any, mu_task: float = 1.0, nu: float = 1.0) -> torch.Tensor:
    """``s_i = mu_T * loss - nu * cos`` (float64); low = easy and reference-compatible = keep."""
    return _scores(losses, cos, mu_task, nu)


# ----------------------------------------------------------------------------------------------
# selections


def select_references(scores: Any, k: int, mode: str = "hard", tau: float = 0.1) -> Selection:
    """Keep the ``k`` highest-scoring references (all of them if ``k`` exceeds their number).

    hard: weight 1 each. soft: ``q = softmax(s / tau)`` over ALL scores; the kept ones are the k
    largest q (= the k highest scores) with weight q. Ties: the earlier position wins.
    """
    _check_mode(mode)
    k = _check_int(k, "k (references to keep)")
    if k < 1:
        raise ValueError(f"k (references to keep) must be at least 1, got {k}")
    s = _as_vector(scores, "scores")
    if mode == "soft":
        tau = _check_tau(tau)
    keep = _order(s, descending=True)[:k]
    if mode == "hard":
        return Selection(index=keep, weights=[1.0] * len(keep))
    q = _softmax(s / tau).tolist()
    return Selection(index=keep, weights=[q[i] for i in keep])


def _budget_fraction(budget: Any) -> Fraction:
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}") from None
    if not (0.0 < value <= 1.0):
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    # The shortest decimal that round-trips (what the user wrote: 0.7 -> 7/10), so that
    # "0.7 of 10 tokens" is exactly 7 and not 7.000000000000001.
    return Fraction(repr(value))


def _token_counts(tokens: Any, n: int) -> list[int]:
    if tokens is None:
        raise ValueError("a token budget needs tokens (the supervised-token count of every sample)")
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        raw = tokens.tolist()
    else:
        raw = list(tokens)
    if len(raw) != n:
        raise ValueError(f"tokens has {len(raw)} entries but there are {n} scores")
    counts = []
    for pos, t in enumerate(raw):
        if isinstance(t, bool) or float(t) != int(float(t)) or int(float(t)) < 0:
            raise ValueError(f"tokens must be non-negative integers; position {pos} is {t!r}")
        counts.append(int(float(t)))
    return counts


def select_task(
    scores: Any,
    k: int | None,
    mode: str = "hard",
    tau: float = 0.1,
    tokens: Any = None,
    budget: float | None = None,
) -> Selection:
    """Keep the lowest-scoring task samples of a mini-batch.

    hard: the ``k`` lowest scores with weight 1 (``k <= 0``, ``None`` or ``k >= n``: all samples).
    soft: ``p = softmax(-s / tau)`` over the batch; the ``k`` largest p (all if ``k <= 0``) with
    weight p. Token budget (hard mode only; ``k`` is then ignored): walk the samples by ascending score
    and keep them until the kept supervised tokens reach ``budget * sum(tokens)``; the sample that
    reaches the threshold is kept, and at least one sample always is. Ties: the earlier position wins.
    """
    _check_mode(mode)
    s = _as_vector(scores, "scores")
    n = s.numel()
    if mode == "soft":
        tau = _check_tau(tau)
    if budget is not None:
        frac = _budget_fraction(budget)
        if mode != "hard":
            raise ValueError("a token budget works in hard mode only (got mode='soft')")
        counts = _token_counts(tokens, n)
        order = _order(s, descending=False)
        if n == 0:
            return Selection(index=[], weights=[])
        total = sum(counts)
        keep: list[int] = []
        kept = 0
        for i in order:
            keep.append(i)
            kept += counts[i]
            # kept >= frac * total, exactly in rationals
            if kept * frac.denominator >= frac.numerator * total:
                break
        return Selection(index=keep, weights=[1.0] * len(keep))
    if tokens is not None:
        _token_counts(tokens, n)  # not used without a budget, but still checked
    if k is None:
        k = 0
    k = _check_int(k, "k (task samples to keep)")
    order = _order(s, descending=False)
    keep = order if k <= 0 else order[:k]
    if mode == "hard":
        return Selection(index=keep, weights=[1.0] * len(keep))
    p = _softmax(-s / tau).tolist()
    return Selection(index=keep, weights=[p[i] for i in keep])


# ----------------------------------------------------------------------------------------------
# directions


class WeightedSum:
    """``sum_i w_i g_i / sum_i w_i`` built one gradient at a time: :func:`weighted_direction` without holding the
    gradients (a refresh adds each chosen gradient as it is computed or released). Holds a float64 accumulator
    [P] and the weights; the float operations and their order are those of :func:`weighted_direction` on the same
    rows, so the result has the same bits."""

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None
        self._weights: list[float] = []

    def __len__(self) -> int:
        return len(self._weights)

    def add(self, g: torch.Tensor, weight: float) -> None:
        w = float(weight)
        if not math.isfinite(w):
            raise ValueError(f"weights must be finite, got {weight!r}")
        if w < 0:
            raise ValueError("weights must be non-negative")
        g = g.detach().reshape(-1)
        if self._acc is None:
            self._acc = torch.zeros(g.numel(), dtype=wide_dtype(g.device), device=g.device)
        if g.numel() != self._acc.numel():
            raise ValueError(f"gradient {len(self)} has {g.numel()} elements, gradient 0 has {self._acc.numel()}")
        if w != 0.0:
            self._acc.add_(g.to(device=self._acc.device, dtype=self._acc.dtype), alpha=w)
        self._weights.append(w)

    def result(self) -> torch.Tensor:
        """The weighted mean as float32 [P]; the sum is spent (its accumulator is divided in place)."""
        if self._acc is None:
            raise ValueError("weighted_direction of an empty selection")
        total = float(torch.as_tensor(self._weights, dtype=wide_dtype()).sum())
        if total == 0.0:
            raise ValueError("weights sum to zero: the weighted direction is undefined")
        acc, self._acc, self._weights = self._acc, None, []
        return acc.div_(total).to(torch.float32)


def weighted_direction(G: Any, weights: Any) -> torch.Tensor:
    """``sum_i w_i g_i / sum_i w_i`` as a float32 vector [P] (accumulated in float64).

    ``G`` is a matrix [n, P] or a sequence of n tensors with P elements each (e.g. the payloads of
    :class:`RunningTopK`; a list is read as it is, never stacked). Weights must be finite, non-negative and not
    sum to zero.
    """
    rows = list(G) if not isinstance(G, torch.Tensor) else (list(G.unbind(0)) if G.dim() == 2 else None)
    if rows is None:
        raise ValueError(f"weighted_direction expects G [n, P], got shape {tuple(G.shape)}")
    w = _as_vector(weights, "weights")
    if len(rows) == 0:
        raise ValueError("weighted_direction of an empty selection")
    if w.numel() != len(rows):
        raise ValueError(f"{len(rows)} gradients but {w.numel()} weights")
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    if float(w.sum()) == 0.0:
        raise ValueError("weights sum to zero: the weighted direction is undefined")
    acc = WeightedSum()
    for wi, g in zip(w.tolist(), rows):
        acc.add(g, wi)
    return acc.result()


def standardize(values: Any) -> torch.Tensor:
    """z-scores within one candidate set, float64: (x - mean) / std (population std); all zeros when the
    values are all equal (or there is one). `score_norm: zscore` puts the loss term and the cosine term on
    this common scale before mu and nu weigh them (ours, not the paper's)."""
    x = _as_vector(values, "values")
    if x.numel() == 0:
        return x
    sd = float(x.std(unbiased=False))
    if not sd > 0.0:
        return torch.zeros_like(x)
    return (x - x.mean()) / sd


# A reference gradient below this fraction of the task gradient's norm is float rounding noise (e.g. the KL
# gradient of a fresh adapter: analytically 0, ~5e-10 in float32 against |g_T| ~ 1), whose direction means
# nothing: projecting g_T away from it would remove an arbitrary component of g_T.
NOISE_RATIO = 1e-6


def in_conflict(g_t: torch.Tensor, g_r: torch.Tensor) -> bool:
    """<g_t, g_r> < 0 with g_r above the noise floor (|g_r| > NOISE_RATIO * |g_t|), in float64."""
    t64 = g_t.detach().reshape(-1).to(wide_dtype(g_t.device))
    r64 = g_r.detach().reshape(-1).to(device=t64.device, dtype=t64.dtype)
    if t64.numel() != r64.numel():
        raise ValueError(f"project_conflict: sizes differ ({t64.numel()} vs {r64.numel()})")
    return float(torch.dot(t64, r64)) < 0.0 and float(r64.norm()) > NOISE_RATIO * float(t64.norm())


def project_conflict(g_t: torch.Tensor, g_r: torch.Tensor) -> torch.Tensor:
    """PCGrad-style projection of g_t away from g_r (DualSelect's `correction: project` ablation, SafeGrad's
    update; not DualSelect's default additive correction).

    If in_conflict(g_t, g_r) (``<g_t, g_r> < 0`` and g_r is not rounding noise) return
    ``g_t - <g_t, g_r> / |g_r|^2 * g_r`` (now orthogonal to g_r); otherwise return ``g_t`` unchanged. Computed in
    float64, returned in g_t's dtype and shape.
    """
    if not in_conflict(g_t, g_r):
        return g_t
    t64 = g_t.detach().reshape(-1).to(wide_dtype(g_t.device))
    r64 = g_r.detach().reshape(-1).to(device=t64.device, dtype=t64.dtype)
    out = t64 - (float(torch.dot(t64, r64)) / float(torch.dot(r64, r64))) * r64
    return out.to(g_t.dtype).reshape(g_t.shape)


# ----------------------------------------------------------------------------------------------
# streaming reference refresh


class RunningTopK:
    """Streaming reference refresh that never holds every gradient.

    Push ``(score, index, payload)`` one reference at a time; only the ``k`` best so far are kept
    (a min-heap whose root is the current worst: lowest score, and the later index among equal
    scores), so a payload is released as soon as it falls out of the top k. For soft weights it also
    keeps a running log-sum-exp of ``score / tau`` over every pushed score. :meth:`result` gives the
    same :class:`Selection` that :func:`select_references` gives on all pushed scores (indices are
    the positions used for tie-breaking and must be distinct), plus the kept payloads in that order.
    """

    def __init__(self, k: int, mode: str = "hard", tau: float = 0.1):
        _check_mode(mode)
        k = _check_int(k, "k (references to keep)")
        if k < 1:
            raise ValueError(f"k (references to keep) must be at least 1, got {k}")
        self.k = k
        self.mode = mode
        self.tau = _check_tau(tau) if mode == "soft" else tau
        self.n_seen = 0
        # entries: (score, -index, payload); min-heap -> root is the worst kept entry.
        # Indices are distinct, so comparisons never reach the payload.
        self._heap: list[tuple[float, int, Any]] = []
        self._seen: set[int] = set()
        self._lse_max = -math.inf  # running max of score / tau
        self._lse_sum = 0.0  # sum of exp(score / tau - _lse_max)

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, score: float, index: int, payload: Any) -> Any:
        """Add one scored candidate. Returns the payload this push drops (None when nothing is dropped): the old
        worst one's when this one enters a full top k, this one's when it does not enter (so that a caller keeping
        payloads in fixed slots knows which slot is free again)."""
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"score of index {index} must be finite, got {score}")
        index = _check_int(index, "index")
        if index in self._seen:
            raise ValueError(f"index {index} was already pushed")
        self._seen.add(index)
        self.n_seen += 1
        if self.mode == "soft":
            x = score / self.tau
            if x > self._lse_max:
                self._lse_sum = self._lse_sum * math.exp(self._lse_max - x) + 1.0
                self._lse_max = x
            else:
                self._lse_sum += math.exp(x - self._lse_max)
        entry = (score, -index, payload)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
            return None
        if entry[:2] > self._heap[0][:2]:
            return heapq.heapreplace(self._heap, entry)[2]  # the old worst (and its payload) is dropped here
        return payload  # not among the k best; the payload is not kept

    def admits(self, score: float, index: int) -> bool:
        """Whether ``push(score, index, payload)`` would keep the payload now: a caller can skip making a payload
        (e.g. copying a gradient) that would be dropped at once, and push ``None`` instead."""
        return len(self._heap) < self.k or (float(score), -index) > self._heap[0][:2]

    def log_normalizer(self) -> float:
        """``log sum exp(s / tau)`` over every pushed score (soft mode; -inf before any push)."""
        if self.mode != "soft":
            raise ValueError("log_normalizer is tracked in soft mode only")
        if self.n_seen == 0:
            return -math.inf
        return self._lse_max + math.log(self._lse_sum)

    def result(self) -> tuple[Selection, list]:
        ranked = sorted(self._heap, key=lambda e: (-e[0], -e[1]))
        index = [-e[1] for e in ranked]
        payloads = [e[2] for e in ranked]
        if self.mode == "hard":
            weights = [1.0] * len(ranked)
        else:
            lse = self.log_normalizer()
            weights = [math.exp(e[0] / self.tau - lse) for e in ranked]
        return Selection(index=index, weights=weights), payloads
