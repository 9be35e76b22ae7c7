"""`random`: per batch a seeded random subset of DualSelect's size (k_task or the token budget)."""

import json

import pytest
import torch

from dualselect.config import load_config
from dualselect.errors import DualSelectError
from dualselect.methods import method_configs
from dualselect.methods.random_subset import random_subset
from dualselect.train import train


def _cfg(model_dir, task, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", "data.max_length=64", "train.method=random", "train.batch_size=4", "train.lr=1e-3",
        "train.seed=3", "train.quiet=true", f"train.output_dir={out}", *extra], method_configs())


def _steps(run_dir):
    return [json.loads(x) for x in (run_dir / "selection.jsonl").read_text().splitlines()]


def test_random_subset_keeps_the_budget_and_depends_on_the_seed():
    subsets = {random_subset(8, 4, seed, step=5) == random_subset(8, 4, seed, step=5) for seed in range(5)}
    assert subsets == {True}  # a pure function of (seed, step)
    draws = {tuple(random_subset(8, 4, seed, step=5)) for seed in range(20)}
    assert all(len(d) == 4 and len(set(d)) == 4 and all(0 <= i < 8 for i in d) for d in draws)
    assert len(draws) > 10  # different seeds keep different subsets
    assert random_subset(8, 0, 0, 0) == list(range(8))  # k <= 0: all
    # the token budget: kept tokens reach the fraction of the batch's, and dropping the last kept sample would not
    tokens = [5, 1, 9, 3, 2, 7, 4, 6]
    for seed in range(10):
        keep = random_subset(8, 4, seed, 0, tokens=tokens, budget=0.5)
        kept = sum(tokens[i] for i in keep)
        assert 2 * kept >= sum(tokens)
        assert any(2 * (kept - tokens[i]) < sum(tokens) for i in keep)


def test_random_trains_on_k_task_per_batch_after_the_warmup(tiny_model_dir, toy_data, tmp_path):
    task, _ = toy_data
    a = train(_cfg(tiny_model_dir, task, tmp_path / "a", "random.warmup_steps=2", "random.k_task=2"))
    info = json.loads((a.run_dir / "run_info.json").read_text())["budget"]
    # 2 warm-up steps of 4 samples, then 5 steps keeping 2 of 4
    assert info["steps_by_phase"] == {"warmup": 2, "train": 5}
    assert info["trained_samples"] == 2 * 4 + 5 * 2
    steps = _steps(a.run_dir)
    assert len(steps) == 5 and all(len(s["ids"]) == 2 and set(s["ids"]) <= set(s["candidates"]["ids"]) for s in steps)
    b = train(_cfg(tiny_model_dir, task, tmp_path / "b", "random.warmup_steps=2", "random.k_task=2", "train.seed=4"))
    assert [s["ids"] for s in _steps(b.run_dir)] != [s["ids"] for s in steps]


def test_random_resumes_to_the_same_adapter(tiny_model_dir, toy_data, tmp_path):
    task, _ = toy_data
    extra = ["train.epochs=2", "train.checkpoint_every=3", "random.warmup_steps=1", "model.lora_dropout=0.1"]
    full = train(_cfg(tiny_model_dir, task, tmp_path / "full", *extra))

    def crash(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, task, tmp_path / "cut", *extra), on_step=crash)
    resumed = train(_cfg(tiny_model_dir, task, tmp_path / "cut", *extra), resume=True)
    from safetensors.torch import load_file
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s["ids"] for s in _steps(full.run_dir)] == [s["ids"] for s in _steps(resumed.run_dir)]


def test_random_config_errors(tiny_model_dir, toy_data, tmp_path):
    task, _ = toy_data
    with pytest.raises(DualSelectError, match="budget must be in"):
        _cfg(tiny_model_dir, task, tmp_path / "x", "random.budget=1.5")
    with pytest.raises(DualSelectError, match="warmup_steps must be >= 0"):
        _cfg(tiny_model_dir, task, tmp_path / "x", "random.warmup_steps=-1")
