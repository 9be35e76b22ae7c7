"""train.grad_engine=auto: the faster of loop and factored, timed on the first per-sample batch; loop where factored
does not apply; the probe leaves RNG, mode and .grad alone (a run equals the run with the chosen engine named); the
choice goes to run_info.json and a resumed run keeps it."""

import json
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dualselect import grads
from dualselect.config import load_config
from dualselect.errors import DualSelectError
from dualselect.grads import AutoEngine, FactoredEngine, LoopEngine, get_engine, trainable_params
from dualselect.methods import method_configs
from dualselect.models import add_lora, tiny_llama
from dualselect.train import build, train

from test_grads import _samples  # three samples of lengths 5-14, prompts masked


def _slowed(base, clock):
    class Slow(base):
        calls = 0

        def __call__(self, *args, **kwargs):
            type(self).calls += 1
            clock.extra += 60.0  # a minute on the probe's clock, however long the real call takes
            return super().__call__(*args, **kwargs)

    return Slow


@pytest.fixture()
def prefer(monkeypatch):
    """prefer(name): the probe finds `name` faster. The other engine is slowed down in the probe only, on the probe's
    clock (real time plus a minute per call of the slowed engine: no sleeping, so a loaded machine cannot turn the
    choice around); the engine that runs afterwards is the real one, from ENGINES. Returns the slowed class (it
    counts its calls)."""
    clock = SimpleNamespace(extra=0.0)
    monkeypatch.setattr(grads, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + clock.extra))

    def make(name):
        real = {"loop": LoopEngine, "factored": FactoredEngine}
        slow = _slowed(real["factored" if name == "loop" else "loop"], clock)
        for engine, cls in real.items():
            monkeypatch.setattr(grads, cls.__name__, cls if engine == name else slow)
        return slow

    return make


