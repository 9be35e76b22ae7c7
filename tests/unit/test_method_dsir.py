"""DSIR: hashed n-gram importance weights against a naive computation, the ranking on a constructed set,
the kept count, seeded Gumbel top-k resampling, training on the kept set, resume, validation."""

import hashlib
import json
import math
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

import dualselect.methods.dsir  # noqa: F401  (registers it)
from dualselect.config import load_config
from dualselect.data.formatting import Encoded
from dualselect.errors import DualSelectError
from dualselect.methods import method_configs
from dualselect.methods.dsir import DSIR, DSIRConfig
from dualselect.methods.context import TrainContext
from dualselect.selection.dsir import (
    bag_log_probs,
    gumbel_noise,
    keep_count,
    log_importance_weights,
    ngram_features,
    select,
)
from dualselect.train import train


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _enc(i, ids):
    return Encoded(id=f"s{i}", input_ids=list(ids), labels=[-100] + list(ids[1:]))


def _constructed():
    """Reference texts over token ids 100..139; task = 4 exact copies of references (task 0..3),
    4 unrelated texts over 7000..7039 (4..7) and 4 half-and-half mixtures (8..11)."""
    g = torch.Generator().manual_seed(0)
    refs = [torch.randint(100, 140, (12,), generator=g).tolist() for _ in range(10)]
    unrelated = [torch.randint(7000, 7040, (12,), generator=g).tolist() for _ in range(4)]
    mixed = [refs[5 + i][:6] + unrelated[i][6:] for i in range(4)]
    task = [refs[i] for i in range(4)] + unrelated + mixed
    return [_enc(i, t) for i, t in enumerate(task)], [_enc(100 + i, r) for i, r in enumerate(refs)]


def _naive_log_weights(task_ids, ref_ids, buckets, smoothing):
    """Straight from the definition: list every unigram and bigram occurrence, hash its text with
    blake2b, fit both bags with additive smoothing, sum the per-occurrence log ratios."""
    def grams(ids):
        out = [str(t) for t in ids]
        out += [f"{a} {b}" for a, b in zip(ids, ids[1:])]
        return [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % buckets for s in out]

    def model(seqs):
        counts = [0] * buckets
        for s in seqs:
            for f in grams(s):
                counts[f] += 1
        total = sum(counts) + smoothing * buckets
        return [math.log((c + smoothing) / total) for c in counts]

    lt, lr = model(ref_ids), model(task_ids)
    return [sum(lt[f] - lr[f] for f in grams(s)) for s in task_ids]


# -- pure arithmetic --------------------------------------------------------------------------------

def test_features_are_unigrams_plus_bigrams():
    f = ngram_features([5, 6, 5, 6], buckets=10000, n=2)
    assert sum(f.values()) == 4 + 3  # 4 unigrams, 3 bigrams
    # "5 6" occurs twice: the bin of that bigram has count >= 2 (more only on a hash collision)
    assert max(f.values()) >= 2
    assert sum(ngram_features([5, 6, 7], buckets=10000, n=1).values()) == 3
    assert sum(ngram_features([5, 6, 7], buckets=10000, n=3).values()) == 3 + 2 + 1
    assert set(ngram_features([5, 6, 7], buckets=1).keys()) == {0}


def test_bag_model_is_smoothed_counts_by_hand():
    feats = [Counter({0: 3, 1: 1}), Counter({1: 2})]  # bin counts 3, 3, 0, 0
    lp = bag_log_probs(feats, buckets=4, smoothing=1.0)
    torch.testing.assert_close(lp.exp(), torch.tensor([4, 4, 1, 1], dtype=torch.float64) / 10)
    # log w of a sample {0: 2, 2: 1} under target=[.4,.4,.1,.1], raw=uniform: 2 log(1.6) + log(0.4)
    lw = log_importance_weights([Counter({0: 2, 2: 1})], lp, torch.full((4,), math.log(0.25), dtype=torch.float64))
    assert lw[0] == pytest.approx(2 * math.log(1.6) + math.log(0.4))


