"""NaN / inf losses and gradients (train.nonfinite: stop | skip) on a tiny random Llama, and cosines of zero
vectors. A NaN is injected through one sample id by wrapping the method's loss computation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dualselect.cli import main
from dualselect.config import load_config
from dualselect.errors import DualSelectError
from dualselect.methods import dualselect as ds_method
from dualselect.methods import method_configs
from dualselect.methods import sft as sft_method
from dualselect.methods.context import NonFiniteError, nonfinite_grad_rows, nonfinite_rows
from dualselect.schedule import batch_plan
from dualselect.selection.dualselect import cosine, cosines
from dualselect.train import train

NAN, INF = float("nan"), float("inf")
# toy_data: 20 task samples t0..t19 (position i = id ti), 12 references r0..r11; batch 4, seed 3 (as below)
PLAN = batch_plan(20, 4, 1, 3)
BAD_STEP = 2
BAD = f"t{PLAN[BAD_STEP].ids[1]}"  # a sample of step 2 only (one epoch)
STEP_IDS = [f"t{i}" for i in PLAN[BAD_STEP].ids]


def _overrides(model_dir, task, refs, out, *extra):
    return [f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
            "model.lora_dropout=0", f"data.task={task}", f"data.reference={refs}", "data.max_length=64",
            "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}",
            *extra]


def _cfg(*args, **kw):
    return load_config(None, _overrides(*args, **kw), method_configs())


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _poison_sft(monkeypatch, bad_ids):
    """sft's batch losses: NaN (with graph, so the gradient is NaN too) for the samples in `bad_ids`."""
    orig = sft_method.batch_losses

    def poisoned(model, batch, *a, **kw):
        losses, tokens = orig(model, batch, *a, **kw)
        rows = [j for j, e in enumerate(batch) if e.id in bad_ids]
        if rows:  # (not torch.where: its backward would make every gradient NaN)
            losses = losses.clone()
            losses[rows] = losses[rows] * NAN
        return losses, tokens

    monkeypatch.setattr(sft_method, "batch_losses", poisoned)


def _poison_dualselect(monkeypatch, bad_loss=(), bad_grad=()):
    """DualSelect's per-sample losses / gradients: NaN loss for ids in bad_loss, an inf gradient entry for bad_grad."""
    orig = ds_method.DualSelect.per_sample_grads

    def poisoned(self, samples):
        out = orig(self, samples)
        for j, e in enumerate(samples):
            if e.id in bad_loss:
                out.losses[j] = NAN
            if e.id in bad_grad:
                out.grads[j, 3] = INF
        return out

    monkeypatch.setattr(ds_method.DualSelect, "per_sample_grads", poisoned)


# ------------------------------------------------------------------------------------------- helpers


def test_cosine_of_a_zero_vector_is_zero_never_nan():
    z, v = torch.zeros(5), torch.arange(1.0, 6.0)
    for eps in (1e-12, 0.0):
        assert cosine(z, v, eps=eps) == 0.0 and cosine(v, z, eps=eps) == 0.0 and cosine(z, z, eps=eps) == 0.0
        G = torch.stack([v, z, -v])
        out = cosines(G, v, eps=eps)
        assert not torch.isnan(out).any()
        assert out[1].item() == 0.0 and out[0].item() == pytest.approx(1.0) and out[2].item() == pytest.approx(-1.0)
        assert torch.equal(cosines(G, z, eps=eps), torch.zeros(3, dtype=torch.float64))


