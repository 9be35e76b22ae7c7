"""The embedded demo end to end on the real SmolLM2, shrunk to a few steps (`--quick`)."""

import contextlib
import io
import json

import pytest

from dualselect import models
from dualselect.demo import run_demo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One quick demo for the module (its stdout captured): the demo test reads it, the methods test adds to it."""
    root = tmp_path_factory.mktemp("quick")
    # a cache of its own (sharing only the converted model), so that every stage runs here, whatever earlier
    # demos left in the user's cache
    cache = root / "cache"
    (cache / "models").mkdir(parents=True)
    for converted in (models.cache_dir() / "models").glob("*"):
        (cache / "models" / converted.name).symlink_to(converted)
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setenv("DUALSELECT_CACHE", str(cache))
        demo = run_demo(root / "demo", quick=True, quiet=True, precision="fp32")
    return root, demo, buf.getvalue()


def test_quick_demo_trains_evaluates_and_plots(quick_demo):
    tmp_path, demo, out = quick_demo
    results = demo["training"]
    assert set(results) == {"sft", "dualselect"}
    for method, r in results.items():
        adapter = tmp_path / "demo" / method / "adapter"
        assert r["adapter"] == str(adapter)
        assert (adapter / "adapter_model.safetensors").stat().st_size > 0
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # 24 task rows, batch 8: SFT 3 steps; DualSelect 1 warm-up + 3 filtered steps keeping 4 of 8 each
    assert results["sft"]["steps"] == 3 and results["dualselect"]["steps"] == 4
    sel = results["dualselect"]["selection"]
    assert sel["seen"] == 24 and sel["kept"] == 12
    assert sel["unsafe_share_of_batches"] == pytest.approx(6 / 24)  # round(0.25 * 24) harmful rows
    assert "DualSelect kept 12 of 24" in out and str(tmp_path / "demo" / "dualselect" / "adapter") in out
    # the result table: four models, three columns, each cell a value with its interval
    rows = [ln for ln in demo["table"].splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == ["base", "aligned", "sft", "dualselect"]
    assert all(cell.strip()[0].isdigit() and "[" in cell for r in rows for cell in r.split("|")[2:5])
    assert demo["table"] in out
    # each model was evaluated on the same held-out prompts (4 each with --quick), with no train/test overlap
    for name in ("base", "aligned", "sft", "dualselect"):
        res = json.loads((tmp_path / "demo" / "eval" / name / "results.json").read_text())
        assert [b["n"] for b in res["benchmarks"]] == [4, 4, 4]
        assert all(b["n_overlap"] == 0 for b in res["benchmarks"])
    assert demo["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --precision reaches every stage: the alignment run, both task runs and every evaluation
    for run in ("align", "sft", "dualselect"):
        info = json.loads((tmp_path / "demo" / run / "run_info.json").read_text())["machine"]
        assert info["precision"] == "fp32" and info["precision_reason"] == "set by model.precision"
    for name in ("base", "aligned", "sft", "dualselect"):
        res = json.loads((tmp_path / "demo" / "eval" / name / "results.json").read_text())
        assert res["model"]["precision"] == "fp32" and res["model"]["precision_used"] == "fp32"
    assert json.loads((tmp_path / "demo" / "demo_settings.json").read_text())["precision"] == "fp32"
    assert set(demo["report"]["comparisons"]) == {"base", "aligned", "dualselect"}  # each paired with sft


def test_demo_methods_compares_more_methods_on_a_finished_demo(quick_demo):
    """benchmarks/demo_methods.py on a quick demo: two methods trained, evaluated, reported, timed; a second call
    skips them (resumable)."""
    import subprocess
    import sys
    from pathlib import Path

    tmp_path = quick_demo[0]
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "demo_methods.py"
    cmd = [sys.executable, str(script), "--demo", str(tmp_path / "demo"), "--methods", "sft", "random", "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sft: " in first.stdout and "random: " in first.stdout  # both trained
    out = tmp_path / "demo" / "methods"
    rep = json.loads((out / "report" / "report.json").read_text())
    untrained = ["base (no training)", "aligned (no training)"]  # the demo's own evaluations, for reference
    assert list(rep["results"]) == ["sft", "random", *untrained] and set(rep["comparisons"]) == {"random", *untrained}
    timing = (out / "timing.md").read_text().splitlines()
    assert timing[2].startswith("| sft |") and "| 1.00 |" in timing[2] and timing[3].startswith("| random |")
    budget = json.loads((out / "random" / "run_info.json").read_text())["budget"]
    # quick demo: 24 task rows in batches of 8, one epoch; random: the quick DualSelect's 1 full warm-up step,
    # then 3 keeping 4 of 8
    assert budget["steps_by_phase"] == {"warmup": 1, "train": 3} and budget["trained_samples"] == 1 * 8 + 3 * 4
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "sft: " not in again.stdout  # nothing retrained


def test_shipped_benign_answers_are_the_models_own_greedy_answers(tmp_path):
    """The shipped answers begin with what the embedded model itself generates now for the same prompts, batch
    and precision (the first batch, 8 new tokens instead of the shipped 48: greedy decoding of the same batch
    gives the same prefix; a few rows may differ where another CPU's float sums break a near tie)."""
    from dualselect import demo, models
    from dualselect.generation import generate

    shipped = json.loads(demo.SHIPPED_BENIGN.read_text())
    first = shipped["answers"][:shipped["settings"]["batch_size"]]
    tok = models.load_tokenizer(models.DEFAULT_MODEL)
    model, _, device = models.load_model(models.DEFAULT_MODEL, shipped["settings"]["precision"])
    now = generate(model, tok, [a["prompt"] for a in first], max_new_tokens=8, batch_size=len(first), device=device)
    same = sum(a["answer"].startswith(n.strip()) and len(n.strip()) > 0 for a, n in zip(first, now))
    assert same >= 0.9 * len(first), f"only {same} of {len(first)} shipped answers start as the model answers now"
