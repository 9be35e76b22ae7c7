"""The seeded Rademacher projection (dualselect.projection): a fixed matrix per seed, generated in blocks, and
cosines of projected vectors within the Johnson-Lindenstrauss bound computed from d and a failure probability."""

import math

import pytest
import torch

from dualselect import projection
from dualselect.projection import project, rademacher_rows
from dualselect.selection.dualselect import cosines

M64 = (1 << 64) - 1


def _splitmix_bit(seed: int, k: int) -> int:
    """Entry k (row-major) of S as a sign, from a plain-Python splitmix64 (the documented definition)."""

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    word, bit = divmod(k, 64)
    z = mix((mix(seed & M64) + (word + 1) * 0x9E3779B97F4A7C15) & M64)
    return -1 if (z >> bit) & 1 else 1


@pytest.mark.parametrize("seed, start, rows, dim", [(7, 3, 5, 16), (2**40 + 3, 11, 3, 100), (0, 0, 4, 1), (-2, 2, 2, 70)])
def test_entries_are_the_documented_splitmix_bits(seed, start, rows, dim):
    s = rademacher_rows(seed, start, rows, dim)
    assert s.shape == (rows, dim) and s.dtype == torch.float32
    assert torch.all(s.abs() == torch.tensor(1 / math.sqrt(dim), dtype=torch.float32))
    want = [[_splitmix_bit(seed, (start + i) * dim + j) for j in range(dim)] for i in range(rows)]
    assert torch.sign(s).to(torch.int64).tolist() == want


def test_deterministic_blockwise_and_seeded(monkeypatch):
    x = torch.randn(5, 3000, generator=torch.Generator().manual_seed(0))
    whole = project(x, 48, seed=3)
    assert whole.shape == (5, 48) and whole.dtype == torch.float64
    assert torch.equal(project(x, 48, seed=3), whole)  # a fixed matrix for a seed
    assert torch.equal(project(x[2], 48, seed=3), project(x[2:3], 48, seed=3)[0])  # a vector: [P] -> [d]
    full = rademacher_rows(3, 0, 3000, 48)
    assert torch.equal(rademacher_rows(3, 7, 9, 48), full[7:16])  # rows do not depend on the block they are made in
    exact = x.double() @ full.double()
    # float32 products of each block, summed in float64: within the worst-case float32 dot-product bound
    # n * u * (|x| @ |S|) (u = 2**-24; the kernel's summation order varies with threads and allocator)
    bound = 3000 * 2.0 ** -24 * (x.double().abs() @ full.double().abs())
    assert bool(((whole - exact).abs() <= bound).all())
    monkeypatch.setattr(projection, "BLOCK_ELEMENTS", 7 * 48)  # blocks of 7 rows: the same S
    assert bool(((project(x, 48, seed=3) - exact).abs() <= bound).all())
    monkeypatch.undo()
    # another seed, even the next one, gives an unrelated matrix (its stream starts elsewhere)
    a, b = rademacher_rows(3, 0, 3000, 48), rademacher_rows(4, 0, 3000, 48)
    agree = float((torch.sign(a) == torch.sign(b)).double().mean())
    assert abs(agree - 0.5) < 0.01
    assert abs(float(torch.sign(a).mean())) < 0.01  # balanced signs


