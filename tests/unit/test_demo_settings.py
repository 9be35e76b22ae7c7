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


# ------------------------------------------------------------------ shipped benign answers

def test_shipped_benign_answers_cover_the_seed0_prompts_in_order(tmp_path):
    """The shipped file answers exactly the benign alignment prompts the demo writes for seed 0 (a change to
    demo_data's prompts must come with regenerated answers: demo.write_shipped_benign_answers)."""
    from dualselect import demo
    from dualselect.demo_data import write_demo_data
    from dualselect.logs import read_jsonl

    rows = read_jsonl(write_demo_data(tmp_path, seed=0)["align_benign_prompts"])
    s = DemoSettings()
    answers = demo.shipped_benign_answers(rows, s.benign_max_new_tokens, s.generation_batch_size)
    assert answers is not None and len(answers) == len(rows)
    assert sum(bool(a.strip()) for a in answers) >= 0.95 * len(rows)
    # other settings, other prompts or another order: not the shipped answers
    assert demo.shipped_benign_answers(rows, s.benign_max_new_tokens + 1, s.generation_batch_size) is None
    assert demo.shipped_benign_answers(rows, s.benign_max_new_tokens, 16) is None
    assert demo.shipped_benign_answers(rows[1:], s.benign_max_new_tokens, s.generation_batch_size) is None
    assert demo.shipped_benign_answers(rows[::-1], s.benign_max_new_tokens, s.generation_batch_size) is None


def test_benign_answers_use_the_shipped_file_without_a_model(tmp_path, monkeypatch):
    from dualselect import demo, models
    from dualselect.demo_data import write_demo_data
    from dualselect.logs import read_jsonl

    monkeypatch.setenv("DUALSELECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the shipped answers need no model"))
    prompts = write_demo_data(tmp_path / "data", seed=0)["align_benign_prompts"]
    s = DemoSettings()
    out = demo.benign_answers(prompts, s.benign_max_new_tokens, None, s.generation_batch_size, "bf16-autocast")
    rows = read_jsonl(out)
    shipped = json.loads(demo.SHIPPED_BENIGN.read_text())["answers"]
    by_id = {a["id"]: a for a in shipped}
    assert len(rows) == sum(bool(a["answer"]) for a in shipped)
    for r in rows:
        assert r["messages"][0]["content"] == by_id[r["id"]]["prompt"]
        assert r["messages"][1]["content"] == by_id[r["id"]]["answer"] and r["flag"] == "benign"
