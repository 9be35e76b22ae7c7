"""Selection arithmetic on a device without float64 (Apple MPS): float32 there, float64 everywhere else. The float32
path, forced on the CPU, selects the same samples as the float64 one and gives the same directions (to float32
rounding), in the pure functions and in a DualSelect run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dualselect.selection import dtypes
from dualselect.selection.dtypes import wide_dtype
from dualselect.selection.dualselect import (
    cosine,
    cosines,
    in_conflict,
    project_conflict,
    reference_scores,
    select_references,
    select_task,
    standardize,
    task_scores,
    weighted_direction,
)


def test_float64_except_where_the_device_has_none(monkeypatch):
    assert wide_dtype() == wide_dtype("cpu") == wide_dtype(torch.device("cuda", 0)) == torch.float64
    assert wide_dtype(torch.device("mps")) == wide_dtype("mps:0") == torch.float32
    monkeypatch.setattr(dtypes, "FORCE_FLOAT32", True)
    assert wide_dtype("cpu") == wide_dtype("cuda") == torch.float32


def _example():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(16, 300, generator=g)
    grads[3] = 0.0  # a vanishing gradient: cosine exactly 0
    d_t = torch.randn(300, generator=g)
    losses = torch.rand(16, generator=g) * 3
    tokens = torch.randint(1, 40, (16,), generator=g)
    return grads, d_t, losses, tokens


def _selection_path():
    """Every selection function on the fixed example: what a refresh and a filtered step compute."""
    grads, d_t, losses, tokens = _example()
    cos = cosines(grads, d_t)
    out = {"cos_dtype": cos.dtype, "cos": cos, "cosine": cosine(grads[0], d_t)}
    ref = reference_scores(losses, cos, 1.0, 1.0)
    for mode in ("hard", "soft"):
        sel = select_references(ref, 5, mode, 0.1)
        out[f"ref_{mode}"] = sel
        g_r = weighted_direction(grads[sel.index], sel.weights)
        out[f"g_r_{mode}"] = g_r
        task = task_scores(standardize(losses), standardize(cosines(grads, g_r)), 1.0, 1.0)
        out[f"task_{mode}"] = select_task(task, 6, mode, 0.1)
        out[f"budget_{mode}"] = select_task(task, None, "hard", tokens=tokens, budget=0.6)
        g_t = weighted_direction(grads[out[f"task_{mode}"].index], out[f"task_{mode}"].weights)
        out[f"g_t_{mode}"] = g_t
        out[f"conflict_{mode}"] = in_conflict(g_t, -g_r)
        out[f"projected_{mode}"] = project_conflict(g_t, -g_r)
    return out


def test_the_float32_path_selects_what_the_float64_path_selects(monkeypatch):
    want = _selection_path()
    monkeypatch.setattr(dtypes, "FORCE_FLOAT32", True)
    got = _selection_path()
    assert want["cos_dtype"] == torch.float64 and got["cos_dtype"] == torch.float32
    torch.testing.assert_close(got["cos"], want["cos"].float(), rtol=1e-5, atol=1e-6)
    assert got["cos"][3] == 0.0 and got["cosine"] == pytest.approx(want["cosine"], rel=1e-5)
    for mode in ("hard", "soft"):
        for name in ("ref", "task", "budget"):
            assert got[f"{name}_{mode}"].index == want[f"{name}_{mode}"].index, (name, mode)
            assert got[f"{name}_{mode}"].weights == pytest.approx(want[f"{name}_{mode}"].weights, rel=1e-4)
        for name in ("g_r", "g_t", "projected"):
            assert got[f"{name}_{mode}"].dtype == torch.float32
            torch.testing.assert_close(got[f"{name}_{mode}"], want[f"{name}_{mode}"], rtol=1e-5, atol=1e-6)
        assert got[f"conflict_{mode}"] == want[f"conflict_{mode}"]
    assert want["conflict_hard"]  # the projection was exercised


DS = ["train.method=dualselect", "dualselect.warmup_steps=2", "dualselect.k_task=2", "dualselect.k_ref=3"]


@pytest.mark.parametrize("options", [DS, [*DS, "dualselect.mode=soft", "dualselect.score_norm=zscore",
                                          "dualselect.correction=project", "dualselect.refresh=steps",
                                          "dualselect.refresh_steps=2"],
                                     ["train.method=safegrad", "safegrad.ref_batch_size=2"]],
                         ids=["paper", "soft-zscore-project", "safegrad"])
def test_a_dualselect_run_in_float32_selects_the_same_samples(tiny_model_dir, toy_data, tmp_path, monkeypatch,
                                                               options):
    from dualselect.config import load_config
    from dualselect.methods import method_configs
    from dualselect.train import train

    task, refs = toy_data

    def run(name):
        cfg = load_config(None, [
            f"model.name_or_path={tiny_model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
            "model.lora_dropout=0", f"data.task={task}", f"data.reference={refs}", "data.max_length=64",
            "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", "train.epochs=2",
            f"train.output_dir={tmp_path / name}", *options], method_configs())
        res = train(cfg)
        picks = [(r["kind"], r.get("index")) for r in map(json.loads, (res.run_dir / "selection.jsonl").open())]
        return picks, load_file(str(res.run_dir / "adapter" / "adapter_model.safetensors"))

    want_picks, want = run("float64")
    monkeypatch.setattr(dtypes, "FORCE_FLOAT32", True)
    got_picks, got = run("float32")
    assert got_picks == want_picks
    assert any(kind == ("step" if "train.method=safegrad" in options else "refresh") for kind, _ in want_picks)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
