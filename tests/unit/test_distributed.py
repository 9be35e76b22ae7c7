"""Several processes through Accelerate: `accelerate launch` starts 2 CPU processes (gloo) that run
`dualselect train` on a tiny random Llama, and each run must equal the one-process run of the same global batch
(adapter allclose, the same selection-log ids, the same metrics) with even, uneven and empty shares; also with the
frozen base sharded over the processes (train.shard_base, FSDP2)."""

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

# Runs every config through the CLI in each launched process, then writes the exit codes to codes-RANK.json (a file
# each: the launcher may interleave the processes' stdout mid-line). With more arguments (json: {"loss": ids, "grad":
# ids}; this folder) those samples get a NaN loss / an inf gradient (test_nonfinite's).
DRIVER = """
import json, os, sys
import pytest
from dualselect.cli import main
runs = json.loads(open(sys.argv[1]).read())
if len(sys.argv) > 2:
    sys.path.insert(0, sys.argv[3])
    from test_nonfinite import _poison_dualselect
    bad = json.loads(open(sys.argv[2]).read())
    _poison_dualselect(pytest.MonkeyPatch(), bad_loss=set(bad["loss"]), bad_grad=set(bad["grad"]))

codes = {name: main(["train", *argv]) for name, argv in runs.items()}
with open(os.path.join(os.path.dirname(sys.argv[1]), f"codes-{os.environ['RANK']}.json"), "w") as f:
    json.dump(codes, f)
"""


def _codes(tmp_path) -> list[dict]:
    """The exit codes of the launched runs, one dict per process (the driver's codes-RANK.json)."""
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("codes-*.json"))]


def _common(model_dir, task, refs):
    return [f"model.name_or_path={model_dir}", "model.device=cpu", "model.precision=fp32", "model.lora_r=4",
            "model.lora_alpha=8", "model.lora_dropout=0", f"data.task={task}", f"data.reference={refs}",
            "data.max_length=64", "train.lr=1e-3", "train.seed=3", "train.epochs=1", "train.quiet=true",
            "train.grad_engine=loop"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, runs: dict, poison: dict | None = None, driver: str = DRIVER,
            args: tuple = ()) -> subprocess.CompletedProcess:
    (tmp_path / "driver.py").write_text(driver)
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    if poison:
        (tmp_path / "poison.json").write_text(json.dumps(poison))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(tmp_path / "driver.py"), str(tmp_path / "runs.json"),
           *([str(tmp_path / "poison.json"), str(Path(__file__).parent)] if poison else []), *args]
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
    codes = _codes(tmp_path)
    assert len(codes) == 2  # one file per process
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
    codes = _codes(tmp_path)
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


# train.shard_base: the frozen base sharded over the 2 processes (FSDP2). The driver runs the configs (codes-RANK.json
# as DRIVER's), then _lend_a_held_module (its result in held-RANK.json).
SHARDED_DRIVER = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
from dualselect.cli import main
from test_distributed import _lend_a_held_module

out, rank = os.path.dirname(sys.argv[1]), os.environ["RANK"]
runs = json.loads(open(sys.argv[1]).read())
codes = {name: main(["train", *argv]) for name, argv in runs.items()}
with open(os.path.join(out, f"codes-{rank}.json"), "w") as f:
    json.dump(codes, f)
with open(os.path.join(out, f"held-{rank}.json"), "w") as f:
    json.dump(_lend_a_held_module(sys.argv[3]), f)
"""


def _lend_a_held_module(model_dir) -> bool:
    """In each of 2 launched processes: process 0 keeps the model's own weights (embeddings, head) unsharded, as in
    the middle of its forward, and waits at a collective while process 1 asks for them: process 0 lends them by
    all-gathering them again. Whether this process ends with them unsharded and equal to the unsharded model's."""
    from dualselect.distributed import communicator, shard_base
    from dualselect.models import add_lora, load_model

    model, _, _ = load_model(str(model_dir), "fp32", "cpu")
    full = model.lm_head.weight.detach().clone()
    comm = shard_base(add_lora(model, r=4, alpha=8, dropout=0.0), communicator(cpu=True))
    lock = comm.lockstep
    root = len(lock.modules) - 1
    if comm.rank == 0:
        steps = [lambda: lock.before_unshard(root), lock.at_collective, lock.at_collective]
    else:
        steps = [lock.at_collective, lambda: lock.before_unshard(root), lock.at_collective]
    for step in steps:
        step()
    return not lock.sharded(root) and bool(torch.equal(model.lm_head.weight.detach(), full))  # LoRA's base model


