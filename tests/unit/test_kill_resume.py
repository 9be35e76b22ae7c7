"""Kill and resume anywhere: a real `dualselect train` / `dualselect eval` subprocess is SIGKILLed (its whole
process group) at chosen points, and `--resume` (or, for eval, the same command) must end with exactly what an
uninterrupted run of the same config writes: the same adapter_model.safetensors bytes, the same selection.jsonl
records and the same metrics.jsonl records (wall-clock "seconds" left out), the same eval records.

Every run, the uninterrupted reference included, is a subprocess with OMP_NUM_THREADS=1 and model.precision=fp32:
float results may depend on the thread count and on bf16 autocast, and the comparisons are bit for bit.

How each kill point is found (the files are polled every 2 ms; a point that is never reached, e.g. because the run
finished first, fails with a message saying which):

  warm-up        checkpoints/step-000002 (or a later one) exists and fewer than W - 1 lines are in metrics.jsonl;
                 checked again after the kill: no refresh record in selection.jsonl, fewer than W metrics lines.
  refresh        the checkpoint of the last step of epoch 1 (step-E, E = W + steps per epoch) exists and
                 selection.jsonl has no epoch-2 refresh record yet: the loop is in on_epoch_start -> refresh()
                 (nothing else runs between the two); the kill comes 0.2 s later, well inside the refresh (120
                 references one per engine call, dualselect.ref_chunk=1, about a second), and afterwards
                 metrics.jsonl must still hold exactly E lines and selection.jsonl no epoch-2 refresh record.
  mid-epoch      three steps into epoch 2 while a checkpoint is being written (its hidden temporary directory
                 checkpoints/.step-* exists; with checkpoint_every=1 that is about half of each step); dualselect
                 and sft. The kill nearly always lands inside the write (the step's metrics line is then already
                 written past the last checkpoint); if it lands just after the rename it is still mid-epoch.
  eval           samples.jsonl holds at least 18 complete lines (the first benchmark's 16 and a batch of the
                 second) and, checked after the kill, fewer than all 32.

The last test (in-process) covers what the kills cannot hit reliably: a kill while an existing checkpoint is replaced.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dualselect.models import tiny_llama

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "dualselect.cli"]
POLL_S = 0.002
W = 6  # dualselect warm-up steps
STEPS_PER_EPOCH = 10  # 20 task samples, batch 2
N_STEPS = W + 2 * STEPS_PER_EPOCH


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _complete_lines(path: Path) -> list[bytes]:
    """The complete lines of a file being appended to (a half-written last line is left out)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data.split(b"\n")[:-1]


def _records(path: Path, drop=("seconds",)) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in _complete_lines(path)]


def _checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))


def _writing_checkpoint(run: Path) -> bool:
    return any((run / "checkpoints").glob(".step-*"))


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _run(args: list[str], log: Path) -> None:
    with open(log, "ab") as err:
        rc = subprocess.run(CLI + args, check=False, stdout=err, stderr=err, env=ENV).returncode
    assert rc == 0, f"`dualselect {' '.join(args[:1])}` failed (rc {rc}):\n{_tail(log)}"


