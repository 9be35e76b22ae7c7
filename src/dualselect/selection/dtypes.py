"""The float type of selection arithmetic (cosines, scores, weights, directions): float64 on devices that have it,
float32 on those that do not (Apple MPS), so that selection runs on CUDA, MPS and CPU alike. Every float64 of the
selection path goes through `wide_dtype`; on CPU and CUDA it is float64, as it always was."""

from __future__ import annotations

import torch

NO_FLOAT64 = frozenset({"mps"})  # device types without float64 tensors
# True: float32 everywhere, the arithmetic of a device without float64 (tests set it to run that path on a CPU)
FORCE_FLOAT32 = False


def wide_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """float64 where `device` (default: the CPU) supports it, else float32."""
    kind = torch.device(device if device is not None else "cpu").type
    return torch.float32 if FORCE_FLOAT32 or kind in NO_FLOAT64 else torch.float64
