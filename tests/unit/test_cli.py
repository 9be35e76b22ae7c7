"""The command line: help, one-line errors, a training run through the CLI."""

import json

from dualselect.cli import main


def test_help_lists_every_config_key(capsys):
    try:
        main(["train", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for key in ("model.precision", "data.mask", "train.checkpoint_every", "dualselect.k_ref", "dualselect.budget",
                "sft:", "sst2", "--resume"):
        assert key in out, key


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json\n')
    code = main(["train", f"data.task={bad}", f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and str(bad) in err and "2" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "adapter").exists()


def test_unknown_key_and_verb(capsys):
    assert main(["train", "train.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["trian"]) == 2


def test_train_via_cli(tiny_model_dir, toy_data, tmp_path, capsys):
    task, _ = toy_data
    out = tmp_path / "run"
    code = main(["train", f"model.name_or_path={tiny_model_dir}", f"data.task={task}", "model.precision=fp32",
                 "train.max_steps=2", f"train.output_dir={out}", "--quiet"])
    assert code == 0
    assert f"adapter: {out / 'adapter'}" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "run_info.json").read_text())["planned_steps"] == 2


def test_methods_lists_every_method_with_its_paper_and_data(capsys):
    from dualselect.methods import INFO, METHODS, NEEDS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    names = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert names == sorted(METHODS)
    assert {"sft", "dualselect", "random", "dsir", "safeinstr", "seal", "lisa", "safegrad", "toss"} <= set(METHODS)
    blocks = out.split("\n")
    for name in METHODS:
        i = blocks.index(name)
        assert blocks[i + 1].strip() == INFO[name].summary
        assert blocks[i + 2].strip() == f"paper: {INFO[name].paper}"
        assert blocks[i + 3].strip() == f"data:  {NEEDS[INFO[name].needs]}"