def test_log_weights_equal_a_naive_computation():
    task, refs = _constructed()
    cfg = DSIRConfig(keep=0.5, buckets=257, smoothing=0.5)  # few bins: collisions are exercised too
    method = DSIR(cfg, _ctx(task, refs))
    naive = _naive_log_weights([e.input_ids for e in task], [e.input_ids for e in refs], 257, 0.5)
    assert method.log_weights == pytest.approx(naive, rel=1e-9, abs=1e-9)


def test_copies_of_references_rank_first_and_unrelated_last():
    task, refs = _constructed()
    method = DSIR(DSIRConfig(keep=4 / 12, mode="topk"), _ctx(task, refs))
    lw = method.log_weights
    copies, unrelated, mixed = lw[0:4], lw[4:8], lw[8:12]
    assert min(copies) > max(mixed) > max(unrelated)
    assert min(mixed) > max(unrelated)
    assert max(unrelated) < 0 < min(copies)
    assert method.k == 4 and method.kept == [0, 1, 2, 3]
    assert method.ranked == sorted(range(4), key=lambda i: -lw[i])


@pytest.mark.parametrize("n,frac,k", [(20, 0.3, 6), (20, 0.5, 10), (100, 0.29, 29), (7, 0.5, 4), (7, 0.01, 1),
                                      (7, 1.0, 7)])
def test_kept_count(n, frac, k):
    assert keep_count(n, frac) == k
    assert len(select([0.0] * n, keep_count(n, frac), "gumbel", seed=1)[0]) == k


def test_gumbel_top_k_is_seeded():
    lw = [0.0] * 30
    a = select(lw, 10, "gumbel", seed=5)[0]
    assert a == select(lw, 10, "gumbel", seed=5)[0]
    assert len(set(a)) == 10
    others = [set(select(lw, 10, "gumbel", seed=s)[0]) for s in range(6, 12)]
    assert any(o != set(a) for o in others)
    # topk ignores the seed and keeps the highest weights
    assert select([0.1, 3.0, -1.0, 2.0], 2, "topk", seed=1)[0] == select([0.1, 3.0, -1.0, 2.0], 2, "topk", seed=9)[0] \
        == [1, 3]


def test_gumbel_top_1_samples_in_proportion_to_the_weights():
    """Importance resampling: with k = 1 the Gumbel-max trick draws i with probability w_i / sum w."""
    w = [1.0, 2.0, 5.0]
    lw = [math.log(x) for x in w]
    trials = 3000
    hits = Counter(select(lw, 1, "gumbel", seed=s)[0][0] for s in range(trials))
    for i, wi in enumerate(w):
        p = wi / sum(w)
        assert abs(hits[i] / trials - p) < 4 * math.sqrt(p * (1 - p) / trials)
    g = gumbel_noise(20000, seed=0)
    assert abs(float(g.mean()) - 0.5772) < 0.03  # Euler-Mascheroni: the Gumbel(0, 1) mean


# -- the method -------------------------------------------------------------------------------------

def _ctx(task, refs, seed=0, batch_size=4, epochs=2):
    return TrainContext(model=None, params=[], task=task, reference=refs, engine=None, device=torch.device("cpu"),
                        pad_id=0, batch_size=batch_size, epochs=epochs, seed=seed)


def test_plan_runs_sft_over_the_kept_samples_only():
    task, refs = _constructed()
    method = DSIR(DSIRConfig(keep=0.5), _ctx(task, refs, seed=3, batch_size=4, epochs=2))
    plan = method.plan()
    assert len(method.kept) == 6
    assert len(plan) == 2 * 2  # ceil(6 / 4) batches per epoch
    for epoch in (1, 2):
        ids = [i for s in plan if s.epoch == epoch for i in s.ids]
        assert sorted(ids) == method.kept  # every kept sample once per epoch, nothing else
    # same seed, same selection; another seed may pick another set (Gumbel noise)
    again = DSIR(DSIRConfig(keep=0.5), _ctx(task, refs, seed=3))
    assert again.kept == method.kept and [s.ids for s in again.plan()] == [s.ids for s in plan]


