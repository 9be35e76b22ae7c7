"""precision: auto - the decision rule (CPU flags and a timed probe in, precision out) with the probe mocked,
explicit precisions honoured, and the choice recorded in run_info.json."""

import json
import logging

import pytest
import torch

from dualselect import models
from dualselect.models import BF16_PROBE_MAX_RATIO, choose_precision, decide_cpu_precision, decide_cuda_precision

AVX2_ONLY = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 fma avx f16c avx2 bmi2".split())  # the AMD EPYC VM
AVX512_NO_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # an Intel Xeon without bf16
SAPPHIRE_RAPIDS = AVX512_NO_BF16 | {"avx512_bf16", "amx_bf16", "amx_tile"}
ARM_BF16 = frozenset("fp asimd sve bf16 i8mm".split())


def _never_called():
    raise AssertionError("the probe must not run on a CPU without native bf16")


@pytest.mark.parametrize("flags", [AVX2_ONLY, AVX512_NO_BF16, frozenset()])
def test_no_native_bf16_means_fp32_without_probing(flags):
    choice = decide_cpu_precision(flags, _never_called)
    assert choice.precision == "fp32"
    assert "no native bf16" in choice.reason


@pytest.mark.parametrize("flags", [SAPPHIRE_RAPIDS, ARM_BF16])
def test_native_bf16_that_the_probe_finds_faster_means_bf16_autocast(flags):
    calls = []

    def probe():
        calls.append(1)
        return 1.0, 0.55  # fp32 s, bf16 s

    choice = decide_cpu_precision(flags, probe)
    assert calls == [1]
    assert choice.precision == "bf16-autocast"
    assert "0.55x" in choice.reason


@pytest.mark.parametrize("t16, expected", [(0.80, "bf16-autocast"), (0.90, "fp32"), (1.3, "fp32"), (14.5, "fp32")])
def test_probe_threshold(t16, expected):
    assert BF16_PROBE_MAX_RATIO == 0.85  # the rule the cases below were written for
    choice = decide_cpu_precision(SAPPHIRE_RAPIDS, lambda: (1.0, t16))
    assert choice.precision == expected
    if expected == "fp32":
        assert "native bf16" in choice.reason and f"{t16:.2f}x" in choice.reason


def test_cuda_rule():
    assert decide_cuda_precision(True).precision == "bf16"
    assert decide_cuda_precision(False).precision == "fp32"


@pytest.fixture()
def fresh_choices(monkeypatch):
    monkeypatch.setattr(models, "_CHOICES", {})


def test_auto_on_cpu_uses_the_flags_of_this_machine(fresh_choices, monkeypatch):
    monkeypatch.setattr(models, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(models, "bf16_probe", _never_called)
    assert choose_precision("auto", torch.device("cpu")).precision == "fp32"


def test_explicit_precision_is_honoured_with_a_warning_where_slow(fresh_choices, monkeypatch, caplog):
    monkeypatch.setattr(models, "cpu_flags", lambda: AVX2_ONLY)
    with caplog.at_level(logging.WARNING, logger="dualselect.models"):
        choice = choose_precision("bf16-autocast", torch.device("cpu"))
    assert choice.precision == "bf16-autocast"
    assert any("without native bf16" in r.message for r in caplog.records)
    models._CHOICES.clear()
    monkeypatch.setattr(models, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dualselect.models"):
        assert choose_precision("bf16", torch.device("cpu")).precision == "bf16"
        assert choose_precision("fp32", torch.device("cpu")).precision == "fp32"
    assert not caplog.records


def test_the_real_probe_returns_two_positive_times():
    t32, t16 = models.bf16_probe(size=64, repeats=1)
    assert t32 > 0 and t16 > 0


def test_run_info_records_the_choice_and_its_reason(fresh_choices, monkeypatch, tiny_model_dir, toy_data, tmp_path):
    from dualselect.config import load_config
    from dualselect.methods import method_configs
    from dualselect.train import train

    monkeypatch.setattr(models, "cpu_flags", lambda: AVX2_ONLY)
    task, _ = toy_data
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.lora_r=2",
                             f"data.task={task}", "data.max_length=64", "train.max_steps=1", "train.quiet=true",
                             f"train.output_dir={tmp_path / 'run'}"], method_configs())
    assert cfg.model.precision == "auto"
    train(cfg)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())["machine"]
    assert info["precision"] == "fp32" and "no native bf16" in info["precision_reason"]