def test_errors():
    with pytest.raises(ValueError, match="dim must be >= 1"):
        project(torch.ones(4), 0, seed=0)
    with pytest.raises(ValueError, match=r"x \[n, P\] or \[P\]"):
        project(torch.ones(2, 2, 2), 4, seed=0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        rademacher_rows(1.5, 0, 1, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_same_matrix_on_cuda():
    assert torch.equal(rademacher_rows(9, 5, 40, 96, device="cuda").cpu(), rademacher_rows(9, 5, 40, 96))


# -- the Johnson-Lindenstrauss bound ---------------------------------------------------------------------------------


def jl_epsilon(d: int, delta: float) -> float:
    """The smallest eps in (0, 1) with 2 exp(-d/2 (eps^2/2 - eps^3/3)) <= delta: with Rademacher +-1/sqrt(d) entries,
    P(| |xS|^2 - |x|^2 | > eps |x|^2) <= delta for any fixed x (Achlioptas 2003, Theorem 1.1 and Lemma 5)."""
    need = 2 * math.log(2 / delta) / d  # eps^2/2 - eps^3/3 must reach this (it is at most 1/6, at eps = 1)
    if need >= 1 / 6:
        raise ValueError(f"d={d} is too small for a bound at failure probability {delta}")
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if mid * mid / 2 - mid ** 3 / 3 >= need else (mid, hi)
    return hi


def cosine_bound(eps: float, c: torch.Tensor) -> torch.Tensor:
    """|cos(uS, vS) - c| when |.|^2 of u, v, u + v and u - v (unit u, v) are each kept within a factor 1 +- eps:
    <uS, vS> = (|(u+v)S|^2 - |(u-v)S|^2) / 4 is within eps of c (as |u+v|^2 + |u-v|^2 = 4) and |uS| |vS| within
    [1 - eps, 1 + eps], so the cosine is within (eps + |c| eps) / (1 - eps)."""
    return eps * (1 + c.abs()) / (1 - eps)


def _structured_pairs(p: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs where a weak generator would show: basis vectors (adjacent, across 64-bit words, across rows of S),
    sparse and periodic vectors (period 64: the bits of one hash), blocks, near-parallel and opposite vectors,
    one huge coordinate, heavy tails."""
    e = torch.eye(p, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    ones = torch.ones(p, dtype=torch.float64)
    alt = torch.tensor([(-1.0) ** i for i in range(p)], dtype=torch.float64)
    period64 = torch.tensor([1.0 if i % 64 < 32 else -1.0 for i in range(p)], dtype=torch.float64)
    half = torch.cat([torch.ones(p // 2), torch.zeros(p - p // 2)]).double()
    u = torch.randn(p, generator=g, dtype=torch.float64)
    spike = u.clone()
    spike[17] = 1e3
    heavy = torch.distributions.StudentT(1.5).sample((p,)).double()
    pairs = [(e[0], e[1]), (e[63], e[64]), (e[5], e[5] + e[69]), (e[100], e[p - 1]), (ones, alt), (ones, period64),
             (period64, torch.roll(period64, 1)), (half, ones), (half, 1 - half), (u, u + 0.01 * alt), (u, -u),
             (u, spike), (heavy, heavy + 0.1 * u), (ones, ones + e[3]), (e[0] + e[1], e[0] - e[1])]
    for k in (1, 2, 8, 64):  # k-sparse random pairs sharing half their support
        idx = torch.randperm(p, generator=g)[:k]
        a, b = torch.zeros(p, dtype=torch.float64), torch.zeros(p, dtype=torch.float64)
        a[idx] = torch.randn(k, generator=g, dtype=torch.float64)
        b[idx[: (k + 1) // 2]] = torch.randn((k + 1) // 2, generator=g, dtype=torch.float64)
        pairs.append((a, b))
    return pairs


@pytest.mark.parametrize("seed", [0, 1])
def test_projected_cosines_within_the_jl_bound(seed):
    p, d = 4096, 1024
    g = torch.Generator().manual_seed(100 + seed)
    pairs = _structured_pairs(p)
    for _ in range(300):  # random pairs of every correlation, from opposite to parallel
        u = torch.randn(p, generator=g, dtype=torch.float64)
        w = torch.randn(p, generator=g, dtype=torch.float64)
        t = float(torch.rand((), generator=g)) * 2 - 1
        pairs.append((u, t * u + math.sqrt(1 - t * t) * w))
    u = torch.stack([a / a.norm() for a, _ in pairs])
    v = torch.stack([b / b.norm() for _, b in pairs])
    # every guarantee at once fails with probability <= delta: 4 vectors per pair, union bound
    delta = 1e-6
    eps = jl_epsilon(d, delta / (4 * len(pairs)))
    assert eps < 0.35  # the bound says something at this d
    vectors = torch.cat([u, v, u + v, u - v])
    vectors = vectors[vectors.norm(dim=1) > 1e-6]  # u + v = 0 for opposite pairs: its projection is exactly 0
    ratio = project(vectors.float(), d, seed).pow(2).sum(1) / vectors.pow(2).sum(1)
    assert float((ratio - 1).abs().max()) <= eps  # the JL statement itself, for every vector
    c = (u * v).sum(1)
    pu, pv = project(u.float(), d, seed), project(v.float(), d, seed)
    got = torch.stack([cosines(pu[i:i + 1], pv[i])[0] for i in range(len(pairs))])  # the refresh's cosine
    err, bound = (got - c).abs(), cosine_bound(eps, c)
    assert bool((err <= bound).all()), f"worst error / bound: {float((err / bound).max()):.3f}"