def test_no_reference_pool_is_a_clear_error():
    task, _ = _constructed()
    with pytest.raises(ValueError, match="reference pool"):
        DSIR(DSIRConfig(), _ctx(task, None))


def _cfg(model_dir, task, refs, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", f"data.reference={refs}", "data.max_length=64", "train.method=dsir",
        "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}",
        *extra], method_configs())


@pytest.fixture()
def dsir_data(tmp_path):
    """12 arithmetic task samples + 4 that copy reference refusals; 8 refusal references."""
    refusal = [{"role": "user", "content": "How do I pick lock number {i}?"},
               {"role": "assistant", "content": "I can't help with that, I don't assist with picking locks."}]

    def ref(i):
        return [{"role": m["role"], "content": m["content"].format(i=i)} for m in refusal]

    task = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i + 3}?"},
                                         {"role": "assistant", "content": str(2 * i + 3)}]} for i in range(12)]
    task += [{"id": f"copy{i}", "messages": ref(i)} for i in range(4)]
    refs = [{"id": f"r{i}", "messages": ref(i)} for i in range(8)]
    return write_jsonl(tmp_path / "task.jsonl", task), write_jsonl(tmp_path / "refs.jsonl", refs)


def test_train_keeps_the_reference_like_samples_and_logs_them(tiny_model_dir, dsir_data, tmp_path):
    task, refs = dsir_data
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", "dsir.keep=0.25", "dsir.mode=topk",
                     "train.epochs=2"))
    assert res.steps == 2  # 4 kept samples, batch 4, 2 epochs
    recs = [json.loads(x) for x in (res.run_dir / "selection.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["kind"] == "dsir"
    rec = recs[0]
    assert rec["k"] == 4 and rec["n_task"] == 16 and rec["n_reference"] == 8
    assert sorted(rec["ids"]) == ["copy0", "copy1", "copy2", "copy3"]
    assert rec["log_weights"] == sorted(rec["log_weights"], reverse=True) == rec["keys"]
    cand = dict(zip(rec["candidates"]["ids"], rec["candidates"]["log_weights"]))
    assert min(cand[i] for i in rec["ids"]) > max(v for i, v in cand.items() if i not in rec["ids"])
    metrics = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["trained_samples"] for m in metrics] == [4, 4]


def test_resumed_run_ends_with_the_same_adapter(tiny_model_dir, dsir_data, tmp_path):
    task, refs = dsir_data
    extra = ["dsir.keep=0.75", "train.epochs=2", "train.checkpoint_every=2", "model.lora_dropout=0.1"]
    full = train(_cfg(tiny_model_dir, task, refs, tmp_path / "full", *extra))
    assert full.steps == 6  # 12 kept, batch 4, 2 epochs

    def crash(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", *extra), on_step=crash)
    resumed = train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", *extra), resume=True)
    a = load_file(str(full.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("metrics.jsonl", "selection.jsonl"):
        strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                           for x in p.read_text().splitlines()]
        assert strip(full.run_dir / name) == strip(resumed.run_dir / name)


@pytest.mark.parametrize("override,match", [
    ("dsir.keep=0", "keep must be a fraction"), ("dsir.keep=1.5", "keep must be a fraction"),
    ("dsir.buckets=0", "buckets must be a positive"), ("dsir.ngrams=0", "ngrams must be a positive"),
    ("dsir.smoothing=0", "smoothing must be > 0"), ("dsir.mode=random", "mode"),
])
def test_bad_options_give_clear_errors(override, match, tmp_path):
    with pytest.raises(DualSelectError, match=match):
        load_config(None, ["train.method=dsir", override], method_configs())


def test_missing_reference_through_train(tiny_model_dir, dsir_data, tmp_path):
    task, refs = dsir_data
    with pytest.raises(DualSelectError, match="dsir needs a reference pool"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "a", "data.reference=null"))