def _mixed_lengths(task: Path, tmp_path) -> Path:
    """The toy task with every third answer some 40 tokens long: on a CPU a share's batch then runs as a number of
    length groups of its own (grads.batch_losses), so the processes run different passes between collectives."""
    rows = _jsonl(task)
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row["messages"][1]["content"] = " ".join(["and then we add one more"] * 6)
    out = tmp_path / "mixed.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_two_processes_with_the_base_sharded_train_what_one_process_trains(tiny_model_dir, toy_data, tmp_path):
    """sft (uneven and empty shares, length groups that differ between the processes; also checkpointed, and stopped
    and resumed) and dualselect with both engines (also checkpointed), the base sharded over 2 processes: each run
    trains and selects what one process trains and selects, and each process holds half of the base."""
    task, refs = toy_data
    common = _common(tiny_model_dir, task, refs)
    ckpt = ["model.gradient_checkpointing=true"]
    one = {"sft": [*RUNS["sft"], f"data.task={_mixed_lengths(task, tmp_path)}"], "dualselect": RUNS["dualselect"],
           "dualselect-factored": [*RUNS["dualselect"], "train.grad_engine=factored"]}
    # sharded run: (the one-process run it must equal, its settings)
    two = {"sft": ("sft", one["sft"]), "sft-checkpointed": ("sft", [*one["sft"], *ckpt]),
           "sft-resumed": ("sft", [*one["sft"], "train.max_steps=1", "train.checkpoint_every=1"]),
           "dualselect": ("dualselect", one["dualselect"]),
           "dualselect-checkpointed": ("dualselect", [*one["dualselect"], *ckpt]),
           "dualselect-factored": ("dualselect-factored", one["dualselect-factored"]),
           "dualselect-factored-checkpointed": ("dualselect-factored", [*one["dualselect-factored"], *ckpt])}
    launched = {name: [*common, *extra, "train.shard_base=true", f"train.output_dir={tmp_path / 'two' / name}"]
                for name, (_, extra) in two.items()}
    launched["sft-resumed-on"] = ["--resume", *common, *one["sft"], "train.shard_base=true",
                                  f"train.output_dir={tmp_path / 'two' / 'sft-resumed'}"]
    out = _launch(tmp_path, launched, driver=SHARDED_DRIVER, args=(str(Path(__file__).parent), str(tiny_model_dir)))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert _codes(tmp_path) == [{name: 0 for name in launched}] * 2, out.stderr[-4000:]
    assert [json.loads(p.read_text()) for p in sorted(tmp_path.glob("held-*.json"))] == [True, True]
    assert "resumed from" in (tmp_path / "two" / "sft-resumed" / "train.log").read_text()

    one_dir = {name: train(load_config(None, [*common, *extra, f"train.output_dir={tmp_path / 'one' / name}"],
                                       method_configs())).run_dir for name, extra in one.items()}
    for name, (same_as, _) in two.items():
        _assert_same_run(one_dir[same_as], tmp_path / "two" / name)
        facts = json.loads((tmp_path / "two" / name / "run_info.json").read_text())["shard_base"]
        assert facts["sharded"] and facts["fsdp_modules"] == 3  # 2 decoder layers and the model's own weights
        assert sum(facts["base_params_local"]) == facts["base_params"]
        for held in facts["base_params_local"]:  # by process
            assert held == pytest.approx(facts["base_params"] / 2, rel=0.01)


def test_shard_base_is_refused_in_one_process(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    task, refs = toy_data
    cfg = load_config(None, [*_common(tiny_model_dir, task, refs), "train.shard_base=true",
                             f"train.output_dir={tmp_path / 'run'}"], method_configs())
    with pytest.raises(DualSelectError, match=r"^train.shard_base=true shards the base model's weights over several "
                                              r"processes and this run has one: start it with `accelerate launch"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_accelerate_fsdp_is_refused_for_shard_base(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(DualSelectError, match="ACCELERATE_USE_FSDP=true: Accelerate's FSDP would shard the LoRA "
                                              "parameters too .* set train.shard_base=true"):
        AccelerateProcesses(cpu=True)
