"""Unit tests of the pure selection functions (no model): hand-made numbers for every mode,
tie-breaking, the token budget, the streaming top-k, and parity with the authors' release."""

import json
import math
import random

import pytest
import torch

from dualselect.selection import (
    EPS,
    RunningTopK,
    Selection,
    cosine,
    cosines,
    project_conflict,
    reference_scores,
    select_references,
    select_task,
    task_scores,
    weighted_direction,
)


def manual_softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [v / z for v in e]


# ------------------------------------------------------------------------------------ cosines


def test_cosine_matches_manual_formula():
    a = torch.tensor([1.0, 2.0, -2.0])
    b = torch.tensor([3.0, 0.0, 4.0])
    dot = 1 * 3 + 2 * 0 + (-2) * 4  # -5
    expected = dot / ((3.0 + EPS) * (5.0 + EPS))
    assert cosine(a, b) == pytest.approx(expected, rel=1e-15, abs=0)
    assert isinstance(cosine(a, b), float)
    # any shape: flattened
    assert cosine(a.reshape(3, 1), b.reshape(1, 3)) == pytest.approx(expected, rel=1e-15)


def test_cosine_accumulates_in_float64():
    torch.manual_seed(0)
    a = torch.randn(10_000)
    b = torch.randn(10_000)
    a64, b64 = a.double(), b.double()
    ref = float(a64 @ b64 / ((a64.norm() + EPS) * (b64.norm() + EPS)))
    assert cosine(a, b) == pytest.approx(ref, rel=1e-12)


def test_cosine_eps_on_zero_vectors():
    z = torch.zeros(4)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert cosine(z, v) == 0.0
    assert cosine(v, z) == 0.0
    assert cosine(z, z) == 0.0
    # eps is part of the denominator: tiny vectors are deflated, as in the release's formula
    tiny = torch.tensor([1e-12], dtype=torch.float64)
    assert cosine(tiny, tiny) == pytest.approx(1e-24 / (2e-12 * 2e-12))
    assert cosine(tiny, tiny, eps=0.0) == pytest.approx(1.0)


def test_cosine_size_mismatch():
    with pytest.raises(ValueError, match="different sizes"):
        cosine(torch.ones(3), torch.ones(4))