def test_nonfinite_rows_names_rows_and_what():
    losses = torch.tensor([0.5, NAN, 1.0, 2.0])
    grads = torch.ones(4, 3)
    grads[2, 1] = -INF
    assert nonfinite_rows(losses, grads) == ([1, 2], "loss and gradient")
    assert nonfinite_rows(losses) == ([1], "loss")
    assert nonfinite_rows(torch.ones(4), grads) == ([2], "gradient")
    assert nonfinite_rows(torch.ones(4), torch.ones(4, 3)) == ([], "")
    # the gradients are checked a few rows at a time: the same rows as a check of the whole matrix at once
    g = torch.randn(7, 5, 2)
    g[0, 4, 1], g[3, 0, 0], g[6, 2, 1] = NAN, INF, -INF
    assert torch.equal(nonfinite_grad_rows(g), ~torch.isfinite(g.reshape(7, -1)).all(dim=1))
    assert nonfinite_rows(torch.ones(7), g) == ([0, 3, 6], "gradient")
    assert nonfinite_grad_rows(torch.zeros(0, 5)).shape == (0,)
    # a row-sum prefilter: a finite row whose float32 sum overflows is still finite; +inf and -inf (sum NaN) are not
    big = torch.tensor([[3e38, 3e38, 1.0], [INF, -INF, 1.0], [1.0, 2.0, 3.0]])
    assert nonfinite_grad_rows(big).tolist() == [False, True, False]
    assert nonfinite_rows(torch.ones(0), torch.ones(0, 5)) == ([], "")


# ------------------------------------------------------------------------------------------- sft


