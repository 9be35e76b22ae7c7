"""The embedded demo end to end on the real SmolLM2, shrunk to a few steps (`--quick`)."""

import json

import pytest

from dualselect.demo import run_demo

pytestmark = pytest.mark.integration


def test_quick_demo_trains_both_methods(tmp_path, capsys):
    results = run_demo(tmp_path / "demo", quick=True, quiet=True)
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