def _model(tiny_model, dropout=0.3):
    model = add_lora(tiny_model, r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    for p in trainable_params(model):
        p.data.normal_(0, 0.05)
    return model.train()


@pytest.mark.parametrize("faster", ["loop", "factored"])
def test_auto_takes_the_engine_the_probe_finds_faster(tiny_model, prefer, faster):
    prefer(faster)
    seen = []
    engine = get_engine("auto")
    engine.on_choice = seen.append
    assert isinstance(engine, AutoEngine) and engine.record == {"requested": "auto", "used": None}
    engine(_model(tiny_model), _samples(), torch.device("cpu"))
    record = engine.record
    assert record["used"] == faster and type(engine.engine) is grads.ENGINES[faster]
    assert set(record["seconds"]) == {"loop", "factored"} and all(s > 0 for s in record["seconds"].values())
    assert record["seconds"][faster] < record["seconds"]["factored" if faster == "loop" else "loop"]
    assert seen == [record]  # reported once, at the choice


def test_the_probe_leaves_rng_mode_and_grads_as_they_were(tiny_model):
    """The same RNG draws (LoRA dropout) follow as without the probe: auto's result and the RNG state after it are
    those of the chosen engine called directly; .grad and every module's mode are untouched."""
    model = _model(tiny_model)
    params = trainable_params(model)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    before = [p.grad for p in params]
    modes = [m.training for m in model.modules()]
    batch = _samples()
    torch.manual_seed(7)
    auto = AutoEngine()
    got = auto(model, batch, torch.device("cpu"))
    rng_after_auto = torch.get_rng_state()
    torch.manual_seed(7)
    want = grads.ENGINES[auto.record["used"]]()(model, batch, torch.device("cpu"))
    assert torch.equal(rng_after_auto, torch.get_rng_state())
    assert torch.equal(got.grads, want.grads) and torch.equal(got.losses, want.losses)
    assert all(p.grad is g and bool((g == 0.5).all()) for p, g in zip(params, before))
    assert [m.training for m in model.modules()] == modes


def test_auto_is_loop_without_a_probe_where_factored_does_not_apply(tiny_model, prefer):
    slow = prefer("factored")  # the loop engine would lose the probe, if there were one
    model = _model(tiny_model)
    next(p for n, p in model.named_parameters() if "norm" in n).requires_grad_(True)
    engine = AutoEngine()
    out = engine(model, _samples(), torch.device("cpu"))
    assert engine.record["used"] == "loop" and engine.record["seconds"] is None
    assert "every trainable parameter" in engine.record["reason"] and slow.calls == 0
    assert out.grads.shape[1] == sum(p.numel() for p in trainable_params(model))


def test_auto_is_loop_for_dora(smol_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(len(smol_tokenizer), seed=0),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    engine = AutoEngine()
    engine(model, _samples()[:1], torch.device("cpu"))
    assert engine.record["used"] == "loop" and "plain LoRA only" in engine.record["reason"]


def _cfg(model_dir, task, refs, out, engine, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        "model.lora_dropout=0.1", f"data.task={task}", f"data.reference={refs}", "data.max_length=64",
        "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}",
        "train.method=dualselect", "dualselect.warmup_steps=2", "dualselect.k_task=2", "dualselect.k_ref=3",
        f"train.grad_engine={engine}", *extra], method_configs())


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _engine_info(run_dir):
    return json.loads((run_dir / "run_info.json").read_text())["grad_engine"]


def _logs(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"}
            for name in ("metrics.jsonl", "selection.jsonl") for x in (run_dir / name).read_text().splitlines()]


@pytest.mark.parametrize("faster", ["loop", "factored"])
def test_an_auto_run_equals_the_run_with_its_engine_named(tiny_model_dir, toy_data, tmp_path, prefer, faster):
    task, refs = toy_data
    prefer(faster)
    auto = train(_cfg(tiny_model_dir, task, refs, tmp_path / "auto", "auto", "train.max_steps=5"))
    info = _engine_info(auto.run_dir)
    assert info["requested"] == "auto" and info["used"] == faster and info["seconds"][faster] > 0
    named = train(_cfg(tiny_model_dir, task, refs, tmp_path / "named", faster, "train.max_steps=5"))
    assert _engine_info(named.run_dir) == {"requested": faster, "used": faster}
    a, b = _adapter(auto.run_dir), _adapter(named.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _logs(auto.run_dir) == _logs(named.run_dir)


def test_a_resumed_auto_run_keeps_the_engine_it_started_with(tiny_model_dir, toy_data, tmp_path, prefer,
                                                             monkeypatch):
    task, refs = toy_data
    extra = ["train.checkpoint_every=2"]
    prefer("factored")
    full = train(_cfg(tiny_model_dir, task, refs, tmp_path / "full", "factored", *extra))

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", "auto", *extra), on_step=crash)
    first = _engine_info(tmp_path / "cut")
    assert first["used"] == "factored"
    slow = prefer("loop")  # a new probe would now choose loop
    probes, original = [], AutoEngine._choose
    monkeypatch.setattr(AutoEngine, "_choose", lambda self, *a: probes.append(1) or original(self, *a))
    resumed = train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", "auto", *extra), resume=True)
    assert probes == [] and slow.calls == 0
    assert _engine_info(resumed.run_dir) == first
    a, b = _adapter(full.run_dir), _adapter(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_records_auto_unused_and_unknown_engines_are_refused(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    res = train(load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.lora_r=2", f"data.task={task}",
                                   "data.max_length=64", "train.max_steps=1", "train.quiet=true",
                                   "train.grad_engine=auto", f"train.output_dir={tmp_path / 'sft'}"], method_configs()))
    assert _engine_info(res.run_dir) == {"requested": "auto", "used": None}  # sft computes no per-sample gradients
    with pytest.raises(DualSelectError, match="train.grad_engine must be one of"):
        _cfg(tiny_model_dir, task, refs, tmp_path / "x", "fast")
    two = SimpleNamespace(world_size=2, is_main=True)  # a run in two processes: each would time and choose alone
    with pytest.raises(DualSelectError, match="grad_engine=auto chooses in one process, and this run has 2"):
        build(_cfg(tiny_model_dir, task, refs, tmp_path / "y", "auto"), tmp_path / "y", comm=two)