def test_cosines_rowwise_and_zero_direction():
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])
    d = torch.tensor([2.0, 0.0])
    out = cosines(G, d)
    assert out.dtype == torch.float64 and out.shape == (4,)
    for i in range(4):
        assert float(out[i]) == pytest.approx(cosine(G[i], d), rel=1e-15, abs=0)
    assert float(out[0]) == pytest.approx(1.0)
    assert float(out[1]) == 0.0
    assert float(out[2]) == pytest.approx(-1.0)
    assert float(out[3]) == 0.0
    assert torch.equal(cosines(G, torch.zeros(2)), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="columns"):
        cosines(G, torch.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        cosines(torch.ones(3), torch.ones(3))


def test_cosines_chunked_equals_single(monkeypatch):
    import dualselect.selection.dualselect as mod

    torch.manual_seed(1)
    G = torch.randn(7, 5)
    d = torch.randn(5)
    full = cosines(G, d)
    monkeypatch.setattr(mod, "_COSINE_CHUNK_ELEMENTS", 10)  # 2 rows per chunk
    assert torch.equal(cosines(G, d), full)


# ------------------------------------------------------------------------------------ scores


def test_scores_formulas():
    losses = [2.0, 1.0, 3.0]
    cos = [0.5, -0.25, 0.0]
    r = reference_scores(losses, cos, mu_ref=2.0, nu=4.0)
    assert r.dtype == torch.float64
    assert r.tolist() == [2 * 2.0 - 4 * 0.5, 2 * 1.0 + 4 * 0.25, 6.0]
    t = task_scores(torch.tensor(losses), torch.tensor(cos), mu_task=0.5, nu=2.0)
    assert t.tolist() == [1.0 - 1.0, 0.5 + 0.5, 1.5]
    assert reference_scores(losses, cos).tolist() == [1.5, 1.25, 3.0]
    with pytest.raises(ValueError, match="3 losses but 2 cosines"):
        task_scores(losses, cos[:2])
    with pytest.raises(ValueError, match="finite"):
        task_scores([1.0, float("nan")], [0.0, 0.0])


# ------------------------------------------------------------------------------------ references


def test_select_references_hard():
    s = [0.3, 2.0, -1.0, 1.5, 0.9]
    sel = select_references(s, 3)
    assert sel == Selection(index=[1, 3, 4], weights=[1.0, 1.0, 1.0])
    assert len(sel) == 3


def test_select_references_soft_weights_are_full_softmax():
    s = [0.3, 2.0, -1.0, 1.5, 0.9]
    tau = 0.5
    q = manual_softmax([x / tau for x in s])
    sel = select_references(s, 2, mode="soft", tau=tau)
    assert sel.index == [1, 3]
    assert sel.weights == pytest.approx([q[1], q[3]], rel=1e-13)
    # full softmax: all kept weights sum to 1 only when everything is kept
    assert sum(sel.weights) < 1.0
    full = select_references(s, 10, mode="soft", tau=tau)
    assert full.index == [1, 3, 4, 0, 2]
    assert sum(full.weights) == pytest.approx(1.0, rel=1e-14)


def test_select_references_soft_extreme_scores_stable():
    s = [1000.0, 999.0, -1000.0]
    sel = select_references(s, 3, mode="soft", tau=0.01)
    assert sel.index == [0, 1, 2]
    assert sel.weights[0] == pytest.approx(1.0)
    assert sel.weights[1] == pytest.approx(math.exp(-100.0), rel=1e-9)
    assert sel.weights[2] == 0.0
    assert all(math.isfinite(w) for w in sel.weights)


def test_select_references_ties_and_k_larger_than_n():
    s = [1.0, 2.0, 2.0, 1.0, 2.0]
    assert select_references(s, 2).index == [1, 2]
    assert select_references(s, 4).index == [1, 2, 4, 0]
    assert select_references(s, 4, mode="soft").index == [1, 2, 4, 0]
    assert select_references(s, 99).index == [1, 2, 4, 0, 3]
    assert select_references([], 3) == Selection([], [])


def test_select_references_soft_ties_on_underflowed_weights_follow_scores():
    # q of both low scores underflows to 0.0; ranking still follows the score, then the position
    s = [-1e6, 0.0, -2e6]
    sel = select_references(s, 3, mode="soft", tau=0.001)
    assert sel.index == [1, 0, 2]
    assert sel.weights == [1.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------ task


def test_select_task_hard():
    s = [0.3, 2.0, -1.0, 1.5, 0.9]
    assert select_task(s, 2) == Selection(index=[2, 0], weights=[1.0, 1.0])
    assert select_task(s, 5).index == [2, 0, 4, 3, 1]
    assert select_task(s, 50).index == [2, 0, 4, 3, 1]
    assert select_task(s, 0).index == [2, 0, 4, 3, 1]
    assert select_task(s, -3).index == [2, 0, 4, 3, 1]
    assert select_task(s, None).index == [2, 0, 4, 3, 1]
    assert select_task(s, 0).weights == [1.0] * 5


def test_select_task_soft_weights_are_softmin():
    s = [0.3, 2.0, -1.0, 1.5, 0.9]
    tau = 0.7
    p = manual_softmax([-x / tau for x in s])
    sel = select_task(s, 3, mode="soft", tau=tau)
    assert sel.index == [2, 0, 4]
    assert sel.weights == pytest.approx([p[2], p[0], p[4]], rel=1e-13)
    every = select_task(s, 0, mode="soft", tau=tau)
    assert every.index == [2, 0, 4, 3, 1]
    assert every.weights == pytest.approx([p[i] for i in every.index], rel=1e-13)
    assert sum(every.weights) == pytest.approx(1.0, rel=1e-14)


def test_select_task_ties():
    s = [1.0, 0.5, 1.0, 0.5]
    assert select_task(s, 1).index == [1]
    assert select_task(s, 3).index == [1, 3, 0]
    assert select_task(s, 3, mode="soft").index == [1, 3, 0]
    assert select_task(s, 0, tokens=[1, 1, 1, 1], budget=0.75).index == [1, 3, 0]


def test_budget_exact_threshold_keeps_the_sample_that_reaches_it():
    s = [0.1, 0.2, 0.3, 0.4]
    tokens = [3, 4, 2, 1]  # total 10
    # 0.7 * 10 = 7: samples 0 and 1 give exactly 7 -> stop there (no float 7.000000000000001 drift)
    assert select_task(s, 0, tokens=tokens, budget=0.7) == Selection([0, 1], [1.0, 1.0])
    # 0.3 * 10 = 3: the first sample alone reaches it
    assert select_task(s, 0, tokens=tokens, budget=0.3).index == [0]
    # full budget keeps everything
    assert select_task(s, 0, tokens=tokens, budget=1.0).index == [0, 1, 2, 3]


def test_budget_crossing_keeps_the_crossing_sample():
    s = [0.1, 0.2, 0.3, 0.4]
    tokens = [3, 4, 2, 1]
    # threshold 7.1: 3+4 = 7 < 7.1, +2 = 9 crosses it -> three samples
    assert select_task(s, 0, tokens=tokens, budget=0.71).index == [0, 1, 2]
    # threshold 9.5: 9 < 9.5, +1 = 10 -> all
    assert select_task(s, 0, tokens=tokens, budget=0.95).index == [0, 1, 2, 3]
    # order is by score, not by position
    s2 = [0.4, 0.3, 0.2, 0.1]
    assert select_task(s2, 0, tokens=tokens, budget=0.25).index == [3, 2]  # 1+2 = 3 >= 2.5


def test_budget_one_huge_sample_and_at_least_one():
    s = [0.1, 0.2, 0.3]
    tokens = [1000, 1, 1]
    assert select_task(s, 0, tokens=tokens, budget=0.9).index == [0]
    # the huge sample ranked last: everything up to it is needed
    assert select_task([0.3, 0.1, 0.2], 0, tokens=tokens, budget=0.5).index == [1, 2, 0]
    # tiny budget: still at least one sample
    assert select_task(s, 0, tokens=[5, 5, 5], budget=1e-9).index == [0]
    # zero supervised tokens in the whole batch: one sample kept
    assert select_task(s, 0, tokens=[0, 0, 0], budget=0.5).index == [0]
    # k is ignored when a budget is given
    assert select_task(s, 1, tokens=[1, 1, 1], budget=1.0).index == [0, 1, 2]
    assert select_task(s, 0, tokens=torch.tensor([1, 1, 1]), budget=0.5).index == [0, 1]


# ------------------------------------------------------------------------------------ directions


def test_weighted_direction_3x2():
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    w = [1.0, 2.0, 1.0]
    out = weighted_direction(G, w)
    # (1*[1,0] + 2*[0,2] + 1*[3,3]) / 4 = [4, 7] / 4
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([1.0, 1.75]), rtol=0, atol=1e-7)
    # a list of rows (RunningTopK payloads) gives the same; weight scale does not matter
    assert torch.equal(weighted_direction(list(G), [0.5, 1.0, 0.5]), out)
    assert torch.allclose(weighted_direction(G, [1, 1, 1]), torch.tensor([4 / 3, 5 / 3]))


def test_weighted_direction_errors():
    G = torch.ones(2, 3)
    with pytest.raises(ValueError, match="empty"):
        weighted_direction(torch.ones(0, 3), [])
    with pytest.raises(ValueError, match="empty"):
        weighted_direction([], [])
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_direction(G, [0.0, 0.0])
    with pytest.raises(ValueError, match="2 gradients but 3 weights"):
        weighted_direction(G, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_direction(G, [1.0, -0.5])


def test_project_conflict_both_branches():
    g_r = torch.tensor([1.0, 0.0])
    agree = torch.tensor([1.0, 1.0])
    assert project_conflict(agree, g_r) is agree  # <g_t, g_r> >= 0: unchanged
    orth = torch.tensor([0.0, 1.0])
    assert project_conflict(orth, g_r) is orth  # exactly 0: unchanged
    conflict = torch.tensor([-2.0, 3.0])
    out = project_conflict(conflict, g_r)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([0.0, 3.0]))
    g_r2 = torch.tensor([1.0, 1.0])
    out2 = project_conflict(torch.tensor([-3.0, 1.0]), g_r2)
    # remove (-2 / 2) * [1, 1] -> [-2, 2], orthogonal to g_r2
    assert torch.allclose(out2, torch.tensor([-2.0, 2.0]))
    assert abs(float(out2 @ g_r2)) < 1e-6
    # zero reference: nothing to project on
    z = torch.zeros(2)
    assert project_conflict(conflict, z) is conflict


def test_a_reference_gradient_at_rounding_noise_level_is_not_a_direction():
    """A g_r of float-noise size (far below |g_t|) that happens to point against g_t: no projection (it would
    remove an arbitrary component of g_t); the same g_r scaled up to a real gradient is projected away."""
    from dualselect.selection.dualselect import NOISE_RATIO, in_conflict

    g = torch.Generator().manual_seed(0)
    g_t = torch.randn(1000, generator=g)
    noise = torch.randn(1000, generator=g)
    noise = noise * (-1.0 if float(noise @ g_t) > 0 else 1.0)  # pointing against g_t
    tiny = noise / noise.norm() * g_t.norm() * NOISE_RATIO * 0.5
    assert float(tiny @ g_t) < 0 and not in_conflict(g_t, tiny)
    assert project_conflict(g_t, tiny) is g_t
    real = noise / noise.norm() * g_t.norm() * 0.1
    assert in_conflict(g_t, real)
    assert abs(float(project_conflict(g_t, real).double() @ real.double())) < 1e-6 * float(g_t.norm() * real.norm())


# ------------------------------------------------------------------------------------ errors


def test_argument_errors():
    s = [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown selection mode 'fuzzy'"):
        select_references(s, 1, mode="fuzzy")
    with pytest.raises(ValueError, match="unknown selection mode"):
        select_task(s, 1, mode="Hard")
    with pytest.raises(ValueError, match="unknown selection mode"):
        RunningTopK(2, mode="topk")
    with pytest.raises(ValueError, match="at least 1"):
        select_references(s, 0)
    with pytest.raises(ValueError, match="at least 1"):
        RunningTopK(0)
    with pytest.raises(ValueError, match="integer"):
        select_references(s, 1.5)
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            select_references(s, 1, mode="soft", tau=tau)
        with pytest.raises(ValueError, match="tau"):
            select_task(s, 1, mode="soft", tau=tau)
        with pytest.raises(ValueError, match="tau"):
            RunningTopK(1, mode="soft", tau=tau)
    for budget in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\]"):
            select_task(s, 0, tokens=[1, 1], budget=budget)
    with pytest.raises(ValueError, match="hard mode only"):
        select_task(s, 0, mode="soft", tokens=[1, 1], budget=0.5)
    with pytest.raises(ValueError, match="needs tokens"):
        select_task(s, 0, budget=0.5)
    with pytest.raises(ValueError, match="tokens has 3 entries but there are 2 scores"):
        select_task(s, 0, tokens=[1, 1, 1], budget=0.5)
    with pytest.raises(ValueError, match="tokens has 1 entries"):
        select_task(s, 1, tokens=[1])
    with pytest.raises(ValueError, match="non-negative integers"):
        select_task(s, 0, tokens=[1, -1], budget=0.5)
    with pytest.raises(ValueError, match="finite"):
        select_references([1.0, float("inf")], 1)
    with pytest.raises(ValueError, match="1-D"):
        select_task(torch.ones(2, 2), 1)


# ------------------------------------------------------------------------------------ streaming


class Tracked:
    """A payload that counts how many instances are alive."""

    alive = 0

    def __init__(self, tag):
        self.tag = tag
        Tracked.alive += 1

    def __del__(self):
        Tracked.alive -= 1


def _stream(scores, k, mode, tau, order=None):
    rt = RunningTopK(k, mode=mode, tau=tau)
    for i in order if order is not None else range(len(scores)):
        rt.push(scores[i], i, ("payload", i))
    return rt


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_running_topk_equals_select_references(mode):
    rng = random.Random(1234)
    for trial in range(200):
        n = rng.randint(1, 40)
        k = rng.randint(1, 50)  # often k > n
        if trial % 3 == 0:  # many ties
            scores = [float(rng.randint(-3, 3)) for _ in range(n)]
        else:
            scores = [rng.gauss(0.0, 2.0) for _ in range(n)]
        tau = rng.choice([0.05, 0.1, 1.0, 10.0])
        order = list(range(n))
        if trial % 2:
            rng.shuffle(order)  # pushed out of order: ties still go by index
        rt = _stream(scores, k, mode, tau, order)
        sel, payloads = rt.result()
        ref = select_references(scores, k, mode=mode, tau=tau)
        assert sel.index == ref.index
        assert sel.weights == pytest.approx(ref.weights, rel=1e-12, abs=0)
        assert payloads == [("payload", i) for i in ref.index]
        assert rt.n_seen == n
        assert len(rt) == min(k, n)


def test_running_topk_soft_lse_stable_for_large_scores():
    scores = [5000.0, 4999.5, -3000.0, 4000.0]
    rt = _stream(scores, 2, "soft", 0.1)
    sel, _ = rt.result()
    ref = select_references(scores, 2, mode="soft", tau=0.1)
    assert sel.index == ref.index == [0, 1]
    assert sel.weights == pytest.approx(ref.weights, rel=1e-12)
    assert all(math.isfinite(w) for w in sel.weights)
    lse = torch.logsumexp(torch.tensor(scores, dtype=torch.float64) / 0.1, 0)
    assert rt.log_normalizer() == pytest.approx(float(lse))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_running_topk_holds_at_most_k_payloads(mode):
    rng = random.Random(7)
    k = 5
    Tracked.alive = 0
    rt = RunningTopK(k, mode=mode)
    peak = 0
    scores = [rng.choice([rng.random(), 0.5]) for _ in range(300)]
    for i, s in enumerate(scores):
        rt.push(s, i, Tracked(i))  # the only reference to the payload is the one the heap keeps
        peak = max(peak, Tracked.alive)
        assert Tracked.alive <= k
    assert peak == k
    sel, payloads = rt.result()
    assert [p.tag for p in payloads] == sel.index == select_references(scores, k, mode=mode).index
    del payloads, rt
    assert Tracked.alive == 0


def test_running_topk_tensor_payloads_released():
    import weakref

    rt = RunningTopK(2)
    refs = []
    for i, s in enumerate([0.1, 0.9, 0.5, 0.95, 0.2]):
        t = torch.full((3,), float(i))
        refs.append(weakref.ref(t))
        rt.push(s, i, t)
        del t
        assert sum(r() is not None for r in refs) <= 2
    sel, payloads = rt.result()
    assert sel.index == [3, 1]
    assert [float(p[0]) for p in payloads] == [3.0, 1.0]
    assert weighted_direction(payloads, sel.weights).tolist() == [2.0, 2.0, 2.0]


def test_running_topk_edge_cases():
    rt = RunningTopK(3, mode="soft")
    assert rt.result() == (Selection([], []), [])
    assert rt.log_normalizer() == -math.inf
    rt.push(1.0, 4, None)
    with pytest.raises(ValueError, match="already pushed"):
        rt.push(2.0, 4, None)
    with pytest.raises(ValueError, match="finite"):
        rt.push(float("nan"), 5, None)
    sel, payloads = rt.result()
    assert sel == Selection([4], [1.0]) and payloads == [None]
    with pytest.raises(ValueError, match="soft mode only"):
        RunningTopK(1).log_normalizer()


# ------------------------------------------------------------------------------------ parity


def test_parity_with_authors_release(parity_dir):
    path = parity_dir / "fixture.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    fx = json.loads(path.read_text())
    flags = fx["run_flags"]
    k_ref = int(flags[flags.index("--reference-top-k") + 1])
    k_task = int(flags[flags.index("--task-top-k") + 1])
    assert (k_ref, k_task) == (16, 4)
    assert flags[flags.index("--selection-mode") + 1] == "hard"
    assert fx["refreshes"] and fx["steps"]

    for refresh in fx["refreshes"]:
        cands = refresh["candidates"]
        ids = [c["id"] for c in cands]
        s = reference_scores([c["loss"] for c in cands], [c["cosine"] for c in cands], 1.0, 1.0)
        recorded = torch.tensor([c["score"] for c in cands], dtype=torch.float64)
        assert torch.allclose(s, recorded, rtol=0, atol=1e-9)
        sel = select_references(s, k_ref, mode="hard")
        assert [ids[i] for i in sel.index] == refresh["selected"]
        # the streaming refresh agrees
        rt = RunningTopK(k_ref)
        for i, score in enumerate(s.tolist()):
            rt.push(score, i, ids[i])
        assert rt.result()[1] == refresh["selected"]

    for step in fx["steps"]:
        cands = step["candidates"]
        ids = [c["id"] for c in cands]
        s = task_scores([c["loss"] for c in cands], [c["cosine"] for c in cands], 1.0, 1.0)
        recorded = torch.tensor([c["score"] for c in cands], dtype=torch.float64)
        assert torch.allclose(s, recorded, rtol=0, atol=1e-9)
        sel = select_task(s, k_task, mode="hard")
        assert [ids[i] for i in sel.index] == step["selected"]