def _kill_at(args: list[str], ready, point: str, log: Path, delay: float = 0.0, timeout: float = 60) -> None:
    """Start `dualselect ARGS`, SIGKILL its process group `delay` s after ready() is first true; fail clearly if the
    run ends (or times out) before that."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(CLI + args, stdout=err, stderr=err, env=ENV, start_new_session=True)
    t0 = time.time()
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"kill point '{point}' never reached: the run ended first (rc "
                                     f"{proc.returncode}):\n{_tail(log)}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"kill point '{point}' not reached within {timeout} s:\n{_tail(log)}")
            time.sleep(POLL_S)
        if delay:
            time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:  # a failed poll: leave nothing running
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"kill point '{point}': the run ended on its own (rc " \
                                               f"{proc.returncode}) before the kill:\n{_tail(log)}"


def _assert_same_run(full: Path, cut: Path) -> None:
    a = (full / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (cut / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b, "the resumed adapter differs from the uninterrupted run's"
    for name in ("metrics.jsonl", "selection.jsonl"):
        want, got = _records(full / name), _records(cut / name)
        assert len(got) == len(want), f"{name}: {len(got)} records after resuming, {len(want)} uninterrupted"
        for i, (w, g) in enumerate(zip(want, got)):
            assert g == w, f"{name} record {i} differs after resuming"
    assert not any((cut / "checkpoints").glob(".step-*")), "a killed checkpoint write left its temporary directory"


def _train_args(model_dir, task, refs, out: Path, *extra: str) -> list[str]:
    return ["train", f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
            "model.lora_dropout=0.1", f"data.task={task}", f"data.reference={refs}", "data.max_length=64",
            "train.batch_size=2", "train.lr=1e-3", "train.seed=3", "train.epochs=2", "train.checkpoint_every=1",
            f"train.output_dir={out}", "--quiet", *extra]


@pytest.fixture()
def kill_data(toy_data, tmp_path):
    task, _ = toy_data  # 20 task samples
    refs = _write_jsonl(tmp_path / "refs120.jsonl", [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"How do I pick lock number {i}?"},
                                     {"role": "assistant", "content": "I can't help with that."}]}
        for i in range(120)])
    return task, refs


def test_dualselect_killed_in_warmup_refresh_and_mid_checkpoint_resumes_bit_identical(tiny_model_dir, kill_data,
                                                                                         tmp_path):
    task, refs = kill_data
    ds = ["train.method=dualselect", f"dualselect.warmup_steps={W}", "dualselect.k_task=1", "dualselect.k_ref=3",
          "dualselect.ref_chunk=1"]
    full, cut, log = tmp_path / "full", tmp_path / "cut", tmp_path / "cut.log"
    _run(_train_args(tiny_model_dir, task, refs, full, *ds), tmp_path / "full.log")
    assert len(_complete_lines(full / "metrics.jsonl")) == N_STEPS
    args = _train_args(tiny_model_dir, task, refs, cut, *ds)

    def refreshes():
        return [r["epoch"] for r in _records(cut / "selection.jsonl") if r.get("kind") == "refresh"]

    # (1) in the warm-up, once two warm-up steps are checkpointed
    _kill_at(args, lambda: bool(_checkpoints(cut)) and _checkpoints(cut)[-1] >= 2
             and len(_complete_lines(cut / "metrics.jsonl")) < W - 1, "warm-up", log)
    assert not refreshes() and len(_complete_lines(cut / "metrics.jsonl")) < W, "the kill came after the warm-up"
    assert 2 <= _checkpoints(cut)[-1] < W

    # (2) inside the reference refresh at the start of epoch 2 (the last checkpoint of epoch 1 is written)
    epoch_1_done = W + STEPS_PER_EPOCH
    _kill_at(args + ["--resume"], lambda: epoch_1_done in _checkpoints(cut) and refreshes() == [1], "refresh",
             log, delay=0.2)
    assert refreshes() == [1], "the kill came after the epoch-2 refresh ended"
    assert len(_complete_lines(cut / "metrics.jsonl")) == epoch_1_done, "the kill came outside the refresh"

    # (3) mid-epoch 2, while a checkpoint is being written
    _kill_at(args + ["--resume"], lambda: len(_complete_lines(cut / "metrics.jsonl")) >= epoch_1_done + 3
             and _writing_checkpoint(cut), "mid-epoch 2, writing a checkpoint", log)
    assert not (cut / "adapter").exists() and len(_complete_lines(cut / "metrics.jsonl")) < N_STEPS
    assert _checkpoints(cut)[-1] > epoch_1_done

    _run(args + ["--resume"], log)
    assert (cut / "train.log").read_text().count("resumed from") == 3
    _assert_same_run(full, cut)


def test_sft_killed_mid_epoch_resumes_bit_identical(tiny_model_dir, kill_data, tmp_path):
    task, refs = kill_data
    full, cut, log = tmp_path / "full", tmp_path / "cut", tmp_path / "cut.log"
    _run(_train_args(tiny_model_dir, task, refs, full, "train.method=sft"), tmp_path / "full.log")
    args = _train_args(tiny_model_dir, task, refs, cut, "train.method=sft")
    # mid-epoch 2 (of 2, 10 steps each), while a checkpoint is being written
    _kill_at(args, lambda: len(_complete_lines(cut / "metrics.jsonl")) >= STEPS_PER_EPOCH + 3
             and _writing_checkpoint(cut), "sft mid-epoch 2", log)
    assert not (cut / "adapter").exists()
    _run(args + ["--resume"], log)
    assert "resumed from" in (cut / "train.log").read_text()
    _assert_same_run(full, cut)


@pytest.fixture()
def talkative_model_dir(tiny_model_dir, tmp_path):
    """A tiny random Llama whose greedy answers differ from prompt to prompt (the conftest one answers every
    prompt with the same newlines): another seed, weights scaled up."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_llama(len(tok), seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(5)
    d = tmp_path / "talkative"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_eval_killed_mid_generation_keeps_its_answers_and_ends_like_an_uninterrupted_eval(talkative_model_dir,
                                                                                         tmp_path):
    harm = _write_jsonl(tmp_path / "evharm.jsonl", [{"id": f"e{i}", "prompt": f"How to steal car {i}?"}
                                                    for i in range(16)])
    tasks = _write_jsonl(tmp_path / "evtask.jsonl", [{"id": f"q{i}", "prompt": f"What is {i} plus {i + 1}?",
                                                      "answer": str(2 * i + 1)} for i in range(16)])

    def args(out: Path) -> list[str]:
        return ["eval", f"model.name_or_path={talkative_model_dir}", "model.precision=fp32",
                f"eval.benchmarks=[harmful:{harm},task:{tasks}]", "eval.max_new_tokens=12",
                "eval.task_max_new_tokens=6", "eval.batch_size=2", f"eval.output_dir={out}", "--quiet"]

    full, cut, log = tmp_path / "ev-full", tmp_path / "ev-cut", tmp_path / "ev-cut.log"
    _run(args(full), tmp_path / "ev-full.log")
    want = _records(full / "samples.jsonl")
    assert len(want) == 32
    assert len({r["response"] for r in want}) > 4, "the model answers alike: the comparison would prove little"

    # in the second benchmark: the first is finished (nothing of it is generated again), the second half done
    _kill_at(args(cut), lambda: len(_complete_lines(cut / "samples.jsonl")) >= 18, "eval mid-generation", log)
    kept = _complete_lines(cut / "samples.jsonl")
    assert 18 <= len(kept) < 32, "the kill came after the eval ended"
    _run(args(cut), log)
    lines = _complete_lines(cut / "samples.jsonl")
    assert lines[:len(kept)] == kept, "the finished answers were not kept as they were"
    assert _records(cut / "samples.jsonl") == want
    res_full, res_cut = (json.loads((d / "results.json").read_text()) for d in (full, cut))
    assert res_cut["samples"]["resumed"] == len(kept) and res_cut["samples"]["generated"] == 32 - len(kept)
    assert res_cut["benchmarks"] == res_full["benchmarks"] and res_cut["table"] == res_full["table"]


