"""Several processes through Accelerate: `accelerate launch` starts 2 CPU processes (gloo) that run
`dualselect train` on a tiny random Llama, and each run must equal the one-process run of the same global batch
(adapter allclose, the same selection-log ids, the same metrics) with even, uneven and empty shares."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
from dualselect.selection.dualselect import RunningTopK, select_references
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
    # The reference refresh shared among the processes: pools of 9 and 11 references (shares 5 + 4, 6 + 5; with
    # ref_sample=7: 4 + 3), scored a few at a time: hold (soft, a refresh before every step), recompute (projected
    # cosines) and random.
    "dualselect-hold": ["train.method=dualselect", "data.task_limit=9", "train.batch_size=4",
                        "dualselect.warmup_steps=1", "dualselect.k_task=2", "dualselect.k_ref=3",
                        "dualselect.ref_pool_limit=9", "dualselect.ref_chunk=2", "dualselect.mode=soft",
                        "dualselect.refresh=steps", "dualselect.refresh_steps=1"],
    "dualselect-recompute": ["train.method=dualselect", "data.task_limit=9", "train.batch_size=4",
                             "dualselect.warmup_steps=1", "dualselect.k_task=2", "dualselect.k_ref=3",
                             "dualselect.ref_pool_limit=11", "dualselect.ref_sample=7", "dualselect.ref_chunk=3",
                             "dualselect.ref_memory=recompute", "dualselect.projection_dim=16"],
    "dualselect-random": ["train.method=dualselect", "data.task_limit=9", "train.batch_size=4",
                          "dualselect.warmup_steps=1", "dualselect.k_ref=3", "dualselect.references=random"],
    "random": ["train.method=random", "data.task_limit=11", "train.batch_size=5", "random.warmup_steps=1",
               "random.k_task=2"],
    "dsir": ["train.method=dsir", "data.task_limit=12", "train.batch_size=5", "dsir.keep=0.5", "dsir.mode=topk"],
}

# Runs every config through the CLI in each launched process, then prints the exit codes. With more arguments
# (json: {"loss": ids, "grad": ids}; this folder) those samples get a NaN loss / an inf gradient (test_nonfinite's).
DRIVER = """
import json, sys
import pytest
from dualselect.cli import main
runs = json.loads(open(sys.argv[1]).read())
if len(sys.argv) > 2:
    sys.path.insert(0, sys.argv[3])
    from test_nonfinite import _poison_dualselect
    bad = json.loads(open(sys.argv[2]).read())
    _poison_dualselect(pytest.MonkeyPatch(), bad_loss=set(bad["loss"]), bad_grad=set(bad["grad"]))

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


