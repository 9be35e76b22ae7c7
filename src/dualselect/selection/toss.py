"""TOSS's token selection as pure functions: per-token losses in, the masked tokens out.

Nothing here touches a model. The method (methods/toss.py) computes, for every task sample, the NLL
of each of its response tokens under two reference models; these functions turn them into risk
scores and choose the tokens to mask.

Conventions
-----------
* Risk score of a token: ``s = loss_utility - loss_harmful``. It is high when the safety-degraded
  (harmful) reference predicts the token much better than the utility-oriented one: the token is
  what harmful fine-tuning teaches, so it is masked first. Same sign as the authors' release
  (``loss(utility model) - loss(safety model)``, top fraction discarded).
* A sample is a list of scores, one per response token, in position order; the masks come back as
  positions into that list (ascending), one list per sample.
* Count: ``floor(fraction * n)`` tokens, computed exactly in rationals from the fraction as written
  (0.29 of 100 tokens is 29, not the 28 that ``int(0.29 * 100)`` gives). ``n`` is the number of
  response tokens of the whole set (scope ``global``) or of each sample (scope ``sample``); the
  release also rounds down (``int(n * data_prop)``).
* Ties: the higher score first, then the earlier sample, then the earlier position.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

SCOPES = ("global", "sample")

__all__ = ["SCOPES", "fraction_of", "token_risk_scores", "top_fraction_mask"]


def _fraction(fraction) -> Fraction:
    if isinstance(fraction, bool):
        raise ValueError(f"mask fraction must be a number in [0, 1), got {fraction!r}")
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"mask fraction must be a number in [0, 1), got {fraction!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"mask fraction must be in [0, 1), got {fraction!r}")
    return Fraction(repr(value))  # the shortest decimal that round-trips: what the user wrote


def fraction_of(fraction, n: int) -> int:
    """``floor(fraction * n)``, exact (see the module docstring)."""
    f = _fraction(fraction)
    if n < 0:
        raise ValueError(f"token count must be >= 0, got {n}")
    return (f.numerator * n) // f.denominator


def _rows(values: Sequence[Sequence[float]], name: str) -> list[list[float]]:
    rows = []
    for i, row in enumerate(values):
        r = [float(x) for x in row]
        for j, x in enumerate(r):
            if not math.isfinite(x):
                raise ValueError(f"{name}: sample {i}, token {j} is {x} (must be finite)")
        rows.append(r)
    return rows


def token_risk_scores(loss_utility: Sequence[Sequence[float]],
                      loss_harmful: Sequence[Sequence[float]]) -> list[list[float]]:
    """Per-sample lists of ``loss_utility - loss_harmful``, token by token."""
    lu, lh = _rows(loss_utility, "loss_utility"), _rows(loss_harmful, "loss_harmful")
    if len(lu) != len(lh):
        raise ValueError(f"{len(lu)} samples of utility losses but {len(lh)} of harmful losses")
    out = []
    for i, (a, b) in enumerate(zip(lu, lh)):
        if len(a) != len(b):
            raise ValueError(f"sample {i}: {len(a)} utility losses but {len(b)} harmful losses")
        out.append([x - y for x, y in zip(a, b)])
    return out


def top_fraction_mask(scores: Sequence[Sequence[float]], fraction, scope: str = "global") -> list[list[int]]:
    """The tokens to mask: the ``floor(fraction * n)`` highest scores, over the whole set (``global``)
    or within each sample (``sample``). Returns, per sample, the chosen positions in ascending order."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}: expected one of {', '.join(SCOPES)}")
    rows = _rows(scores, "scores")
    _fraction(fraction)
    chosen: list[list[int]] = [[] for _ in rows]
    if scope == "global":
        flat = [(-s, i, j) for i, row in enumerate(rows) for j, s in enumerate(row)]
        flat.sort()
        for _, i, j in flat[:fraction_of(fraction, len(flat))]:
            chosen[i].append(j)
    else:
        for i, row in enumerate(rows):
            order = sorted(range(len(row)), key=lambda j: (-row[j], j))
            chosen[i] = order[:fraction_of(fraction, len(row))]
    return [sorted(c) for c in chosen]
