"""SEAL's pure arithmetic (no model): the upper-level weight schedule, the selector's sample weights and
its (first-order) loss, and the top-p keep rule. methods/seal.py gathers the losses and runs the
optimisers; everything here is checked by hand in tests/unit/test_method_seal.py.

Conventions
-----------
* Upper-level weight ``lambda_e = penalty - (e - 1) * penalty_decay`` in selector epoch ``e = 1..E``
  (the authors' release: ``upperlevel_weight``, minus ``upperlevel_weight_decay`` from the second epoch
  on). The lower level minimises ``lambda_e * L_ref + (1 - lambda_e) * L_task(weights)``; a falling
  lambda is the paper's penalty constant gamma rising (``lambda = 1 / (1 + gamma)`` up to scale).
* Sample weights: ``softmax`` -> ``n * softmax(w)`` over the *whole* task set (mean weight 1; the
  release's default), ``sigmoid`` -> ``2 * sigmoid(w)`` (weight 1 at w = 0).
* Keep rule: ``k = max(1, floor(p * n))`` samples (the release's ``int(topp * n)``; a 1e-9 slack absorbs
  float error, so 0.29 * 100 keeps 29, not 28), the highest logits first; equal logits: the earlier
  position wins.
"""

from __future__ import annotations

import math

import torch

ACTIVATIONS = ("softmax", "sigmoid")

__all__ = ["ACTIVATIONS", "penalty_schedule", "selector_weights", "selector_loss", "n_keep", "keep_top"]


def penalty_schedule(penalty: float, decay: float, epochs: int) -> list[float]:
    """The upper-level weight of each selector epoch: ``[penalty - e * decay for e in 0..epochs-1]``.

    Raises ValueError unless every weight lies in [0, 1] (``penalty`` in (0, 1], ``decay >= 0``)."""
    if not (0.0 < penalty <= 1.0):
        raise ValueError(f"penalty (initial upper-level weight) must be in (0, 1], got {penalty!r}")
    if decay < 0:
        raise ValueError(f"penalty_decay must be >= 0, got {decay!r}")
    if epochs < 1:
        raise ValueError(f"selector epochs must be >= 1, got {epochs!r}")
    out = [penalty - e * decay for e in range(epochs)]
    if out[-1] < -1e-12:
        raise ValueError(f"the upper-level weight becomes negative: penalty {penalty} - ({epochs} - 1) * "
                         f"penalty_decay {decay} = {out[-1]:.6g} (lower penalty_decay or selector_epochs)")
    return [max(0.0, w) for w in out]


def selector_weights(logits: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """Weights of every task sample from the selector logits [n] (differentiable)."""
    if activation == "softmax":
        return logits.numel() * torch.softmax(logits, dim=0)
    if activation == "sigmoid":
        return 2.0 * torch.sigmoid(logits)
    raise ValueError(f"unknown selector activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")


def selector_loss(logits: torch.Tensor, ids, losses: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """The selector's objective on one task batch: ``mean_b weight(w)[ids_b] * loss_b`` with the per-sample
    losses taken as constants. Its gradient in w is the first-order (penalty) hypergradient of the
    memory-efficient variant: the lower-level objective's gradient in w at the current proxy weights."""
    idx = torch.as_tensor(list(ids), dtype=torch.long, device=logits.device)
    return (selector_weights(logits, activation)[idx] * losses.detach().to(logits.dtype)).mean()


def n_keep(p: float, n: int) -> int:
    """How many of ``n`` samples the top-p rule keeps: ``max(1, floor(p * n))`` (0 when n = 0)."""
    if not (0.0 < p <= 1.0):
        raise ValueError(f"keep fraction must be in (0, 1], got {p!r}")
    if n <= 0:
        return 0
    return max(1, min(n, math.floor(p * n + 1e-9)))


def keep_top(logits, p: float) -> list[int]:
    """Positions of the kept samples, the highest logit first (equal logits: the earlier position)."""
    values = [float(x) for x in (logits.tolist() if isinstance(logits, torch.Tensor) else logits)]
    if any(not math.isfinite(v) for v in values):
        raise ValueError("selector logits must be finite")
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order[: n_keep(p, len(values))]