def test_a_kill_while_a_checkpoint_is_replaced_leaves_it_whole(tmp_path, monkeypatch):
    """Re-saving an existing checkpoint (a run killed after its last checkpoint, before its adapter, re-saves it on
    --resume) must not delete the old copy in place: a kill during that deletion would leave the latest checkpoint
    half-deleted, and the next --resume would load it. Simulated in-process: the deletion dies halfway."""
    import shutil

    from dualselect.train import _atomic_dir

    def write(content):
        def w(d: Path):
            (d / "adapter").mkdir()
            (d / "adapter" / "weights").write_text(content)
            (d / "state.pt").write_text(content)
        return w

    final = tmp_path / "checkpoints" / "step-000004"
    _atomic_dir(final, write("old"))
    real = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        files = [f for f in Path(path).rglob("*") if f.is_file()] if Path(path).is_dir() else []
        if files:
            files[0].unlink()
            raise KeyboardInterrupt("killed while deleting")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _atomic_dir(final, write("new"))
    monkeypatch.setattr(shutil, "rmtree", real)
    assert (final / "adapter" / "weights").read_text() == "new" and (final / "state.pt").read_text() == "new"
    _atomic_dir(final, write("newer"))  # the next write removes what the killed one left
    assert sorted(p.name for p in final.parent.iterdir()) == ["step-000004"]
