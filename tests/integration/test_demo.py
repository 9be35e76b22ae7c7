"""The embedded demo end to end on the real SmolLM2, shrunk to a few steps (`--quick`)."""

import json

import pytest

from dualselect.demo import run_demo

pytestmark = pytest.mark.integration


def test_quick_demo_trains_evaluates_and_plots(tmp_path, capsys):
    demo = run_demo(tmp_path / "demo", quick=True, quiet=True, precision="fp32")
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
    assert sel["unsafe_share_of_batches"] == pytest.approx(5 / 24)
    out = capsys.readouterr().out
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
