"""`safeinstr`: a fixed set of safety examples mixed into the task data at a ratio or a count."""

import json

import pytest

from dualselect.config import load_config
from dualselect.errors import DualSelectError
from dualselect.methods import method_configs
from dualselect.methods.safeinstr import pick_safety, safety_count
from dualselect.train import train


def _cfg(model_dir, task, refs, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", f"data.reference={refs}", "data.max_length=64", "train.method=safeinstr",
        "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}", *extra],
        method_configs())


def test_safety_count_and_pick():
    assert safety_count(20, 12, 0.03, None) == 1  # round(0.6) = 1
    assert safety_count(20, 12, 0.25, None) == 5
    assert safety_count(20, 12, 0.125, None) == 3  # 2.5 rounds half up
    assert safety_count(20, 12, 0.5, 7) == 7  # count wins over ratio
    with pytest.raises(ValueError, match="holds 12"):
        safety_count(20, 12, 1.0, None)
    assert pick_safety(12, 3, "first", 0) == [0, 1, 2]
    a, b = pick_safety(12, 5, "random", 0), pick_safety(12, 5, "random", 1)
    assert len(set(a)) == 5 and a == sorted(a) and a == pick_safety(12, 5, "random", 0) and a != b


def test_the_exact_mixture_is_trained_on(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data  # 20 task rows, 12 references (ids r0..r11)
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", "safeinstr.ratio=0.25", "train.epochs=2"))
    mix = [json.loads(x) for x in (res.run_dir / "selection.jsonl").read_text().splitlines()]
    assert len(mix) == 1 and mix[0]["n_safety"] == 5 and mix[0]["n_task"] == 20
    assert mix[0]["safety_ids"] == [f"r{i}" for i in pick_safety(12, 5, "random", 3)]
    metrics = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 * 7  # 25 samples in batches of 4: 7 steps per epoch
    assert sum(m["trained_samples"] for m in metrics) == 2 * 20  # every task sample once per epoch
    assert sum(m["safety_samples"] for m in metrics) == 2 * 5  # every safety example once per epoch
    budget = json.loads((res.run_dir / "run_info.json").read_text())["budget"]
    assert budget["trained_samples"] == 40 and budget["optimizer_steps"] == 14
    # count overrides ratio, first N
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "count", "safeinstr.count=2", "safeinstr.pick=first",
                     "train.max_steps=1"))
    mix = json.loads((res.run_dir / "selection.jsonl").read_text().splitlines()[0])
    assert mix["safety_ids"] == ["r0", "r1"]


def test_safeinstr_errors(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    with pytest.raises(DualSelectError, match="count must be >= 1"):
        _cfg(tiny_model_dir, task, refs, tmp_path / "x", "safeinstr.count=0")
    with pytest.raises(DualSelectError, match="set data.reference"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "y", "data.reference=null"))
    with pytest.raises(DualSelectError, match="holds 12"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "z", "safeinstr.count=13"))
