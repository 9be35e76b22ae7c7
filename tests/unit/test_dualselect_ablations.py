"""DualSelect's ablation options: each changes exactly the term it names (refresh schedule, random references,
no filter, no correction, projection, one-term scores, score_norm: zscore)."""

import json
import random

import pytest
import torch

from dualselect.config import load_config
from dualselect.errors import DualSelectError
from dualselect.grads import flatten
from dualselect.methods import method_configs
from dualselect.methods.dualselect import DualSelect
from dualselect.schedule import PlannedStep
from dualselect.selection import project_conflict, standardize
from dualselect.train import build, train


def _cfg(model_dir, task, refs, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", f"data.reference={refs}", "data.max_length=64", "train.method=dualselect",
        "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}",
        "dualselect.warmup_steps=2", "dualselect.k_task=2", "dualselect.k_ref=3", *extra], method_configs())


def _log(run_dir, kind=None):
    recs = [json.loads(x) for x in (run_dir / "selection.jsonl").read_text().splitlines()]
    return [r for r in recs if kind is None or r["kind"] == kind]


def test_refresh_once_keeps_the_warmup_references(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "once", "train.epochs=3", "dualselect.refresh=once"))
    kinds = [r["kind"] for r in _log(res.run_dir)]
    assert kinds == ["warmup"] * 2 + ["refresh"] + ["step"] * 15  # one refresh, at epoch 1, none after
    default = train(_cfg(tiny_model_dir, task, refs, tmp_path / "epoch", "train.epochs=3"))
    assert [r["epoch"] for r in _log(default.run_dir, "refresh")] == [1, 2, 3]
    assert _log(default.run_dir, "refresh")[0]["ids"] == _log(res.run_dir, "refresh")[0]["ids"]


def test_refresh_every_n_steps(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "n", "train.epochs=2", "dualselect.refresh=steps",
                     "dualselect.refresh_steps=3"))
    kinds = "".join({"warmup": "w", "refresh": "R", "step": "s"}[r["kind"]] for r in _log(res.run_dir))
    # 10 filtered steps (2 epochs x 5): a refresh at epoch 1, then before every 4th, 7th, 10th filtered step
    assert kinds == "ww" + "R" + "sss" + "R" + "sss" + "R" + "sss" + "R" + "s"
    norms = [r["d_t_norm"] for r in _log(res.run_dir, "refresh")]
    assert all(n > 0 for n in norms) and len(set(norms)) == 4  # a new task direction each time


def test_random_references_are_the_seeded_draw(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data  # 12 references r0..r11
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "rand", "train.epochs=2", "dualselect.references=random"))
    got = _log(res.run_dir, "refresh")
    for rec in got:
        rng = random.Random(f"dualselect-random-refs-3-{rec['refresh']}")
        expect = sorted(rng.sample(range(12), 3))
        assert rec["index"] == expect and rec["ids"] == [f"r{i}" for i in expect]
        assert rec["weights"] == [1.0] * 3 and rec["n_scored"] == 3  # only the drawn ones are computed
    assert got[0]["index"] != got[1]["index"]


def _method(tiny_model_dir, toy_data, tmp_path, *extra):
    task, refs = toy_data
    cfg = _cfg(tiny_model_dir, task, refs, tmp_path / "m", "model.lora_dropout=0", "dualselect.score_mode=eval",
               *extra)
    (tmp_path / "m").mkdir()
    setup = build(cfg, tmp_path / "m")
    torch.manual_seed(0)
    for p in setup.ctx.params:  # non-zero LoRA B, so every block has a gradient
        p.data.normal_(0, 0.05)
    return DualSelect(cfg.method_args, setup.ctx), setup.ctx


@pytest.mark.parametrize("correction", ["add", "project"])
def test_the_update_is_the_kept_mean_plus_the_configured_correction(correction, tiny_model_dir, toy_data, tmp_path):
    method, ctx = _method(tiny_model_dir, toy_data, tmp_path, f"dualselect.correction={correction}",
                          "dualselect.rho=0.3")
    ids = (0, 1, 2, 3)
    out = ctx.engine(ctx.model, [ctx.task[i] for i in ids], ctx.device)
    g_mean = out.grads.mean(0)
    method.g_r = -g_mean + 0.01 * out.grads[0]  # a reference direction in conflict with the task
    method.step(PlannedStep(5, "train", 1, ids, False, False))
    got = flatten([p.grad for p in ctx.params], ctx.params)
    kept = [ctx.task[i].id for i in ids]
    step = _log(tmp_path / "m", "step")[-1]
    g_t = out.grads[[kept.index(i) for i in step["ids"]]].mean(0)
    assert torch.dot(g_t, method.g_r) < 0  # the constructed conflict
    base = project_conflict(g_t, method.g_r) if correction == "project" else g_t
    torch.testing.assert_close(got, base + 0.3 * method.g_r, rtol=1e-4, atol=1e-7)
    if correction == "project":  # the projected part no longer opposes g_R
        assert abs(float(torch.dot(got - 0.3 * method.g_r, method.g_r))) < 1e-6 * float(g_t.norm() * method.g_r.norm())


