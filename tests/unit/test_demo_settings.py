"""The demo's stage settings: validation, the CLI options that set them, and what demo_seeds.py reads back."""

import json

import pytest

from dualselect.cli import main
from dualselect.demo import DemoSettings, run_demo, settings_of
from dualselect.errors import DualSelectError


def test_settings_go_into_every_stage_override():
    s = DemoSettings(precision="fp32", eval_limit=50, generation_batch_size=32)
    assert s.precision_override() == "model.precision=fp32"
    ev = s.eval_overrides()
    assert "eval.limit=50" in ev and "eval.batch_size=32" in ev and "model.precision=fp32" in ev
    q = DemoSettings.quick(precision="bf16-autocast", n_task=12)
    assert (q.precision, q.n_task, q.n_reference) == ("bf16-autocast", 12, 8)  # quick sizes, the changes on top


@pytest.mark.parametrize("changes, message", [
    ({"n_task": 0}, "n_task must be an integer >= 1"),
    ({"eval_limit": -3}, "eval_limit must be an integer >= 1"),
    ({"harmful_fraction": 1.5}, "harmful_fraction must be in"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(DualSelectError, match=message):
        DemoSettings(**changes)


def test_run_demo_refuses_unknown_settings_and_precisions(tmp_path):
    with pytest.raises(DualSelectError, match="unknown settings n_tasks"):
        run_demo(tmp_path / "d", n_tasks=3)
    with pytest.raises(DualSelectError, match="precision must be one of"):
        run_demo(tmp_path / "d", precision="fp16")
    assert not (tmp_path / "d").exists()  # refused before anything is written


def test_cli_bad_option_is_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--eval-limit", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: demo: eval_limit must be an integer >= 1, got 0"


def test_settings_of_reads_back_what_a_demo_wrote(tmp_path):
    s = DemoSettings(n_task=100, precision="fp32")
    from dataclasses import asdict

    (tmp_path / "demo_settings.json").write_text(json.dumps(asdict(s)))
    assert settings_of(tmp_path) == s
    assert settings_of(tmp_path / "nothing-here") == DemoSettings()
