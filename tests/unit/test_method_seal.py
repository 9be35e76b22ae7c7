"""SEAL on the tiny random Llama: the selector ranks samples that agree with the reference (safe) set above
those that contradict it, the top-p rule and the SFT stage over the kept samples, the pure schedule and
selector arithmetic by hand, keep = 1 is plain SFT, resume equality, config errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import dualselect.methods.seal  # noqa: F401  (registers it)
from dualselect.config import load_config
from dualselect.errors import DualSelectError
from dualselect.methods import METHODS, method_configs
from dualselect.methods.seal import SCORES_FILE, SEAL
from dualselect.schedule import batch_plan
from dualselect.selection.seal import keep_top, n_keep, penalty_schedule, selector_loss, selector_weights
from dualselect.train import build, train

ALL_LINEAR = "model.lora_targets=[q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj]"


def _cfg(model_dir, task, refs, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", f"data.reference={refs}", "data.max_length=64",
        "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}",
        "train.method=seal", *extra], method_configs())


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(i, q, a):
    return {"id": i, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# -- the pure parts, by hand -------------------------------------------------------------------------

def test_penalty_schedule_by_hand():
    assert penalty_schedule(1.0, 0.03, 3) == pytest.approx([1.0, 0.97, 0.94], abs=1e-12)
    assert penalty_schedule(0.5, 0.25, 3) == [0.5, 0.25, 0.0]
    assert penalty_schedule(0.8, 0.0, 2) == [0.8, 0.8]
    with pytest.raises(ValueError, match="becomes negative"):
        penalty_schedule(1.0, 0.6, 3)  # 1 - 2 * 0.6 < 0
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        penalty_schedule(1.5, 0.0, 1)
    with pytest.raises(ValueError, match="penalty_decay"):
        penalty_schedule(1.0, -0.1, 1)


def test_keep_rule_by_hand():
    assert n_keep(0.8, 5) == 4
    assert n_keep(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floats: still 29
    assert n_keep(0.55, 20) == 11
    assert n_keep(0.01, 10) == 1  # at least one
    assert n_keep(1.0, 7) == 7
    assert keep_top([0.1, 0.5, -0.2, 0.5, 0.3], 0.6) == [1, 3, 4]  # highest first, tie: earlier position
    with pytest.raises(ValueError, match="keep fraction"):
        n_keep(0.0, 5)


def test_selector_weights_and_first_order_gradient_by_hand():
    w = torch.tensor([0.0, math.log(2.0), 0.0])
    assert selector_weights(w, "softmax").tolist() == pytest.approx([0.75, 1.5, 0.75])  # 3 * [1/4, 1/2, 1/4]
    assert selector_weights(torch.zeros(4), "sigmoid").tolist() == [1.0, 1.0, 1.0, 1.0]
    # d/dw_j mean_{b in B} n s_b l_b = (n/|B|) (s_j l_j [j in B] - s_j sum_{b in B} s_b l_b)
    logits = torch.tensor([0.3, -0.2, 0.5, 0.0, 0.1], requires_grad=True)
    ids, losses = [3, 0], torch.tensor([2.0, 5.0])
    selector_loss(logits, ids, losses, "softmax").backward()
    s = torch.softmax(logits.detach(), 0).tolist()
    inner = s[3] * 2.0 + s[0] * 5.0
    hand = [(5 / 2) * (s[j] * {3: 2.0, 0: 5.0}.get(j, 0.0) - s[j] * inner) for j in range(5)]
    assert logits.grad.tolist() == pytest.approx(hand, rel=1e-5)
    # sigmoid: only the batch's logits move, d/dw_b = 2 sigma'(w_b) l_b / |B|
    logits.grad = None
    selector_loss(logits, ids, losses, "sigmoid").backward()
    sg = torch.sigmoid(logits.detach())
    hand = [0.0] * 5
    hand[3], hand[0] = float(2 * sg[3] * (1 - sg[3]) * 2.0 / 2), float(2 * sg[0] * (1 - sg[0]) * 5.0 / 2)
    assert logits.grad.tolist() == pytest.approx(hand, rel=1e-5)


# -- the selector on a constructed example -----------------------------------------------------------

def test_selector_ranks_reference_consistent_samples_above_contradicting_ones(tiny_model_dir, tmp_path):
    """Task = 6 copies of the references (their gradient lowers the reference loss) + 6 samples with the
    same prompts and a contradicting answer. After the selector stage every copy outranks every contradiction.
    One task batch per selector epoch (batch = n), so the ranking is not blurred by the order of batches."""
    prompts = [f"How do I pick lock number {i}?" for i in range(6)]
    refs = [_chat(f"r{i}", q, "I can't help with that.") for i, q in enumerate(prompts)]
    task = ([_chat(f"same{i}", q, "I can't help with that.") for i, q in enumerate(prompts)]
            + [_chat(f"bad{i}", q, "Sure! Insert a tension wrench and rake the pins.") for i, q in enumerate(prompts)])
    t, r = write_jsonl(tmp_path / "task.jsonl", task), write_jsonl(tmp_path / "refs.jsonl", refs)
    cfg = _cfg(tiny_model_dir, t, r, tmp_path / "run", ALL_LINEAR, "train.batch_size=12", "model.lora_dropout=0",
               "seal.selector_epochs=10", "seal.lower_lr=5e-2", "seal.penalty_decay=0.05", "seal.keep=0.5")
    ctx = build(cfg, tmp_path / "run").ctx
    method = SEAL(cfg.method_args, ctx)
    init = [p.detach().clone() for p in ctx.params]

    # the construction: at the init, the copies' gradients agree with the mean reference gradient, the
    # contradictions' less (a first-order check that the former lower the reference loss more)
    g_task = ctx.engine(ctx.model, ctx.task, ctx.device).grads
    g_ref = ctx.engine(ctx.model, ctx.reference, ctx.device).grads.mean(0)
    cos = torch.nn.functional.cosine_similarity(g_task, g_ref[None], dim=1)
    assert cos[:6].min() > cos[6:].max()

    plan = method.plan()
    logits = method.logits.tolist()
    assert min(logits[:6]) > max(logits[6:]), logits
    assert method.kept == list(range(6))  # keep 0.5 of 12: exactly the copies
    assert {i for s in plan for i in s.ids} == set(range(6))
    epochs = method.record["epochs"]
    assert [e["upper_weight"] for e in epochs] == pytest.approx([1 - 0.05 * k for k in range(10)])
    assert epochs[-1]["ref_loss"] < epochs[0]["ref_loss"]  # the proxy LoRA did train...
    for p, q in zip(ctx.params, init):  # ...and is back at its initial values
        assert torch.equal(p, q)


# -- top-p keep and the SFT stage ----------------------------------------------------------------------

def test_keeps_floor_p_n_highest_logits_and_sft_trains_only_on_them(tiny_model_dir, toy_data, tmp_path,
                                                                      monkeypatch):
    task, refs = toy_data
    seen = []
    step = SEAL.step
    monkeypatch.setattr(SEAL, "step", lambda self, planned: (seen.append(planned), step(self, planned))[1])
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", "train.epochs=2", "seal.keep=0.55",
                     "seal.selector_epochs=2"))
    saved = json.loads((res.run_dir / SCORES_FILE).read_text())
    logits, ids = saved["logits"], saved["ids"]
    assert len(logits) == len(ids) == 20 and len(set(logits)) == 20  # no ties: the order below is unique
    top = sorted(range(20), key=lambda i: -logits[i])[:11]  # floor(0.55 * 20) = 11
    assert saved["kept"] == sorted(top) and saved["kept_ids"] == [ids[i] for i in sorted(top)]
    # the SFT stage: batch_plan over the 11 kept positions, mapped back to task positions
    expected = [tuple(sorted(top)[j] for j in s.ids) for s in batch_plan(11, 4, 2, 3)]
    assert [s.ids for s in seen] == expected
    for epoch in (1, 2):
        assert sorted(i for s in seen if s.epoch == epoch for i in s.ids) == sorted(top)
    metrics = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["trained_samples"] for m in metrics) == 22
    recs = [json.loads(x) for x in (res.run_dir / "selection.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["selector"]
    assert recs[0]["logits"] == logits and recs[0]["kept_ids"] == saved["kept_ids"]
    assert sum(recs[0]["weights"]) == pytest.approx(20, rel=1e-5)  # n * softmax


def test_keep_everything_is_plain_sft(tiny_model_dir, toy_data, tmp_path):
    """keep = 1: the LoRA init is restored and the RNG untouched by the selector stage (dropout on), so the
    second stage is plain SFT bit for bit."""
    task, refs = toy_data
    common = ["train.epochs=2", "model.lora_dropout=0.1"]
    sft = train(_cfg(tiny_model_dir, task, refs, tmp_path / "sft", *common, "train.method=sft"))
    seal = train(_cfg(tiny_model_dir, task, refs, tmp_path / "seal", *common, "seal.keep=1.0",
                      "seal.selector_epochs=1", "seal.lower_lr=1e-2"))
    a, b = _adapter(sft.run_dir), _adapter(seal.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rec = json.loads((seal.run_dir / SCORES_FILE).read_text())
    assert rec["epochs"][0]["steps"] == 5 and rec["task_samples"] == 20  # the stage did run


# -- resume ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop_scores", [False, True], ids=["reuse-saved-selector", "recompute-selector"])
def test_resumed_run_ends_with_the_same_adapter(drop_scores, tiny_model_dir, toy_data, tmp_path, monkeypatch):
    task, refs = toy_data
    calls = []
    stage = SEAL.selector_stage
    monkeypatch.setattr(SEAL, "selector_stage", lambda self: (calls.append(1), stage(self))[1])
    extra = ["train.epochs=2", "train.checkpoint_every=2", "model.lora_dropout=0.1", "seal.keep=0.55",
             "seal.selector_epochs=2", "seal.penalty_decay=0.1"]
    full = train(_cfg(tiny_model_dir, task, refs, tmp_path / "full", *extra))

    def crash(step):
        if step == 4:  # 6 steps (3 per epoch); the checkpoint after 4 steps is mid-epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", *extra), on_step=crash)
    assert not (tmp_path / "cut" / "adapter").exists()
    if drop_scores:
        (tmp_path / "cut" / SCORES_FILE).unlink()
    calls.clear()
    resumed = train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", *extra), resume=True)
    assert len(calls) == (1 if drop_scores else 0)  # the saved selector is reused, not recomputed

    a, b = _adapter(full.run_dir), _adapter(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    for name in ("metrics.jsonl", "selection.jsonl"):
        assert strip(full.run_dir / name) == strip(resumed.run_dir / name)
    assert json.loads((full.run_dir / SCORES_FILE).read_text())["logits"] == \
        json.loads((resumed.run_dir / SCORES_FILE).read_text())["logits"]


# -- the selector cache ------------------------------------------------------------------------------------

def test_selector_cache_serves_another_keep_and_only_the_same_inputs(tiny_model_dir, toy_data, smol_tokenizer,
                                                                      tmp_path, monkeypatch):
    """A run that differs only in keep loads the stage another run filed (and ends bit for bit where a run that
    recomputes it ends); another seed, another selector setting or other base weights recompute."""
    from dualselect.models import tiny_llama

    task, refs = toy_data
    calls = []
    stage = SEAL.selector_stage
    monkeypatch.setattr(SEAL, "selector_stage", lambda self: (calls.append(1), stage(self))[1])
    cache = tmp_path / "cache"
    common = ["train.epochs=1", "seal.selector_epochs=2", "model.lora_dropout=0.1"]
    run = lambda name, *extra, model=tiny_model_dir: train(  # noqa: E731
        _cfg(model, task, refs, tmp_path / name, *common, *extra))

    run("a", "seal.keep=0.55", f"seal.selector_cache={cache}")
    assert len(calls) == 1 and len(list(cache.iterdir())) == 1
    b = run("b", "seal.keep=0.8", f"seal.selector_cache={cache}")
    assert len(calls) == 1  # loaded, not recomputed
    filed = next(cache.iterdir())
    assert json.loads((b.run_dir / SCORES_FILE).read_text())["cached_from"] == str(filed)
    fresh = run("fresh", "seal.keep=0.8")  # no cache: computes the stage itself
    assert len(calls) == 2
    x, y = _adapter(b.run_dir), _adapter(fresh.run_dir)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    logs = [[json.loads(r) for r in (d / "selection.jsonl").read_text().splitlines()] for d in (b.run_dir,
                                                                                             fresh.run_dir)]
    assert logs[0][0].pop("cached_from") == str(filed) and logs[1][0].pop("cached_from") is None
    assert logs[0] == logs[1]

    other_model = tmp_path / "other-model"
    tiny_llama(len(smol_tokenizer), seed=1).save_pretrained(other_model)
    smol_tokenizer.save_pretrained(other_model)
    for i, extra in enumerate([["train.seed=4"], ["seal.lower_lr=1e-3"], []], start=1):
        model = other_model if not extra else tiny_model_dir
        run(f"miss{i}", "seal.keep=0.8", f"seal.selector_cache={cache}", *extra, model=model)
        assert len(calls) == 2 + i, extra or "other base weights"
    assert len(list(cache.iterdir())) == 4


def test_a_broken_cache_file_is_a_clear_error(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    cache = tmp_path / "cache"
    common = ["train.epochs=1", "seal.selector_epochs=1", f"seal.selector_cache={cache}"]
    train(_cfg(tiny_model_dir, task, refs, tmp_path / "a", *common))
    filed = next(cache.iterdir())
    filed.write_text(filed.read_text()[:100])
    with pytest.raises(DualSelectError, match=f"{filed.name} is not a readable selector file"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "b", *common))


# -- config and input errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("seal.keep=0", "keep must be in"),
    ("seal.keep=1.5", "keep must be in"),
    ("seal.penalty=0", "penalty"),
    ("seal.penalty=1.2", "penalty"),
    ("seal.penalty_decay=0.6", "becomes negative"),  # 1.0 - 2 * 0.6 with the default 3 epochs
    ("seal.penalty_decay=-0.1", "penalty_decay"),
    ("seal.selector_epochs=0", "selector_epochs"),
    ("seal.selector_lr=0", "selector_lr"),
    ("seal.lower_lr=-1", "lower_lr"),
    ("seal.ref_batch_size=0", "ref_batch_size"),
    ("seal.max_grad_norm=0", "max_grad_norm"),
    ("seal.activation=relu", "activation"),
])
def test_bad_config_values_give_clear_errors(override, message, tmp_path):
    with pytest.raises(DualSelectError, match=message):
        load_config(None, ["train.method=seal", override], method_configs())


def test_missing_reference_is_a_clear_error(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    assert "seal" in METHODS
    with pytest.raises(DualSelectError, match="reference"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", "data.reference=null"))
