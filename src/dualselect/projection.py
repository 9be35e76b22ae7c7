"""A seeded random projection of gradients (Johnson-Lindenstrauss): x [n, P] -> x S, S [P, d].

S has Rademacher entries +-1/sqrt(d) (Achlioptas 2003): |x S|^2 estimates |x|^2, and inner products and cosines are
kept up to a distortion that shrinks like 1/sqrt(d) (the bound is in tests/unit/test_projection.py). The entries are
the bits of a splitmix64 stream started at a hash of the seed: entry (i, j), k = i * d + j, is -1 where bit k % 64
of output k // 64 is set. So S is a fixed function of (seed, P, d), the same on a CPU and on any accelerator,
computed with int64 torch ops on the vector's own device (nothing to transfer), a block of rows at a time: S is
never held whole (at most BLOCK_ELEMENTS entries at once, whatever P).
"""

from __future__ import annotations

import math

import torch

BLOCK_ELEMENTS = 1 << 20  # entries of S generated at once (about 8 MB of int64 temporaries each)

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 with the same bits (torch multiplies int64 modulo 2^64)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _xorshift_(z: torch.Tensor, s: int) -> torch.Tensor:
    """z ^= z >>> s in place (logical shift of int64; torch's >> is arithmetic, so the sign copies are masked)."""
    return z.bitwise_xor_((z >> s).bitwise_and_((1 << (64 - s)) - 1))


def _mix64(z: int) -> int:
    """splitmix64's output function on a Python int (the start of a seed's stream)."""
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def rademacher_rows(seed: int, start: int, rows: int, dim: int, device="cpu") -> torch.Tensor:
    """Rows start..start+rows-1 of S (float32 [rows, dim], entries +-1/sqrt(dim)). Entry (i, j), k = i * dim + j, is
    -1 where bit k % 64 of splitmix64 output k // 64 is set, +1 elsewhere (64 entries a hash). The stream starts at
    a hash of the seed, so that the streams of nearby seeds do not overlap."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"projection seed must be an integer, got {seed!r}")
    lo, hi = start * dim, (start + rows) * dim
    first, last = lo // 64, (hi + 63) // 64
    z = torch.arange(first + 1, last + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(_GOLDEN)).add_(_signed(_mix64(seed & _MASK64)))  # state: mix(seed) + (word + 1) * golden
    _xorshift_(z, 30).mul_(_signed(_MIX1))
    _xorshift_(z, 27).mul_(_signed(_MIX2))
    _xorshift_(z, 31)
    bits = (z[:, None] >> torch.arange(64, device=device)).bitwise_and_(1).view(-1)[lo - 64 * first:hi - 64 * first]
    scale = 1.0 / math.sqrt(dim)
    return torch.where(bits.bool(), -scale, scale).to(torch.float32).view(rows, dim)


def project(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """x S for x [n, P] (or [P]): float64 [n, dim] (or [dim]), S generated block by block on x's device."""
    if dim < 1:
        raise ValueError(f"projection dim must be >= 1, got {dim}")
    if x.dim() not in (1, 2):
        raise ValueError(f"project expects x [n, P] or [P], got shape {tuple(x.shape)}")
    rows2d = x.detach().reshape(1, -1) if x.dim() == 1 else x.detach()
    n, p = rows2d.shape
    out = torch.zeros(n, dim, dtype=torch.float64, device=x.device)
    block = max(1, BLOCK_ELEMENTS // dim)
    for start in range(0, p, block):
        rows = min(block, p - start)
        s = rademacher_rows(seed, start, rows, dim, device=x.device).to(rows2d.dtype)
        out += (rows2d[:, start:start + rows] @ s).to(torch.float64)
    return out[0] if x.dim() == 1 else out
