"""Several processes through Accelerate: `accelerate launch` starts 2 CPU processes (gloo) that run
`dualselect train` on a tiny random Llama, and each run must equal the one-process run of the same global batch
(adapter allclose, the same selection-log ids, the same metrics) with even, uneven and empty shares."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dualselect.config import load_config
from dualselect.distributed import (
    AccelerateProcesses,
    SingleProcess,
    communicator,
    share,
)
from dualselect.errors import DualSelectError
from dualselect.methods import method_configs
from dualselect.train import train

# Each run's own settings. Their batches (task rows / batch size) split over the 2 processes as:
# 11 / 5 -> 5, 5, 1: 3 + 2 (uneven) and 1 + 0 (a process without samples); 9 / 4 -> 4, 4, 1: 2 + 2 (even) and 1 + 0.
RUNS = {
    "sft": ["train.method=sft", "data.task_limit=11", "train.batch_size=5"],
    "dualselect": ["train.method=dualselect", "data.task_limit=9", "train.batch_size=4", "dualselect.warmup_steps=2",
                   "dualselect.k_task=2", "dualselect.k_ref=3"],
    "dualselect-soft": ["train.method=dualselect", "data.task_limit=11", "train.batch_size=5",
                        "dualselect.warmup_steps=1", "dualselect.mode=soft", "dualselect.k_task=3", "dualselect.k_ref=4",
                        "dualselect.score_norm=zscore", "dualselect.correction=project"],
    "random": ["train.method=random", "data.task_limit=11", "train.batch_size=5", "random.warmup_steps=1",
               "random.k_task=2"],
    "dsir": ["train.method=dsir", "data.task_limit=12", "train.batch_size=5", "dsir.keep=0.5", "dsir.mode=topk"],
}

# Runs every config through the CLI in each launched process, then prints the exit codes.
DRIVER = """
import json, sys
from dualselect.cli import main
runs = json.loads(open(sys.argv[1]).read())
codes = {name: main(["train", *argv]) for name, argv in runs.items()}
print("CODES " + json.dumps(codes), flush=True)
"""


def _common(model_dir, task, refs):
    return [f"model.name_or_path={model_dir}", "model.device=cpu", "model.precision=fp32", "model.lora_r=4",
            "model.lora_alpha=8", "model.lora_dropout=0", f"data.task={task}", f"data.reference={refs}",
            "data.max_length=64", "train.lr=1e-3", "train.seed=3", "train.epochs=1", "train.quiet=true",
            "train.grad_engine=loop"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, runs: dict) -> subprocess.CompletedProcess:
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(tmp_path / "driver.py"), str(tmp_path / "runs.json")]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                          check=False)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_run(one, two):
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    sel_a, sel_b = _jsonl(one / "selection.jsonl"), _jsonl(two / "selection.jsonl")
    assert [r["kind"] for r in sel_b] == [r["kind"] for r in sel_a]
    for x, y in zip(sel_a, sel_b):
        assert y.get("ids") == x.get("ids"), x["kind"]
        assert y.get("index") == x.get("index")
        if "weights" in x:  # soft weights exp(s / tau) of z-scored cosines magnify float rounding about 1000x
            assert y["weights"] == pytest.approx(x["weights"], rel=1e-3)
        if x["kind"] == "step" and "scores" in x:  # dualselect: every candidate's numbers, gathered in batch order
            assert y["candidates"]["ids"] == x["candidates"]["ids"]
            assert y["candidates"]["tokens"] == x["candidates"]["tokens"]
            assert y["candidates"]["losses"] == pytest.approx(x["candidates"]["losses"], rel=1e-5)
            assert y["candidates"]["cosines"] == pytest.approx(x["candidates"]["cosines"], rel=1e-4, abs=1e-6)
    met_a, met_b = _jsonl(one / "metrics.jsonl"), _jsonl(two / "metrics.jsonl")
    assert len(met_b) == len(met_a)
    for x, y in zip(met_a, met_b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        for key in ("step", "tokens", "n_samples", "trained_samples", "trained_tokens", "kept"):
            assert y.get(key) == x.get(key), key
    assert "the 2 processes ended with identical parameters" in (two / "train.log").read_text()
    assert json.loads((two / "run_info.json").read_text())["processes"]["count"] == 2


def test_two_processes_train_what_one_process_trains(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    common = _common(tiny_model_dir, task, refs)
    launched = {name: [*common, *extra, f"train.output_dir={tmp_path / 'two' / name}"] for name, extra in RUNS.items()}
    launched["toss"] = [*common, "train.method=toss", f"train.output_dir={tmp_path / 'two' / 'toss'}"]
    out = _launch(tmp_path, launched)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    codes = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("CODES ")]
    assert len(codes) == 2  # one line per process
    for c in codes:
        assert c == {**{name: 0 for name in RUNS}, "toss": 2}
    assert "method toss cannot run in several processes yet" in out.stderr
    assert not (tmp_path / "two" / "toss").exists()

    for name, extra in RUNS.items():
        one = train(load_config(None, [*common, *extra, f"train.output_dir={tmp_path / 'one' / name}"],
                                method_configs())).run_dir
        _assert_same_run(one, tmp_path / "two" / name)


def test_shares_are_contiguous_blocks_in_batch_order():
    for n in range(12):
        for world in (1, 2, 3, 5):
            blocks = [share(n, world, r) for r in range(world)]
            assert [i for start, end in blocks for i in range(start, end)] == list(range(n))
            sizes = [end - start for start, end in blocks]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert share(5, 2, 0) == (0, 3) and share(5, 2, 1) == (3, 5)


def test_a_plain_run_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    comm = communicator(cpu=True)
    assert isinstance(comm, SingleProcess) and comm.world_size == 1 and comm.is_main
    x = torch.arange(3.0)
    assert comm.share(7) == (0, 7) and comm.gather(x) is x and comm.sum(x) is x and comm.broadcast(x) is x


def test_launcher_settings_the_loop_would_ignore_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(DualSelectError, match="ACCELERATE_MIXED_PRECISION=bf16: set model.precision"):
        AccelerateProcesses(cpu=True)