def _launch(tmp_path, runs: dict, poison: dict | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    if poison:
        (tmp_path / "poison.json").write_text(json.dumps(poison))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(tmp_path / "driver.py"), str(tmp_path / "runs.json"),
           *([str(tmp_path / "poison.json"), str(Path(__file__).parent)] if poison else [])]
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
        if x["kind"] == "refresh":  # dualselect: every process scored its share; the same candidates, in order
            assert y["candidates"]["ids"] == x["candidates"]["ids"] and y["n_scored"] == x["n_scored"]
            assert y["candidates"]["losses"] == pytest.approx(x["candidates"]["losses"], rel=1e-5)
            assert y["candidates"]["cosines"] == pytest.approx(x["candidates"]["cosines"], rel=1e-4, abs=1e-6)
            assert y["g_r_norm"] == pytest.approx(x["g_r_norm"], rel=1e-5)
        if x["kind"] == "step" and "scores" in x:  # dualselect: every candidate's numbers, gathered in batch order
            assert y["candidates"]["ids"] == x["candidates"]["ids"]
            assert y["candidates"]["tokens"] == x["candidates"]["tokens"]
            assert y["candidates"]["losses"] == pytest.approx(x["candidates"]["losses"], rel=1e-5)
            assert y["candidates"]["cosines"] == pytest.approx(x["candidates"]["cosines"], rel=1e-4, abs=1e-6)
    met_a, met_b = _jsonl(one / "metrics.jsonl"), _jsonl(two / "metrics.jsonl")
    assert len(met_b) == len(met_a)
    for x, y in zip(met_a, met_b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y.get("nonfinite") == x.get("nonfinite")  # the same samples left out, reported the same way
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


def test_two_processes_leave_out_the_same_nonfinite_references(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    """A NaN/inf reference in either process's share: train.nonfinite=skip leaves out the same ones as one process
    (hold and recompute); stop, or skip with none left, ends the run on both processes with one process's error."""
    from test_nonfinite import _poison_dualselect

    task, refs = toy_data
    common = _common(tiny_model_dir, task, refs)
    bad = {"loss": ["r1", "r7"], "grad": ["r0", "r2", "r4"]}  # pool 9: shares r0-r4 and r5-r8
    ds = ["train.method=dualselect", "data.task_limit=9", "train.batch_size=4", "dualselect.warmup_steps=1",
          "dualselect.k_task=2", "dualselect.k_ref=3", "dualselect.ref_pool_limit=9", "dualselect.ref_chunk=2",
          "train.nonfinite=skip"]
    runs = {"hold": [*ds], "recompute": [*ds, "dualselect.ref_memory=recompute"],
            "stop": [*ds, "train.nonfinite=stop"], "none-left": [*ds, "dualselect.ref_pool_limit=3"]}
    launched = {name: [*common, *extra, f"train.output_dir={tmp_path / 'two' / name}"] for name, extra in runs.items()}
    out = _launch(tmp_path, launched, poison=bad)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    codes = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("CODES ")]
    assert codes == [{"hold": 0, "recompute": 0, "stop": 2, "none-left": 2}] * 2
    assert out.stderr.count("non-finite loss and gradient (NaN or inf) on reference samples r0, r1;") == 2
    assert out.stderr.count("every reference has a NaN or inf loss or gradient") == 2

    _poison_dualselect(monkeypatch, bad_loss=set(bad["loss"]), bad_grad=set(bad["grad"]))
    for name in ("hold", "recompute"):
        one = train(load_config(None, [*common, *runs[name], f"train.output_dir={tmp_path / 'one' / name}"],
                                method_configs())).run_dir
        _assert_same_run(one, tmp_path / "two" / name)
        refresh = next(r for r in _jsonl(one / "selection.jsonl") if r["kind"] == "refresh")
        assert refresh["n_scored"] == 4  # r3, r5, r6, r8
    for name, error in (("stop", "non-finite loss and gradient .* on reference samples r0, r1;"),
                        ("none-left", "every reference has a NaN or inf loss or gradient")):
        with pytest.raises(DualSelectError, match=error):
            train(load_config(None, [*common, *runs[name], f"train.output_dir={tmp_path / 'one' / name}"],
                              method_configs()))


def test_a_share_s_top_k_holds_every_global_winner_of_the_share():
    """hold in several processes keeps only each share's top K: with ties (the earlier position wins) the global
    top K taken from the gathered scores, pushed in candidate order, is RunningTopK's over the whole pool, and
    each of its members is in its own share's top K."""
    scores = [0.5, 1.0, 1.0, 0.2, 1.0, 0.5, 1.0, 0.9, 0.5, 1.0]
    for mode in ("hard", "soft"):
        whole = RunningTopK(3, mode, 0.1)
        for i, s in enumerate(scores):
            whole.push(s, i, None)
        best, _ = whole.result()
        assert best.index == [1, 2, 4]
        assert select_references(scores, 3, mode, 0.1).index == best.index
        for world in (2, 3, 4):
            for rank in range(world):
                start, end = share(len(scores), world, rank)
                local = RunningTopK(3, mode, 0.1)
                for i in range(start, end):
                    local.push(scores[i], i, None)
                assert {i for i in best.index if start <= i < end} <= set(local.result()[0].index)