def test_no_correction_and_no_filter(tiny_model_dir, toy_data, tmp_path):
    method, ctx = _method(tiny_model_dir, toy_data, tmp_path, "dualselect.rho=0", "dualselect.k_task=0")
    ids = (4, 5, 6, 7)
    out = ctx.engine(ctx.model, [ctx.task[i] for i in ids], ctx.device)
    method.g_r = torch.randn_like(out.grads[0])
    metrics = method.step(PlannedStep(5, "train", 1, ids, False, False))
    assert metrics["trained_samples"] == 4  # k_task=0: nothing filtered
    torch.testing.assert_close(flatten([p.grad for p in ctx.params], ctx.params), out.grads.mean(0),
                               rtol=1e-4, atol=1e-7)  # rho=0: no correction


def test_zscore_scores_are_standardised_terms(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "z", "train.epochs=1", "dualselect.score_norm=zscore",
                     "dualselect.nu=2", "dualselect.mu_task=0.5", "dualselect.mu_ref=0.5"))
    ref = _log(res.run_dir, "refresh")[0]
    c = ref["candidates"]
    expect = (0.5 * standardize(c["losses"]) - 2 * standardize(c["cosines"])).tolist()
    top = sorted(range(len(expect)), key=lambda i: (-expect[i], i))[:3]
    assert ref["index"] == top
    assert ref["scores"] == pytest.approx([expect[i] for i in top])
    for step in _log(res.run_dir, "step"):
        c = step["candidates"]
        expect = (0.5 * standardize(c["losses"]) - 2 * standardize(c["cosines"])).tolist()
        assert c["scores"] == pytest.approx(expect)
        assert sorted(step["ids"]) == sorted(c["ids"][i] for i in sorted(range(4), key=lambda i: (expect[i], i))[:2])
    # without zscore the same options give the raw terms
    raw = train(_cfg(tiny_model_dir, task, refs, tmp_path / "raw", "train.epochs=1", "dualselect.nu=2",
                     "dualselect.mu_task=0.5", "dualselect.mu_ref=0.5"))
    step = _log(raw.run_dir, "step")[0]
    c = step["candidates"]
    assert c["scores"] == pytest.approx([0.5 * l - 2 * x for l, x in zip(c["losses"], c["cosines"])])


@pytest.mark.parametrize("override, message", [
    ("dualselect.refresh=steps", "refresh=steps needs refresh_steps"),
    ("dualselect.refresh_steps=3", "refresh_steps is set but refresh is 'epoch'"),
    ("dualselect.ref_pool_limit=-1", "ref_pool_limit must be >= 1"),
    ("dualselect.correction=projection", "did you mean 'project'"),
    ("dualselect.score_norm=z", "one of 'none', 'zscore'"),
])
def test_ablation_config_errors(override, message, tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    with pytest.raises(DualSelectError, match=message):
        _cfg(tiny_model_dir, task, refs, tmp_path / "x", override)


def test_warmup_within_the_budget_takes_sfts_own_steps(tiny_model_dir, toy_data, tmp_path):
    from dualselect.schedule import batch_plan, warmup_within

    sft_plan = batch_plan(20, 4, 2, 3)
    plan = warmup_within(sft_plan, 3)
    assert [s.ids for s in plan] == [s.ids for s in sft_plan] and len(plan) == 10
    assert [s.phase for s in plan] == ["warmup"] * 3 + ["train"] * 7
    assert [s.epoch for s in plan] == [0] * 3 + [1] * 2 + [2] * 5
    assert [s.index for s in plan if s.first_of_epoch] == [0, 3, 5]
    assert [s.index for s in plan if s.last_of_epoch] == [2, 4, 9]
    with pytest.raises(ValueError, match="fewer than the 10 planned steps"):
        warmup_within(sft_plan, 10)
    task, refs = toy_data
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "in", "train.epochs=2", "dualselect.warmup_steps=3",
                     "dualselect.warmup_in_budget=true"))
    budget = json.loads((res.run_dir / "run_info.json").read_text())["budget"]
    assert budget["optimizer_steps"] == 10 and budget["steps_by_phase"] == {"warmup": 3, "train": 7}
    assert [r["epoch"] for r in _log(res.run_dir, "refresh")] == [1, 2]  # the first refresh follows the warm-up
    extra = train(_cfg(tiny_model_dir, task, refs, tmp_path / "extra", "train.epochs=2", "dualselect.warmup_steps=3"))
    assert json.loads((extra.run_dir / "run_info.json").read_text())["budget"]["optimizer_steps"] == 13