def test_sft_stop_ends_the_run_with_one_line_and_keeps_the_checkpoint(tiny_model_dir, toy_data, tmp_path,
                                                                       monkeypatch, capsys):
    task, refs = toy_data
    _poison_sft(monkeypatch, {BAD})
    out = tmp_path / "run"
    rc = main(["train", *_overrides(tiny_model_dir, task, refs, out, "train.checkpoint_every=2")])  # nonfinite: stop
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not progress bars
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    err = err[0]
    assert f"step {BAD_STEP} " in err and "non-finite loss and gradient" in err and "train.nonfinite=skip" in err
    assert all(i in err for i in STEP_IDS)  # sft has one batch loss: every sample of the step is named
    assert "checkpoints/step-000002 is intact" in err
    # the last good checkpoint is intact, nothing after it and no adapter were written
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]
    state = torch.load(out / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    assert state["step"] == 2
    weights = load_file(str(out / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "adapter").exists()
    assert [m["step"] for m in _metrics(out)] == [0, 1]
    assert "non-finite loss and gradient" in (out / "train.log").read_text()


def test_sft_skip_skips_the_step_and_logs_its_ids(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    task, refs = toy_data
    _poison_sft(monkeypatch, {BAD})
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", "train.nonfinite=skip", "train.checkpoint_every=2",
                     f"train.max_steps={BAD_STEP + 1}"))
    rows = _metrics(res.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    skipped = rows[BAD_STEP]
    assert skipped["skipped"] is True and skipped["grad_norm"] is None and skipped["trained_samples"] == 0
    assert skipped["nonfinite"] == [{"data": None, "what": "loss and gradient", "ids": STEP_IDS}]
    assert all("skipped" not in r and r["loss"] > 0 for r in rows[:BAD_STEP])
    assert f"step {BAD_STEP}: non-finite loss and gradient" in (res.run_dir / "train.log").read_text()
    # no update: the final adapter is the one of the checkpoint before the skipped step
    before = load_file(str(res.run_dir / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    budget = json.loads((res.run_dir / "run_info.json").read_text())["budget"]
    assert budget["optimizer_steps"] == BAD_STEP and budget["trained_samples"] == 4 * BAD_STEP


# ------------------------------------------------------------------------------------------- dualselect

DS = ["train.method=dualselect", "dualselect.warmup_steps=1", "dualselect.k_task=2", "dualselect.k_ref=3"]
DS_PLAN = batch_plan(20, 4, 1, 3, warmup_steps=1)  # step 0 the warm-up, epoch 1 (and its refresh) from step 1
DS_STEP = 3
DS_BAD = next(f"t{i}" for i in DS_PLAN[DS_STEP].ids if i not in DS_PLAN[0].ids)  # not in the warm-up batch
DS_STEP_IDS = [f"t{i}" for i in DS_PLAN[DS_STEP].ids]


def test_dualselect_stop_names_exactly_the_offending_sample(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    task, refs = toy_data
    _poison_dualselect(monkeypatch, bad_loss={DS_BAD})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as info:
        train(_cfg(tiny_model_dir, task, refs, out, *DS))
    e = info.value
    assert isinstance(e, DualSelectError) and "\n" not in str(e)
    assert e.ids == [DS_BAD] and e.what == "loss" and e.data == "task"
    assert f"step {DS_STEP} (epoch 1, train): non-finite loss (NaN or inf) on task samples {DS_BAD};" in str(e)
    assert "no checkpoint was saved" in str(e) and not (out / "adapter").exists()
    # a reference with an inf gradient stops the run at the refresh, named as a reference
    _poison_dualselect(monkeypatch, bad_grad={"r4"})
    with pytest.raises(NonFiniteError, match="non-finite gradient .* on reference samples r4;"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "ref", *DS))


def test_dualselect_skip_drops_only_the_offending_samples(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    task, refs = toy_data
    _poison_dualselect(monkeypatch, bad_loss={"r4"}, bad_grad={DS_BAD})
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", *DS, "train.nonfinite=skip", "train.max_steps=5"))
    rows = _metrics(res.run_dir)
    assert len(rows) == 5 and not any(r.get("skipped") for r in rows)
    events = {r["step"]: r["nonfinite"] for r in rows if "nonfinite" in r}
    assert events == {1: [{"data": "reference", "what": "loss", "ids": ["r4"]}],  # the refresh of epoch 1
                      DS_STEP: [{"data": "task", "what": "gradient", "ids": [DS_BAD]}]}
    assert rows[DS_STEP]["n_samples"] == 4 and rows[DS_STEP]["trained_samples"] == 2
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in rows)
    recs = [json.loads(x) for x in (res.run_dir / "selection.jsonl").read_text().splitlines()]
    refresh = next(r for r in recs if r["kind"] == "refresh")
    assert "r4" not in refresh["candidates"]["ids"] and refresh["n_scored"] == 11 and len(refresh["ids"]) == 3
    step = next(r for r in recs if r["kind"] == "step" and r["step"] == DS_STEP)
    assert step["candidates"]["ids"] == [i for i in DS_STEP_IDS if i != DS_BAD] and DS_BAD not in step["ids"]
    log = (res.run_dir / "train.log").read_text()
    assert f"non-finite gradient (NaN or inf) on task samples {DS_BAD}: left out of the update" in log
    assert "on reference samples r4: left out" in log
    after = load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in after.values())


def test_dualselect_skip_without_any_finite_sample_skips_the_step(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    task, refs = toy_data
    _poison_dualselect(monkeypatch, bad_loss=set(DS_STEP_IDS))
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", *DS, "train.nonfinite=skip",
                     f"train.max_steps={DS_STEP + 1}"))
    rows = _metrics(res.run_dir)
    last = rows[-1]
    assert last["step"] == DS_STEP and last["skipped"] is True and last["grad_norm"] is None
    assert last["nonfinite"] == [{"data": "task", "what": "loss", "ids": DS_STEP_IDS}]
    # two of them were in the warm-up batch too: left out there, the warm-up step still trained on the others
    warm = [f"t{i}" for i in DS_PLAN[0].ids]
    assert rows[0]["nonfinite"] == [{"data": "task", "what": "loss", "ids": [i for i in warm if i in DS_STEP_IDS]}]
    assert rows[0]["trained_samples"] == 2 and "skipped" not in rows[0]


@pytest.mark.parametrize("variant", [["dualselect.references=random", "dualselect.k_ref=12"],
                                     ["dualselect.score_norm=zscore"]])
def test_dualselect_skip_leaves_out_a_reference_in_every_refresh_variant(variant, tiny_model_dir, toy_data, tmp_path,
                                                                         monkeypatch):
    task, refs = toy_data
    _poison_dualselect(monkeypatch, bad_grad={"r4"})
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", *DS, *variant, "train.nonfinite=skip",
                     "train.max_steps=2"))
    rows = _metrics(res.run_dir)
    assert rows[1]["nonfinite"] == [{"data": "reference", "what": "gradient", "ids": ["r4"]}]
    refresh = next(json.loads(x) for x in (res.run_dir / "selection.jsonl").read_text().splitlines()
                   if json.loads(x)["kind"] == "refresh")
    assert "r4" not in refresh["ids"] and "r4" not in refresh["candidates"]["ids"] and refresh["n_scored"] == 11
    kept = 11 if "random" in variant[0] else 3  # random: every reference drawn (k_ref 12), r4 left out
    assert len(refresh["ids"]) == len(refresh["weights"]) == len(refresh["loss_terms"]) == kept
