"""The training loop on a tiny random Llama: outputs, resume, method equivalences, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dualselect.config import load_config
from dualselect.errors import DualSelectError
from dualselect.methods import method_configs
from dualselect.train import train


def _cfg(model_dir, task, refs, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", f"data.reference={refs}", "data.max_length=64",
        "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}",
        *extra], method_configs())


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_sft_run_writes_a_complete_run_dir(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", "train.epochs=3"))
    d = res.run_dir
    assert res.steps == 15  # 20 samples / batch 4 x 3 epochs
    assert (d / "adapter" / "adapter_config.json").exists()
    assert json.loads((d / "adapter" / "adapter_config.json").read_text())["r"] == 4
    info = json.loads((d / "run_info.json").read_text())
    assert info["seed"] == 3 and info["effective_batch_size"] == 4
    assert info["data"]["task"]["sha256"] and info["data"]["task"]["n_kept"] == 20
    assert info["versions"]["torch"] == torch.__version__
    assert "method: sft" in (d / "config.yaml").read_text()
    assert "done: 15 steps" in (d / "train.log").read_text()
    losses = [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 15
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns


@pytest.mark.parametrize("method", ["sft", "dualselect"])
def test_resumed_run_ends_with_the_same_adapter(method, tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    extra = [f"train.method={method}", "train.epochs=2", "train.checkpoint_every=2", "model.lora_dropout=0.1",
             *(["dualselect.warmup_steps=2", "dualselect.k_task=2", "dualselect.k_ref=3"] if method == "dualselect"
               else [])]
    full = train(_cfg(tiny_model_dir, task, refs, tmp_path / "full", *extra))

    def crash(step):
        if step == 6:  # after the checkpoint at 6 steps was due at step index 5; dies mid-epoch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", *extra), on_step=crash)
    assert not (tmp_path / "cut" / "adapter").exists()
    resumed = train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", *extra), resume=True)

    a, b = _adapter(full.run_dir), _adapter(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("metrics.jsonl", "selection.jsonl"):
        strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                           for x in p.read_text().splitlines()]
        assert strip(full.run_dir / name) == strip(resumed.run_dir / name)


def test_dualselect_keeping_everything_without_correction_is_sft(tiny_model_dir, toy_data, tmp_path):
    """k_T = B, rho = 0, W = 0: DualSelect's update is the batch mean gradient, i.e. plain SFT."""
    task, refs = toy_data
    common = ["train.epochs=2", "model.lora_dropout=0"]
    sft = train(_cfg(tiny_model_dir, task, refs, tmp_path / "sft", *common))
    ds = train(_cfg(tiny_model_dir, task, refs, tmp_path / "ds", *common, "train.method=dualselect",
                    "dualselect.warmup_steps=0", "dualselect.k_task=0", "dualselect.rho=0", "dualselect.k_ref=2"))
    a, b = _adapter(sft.run_dir), _adapter(ds.run_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # and the correction term changes the result
    ds_rho = train(_cfg(tiny_model_dir, task, refs, tmp_path / "rho", *common, "train.method=dualselect",
                        "dualselect.warmup_steps=0", "dualselect.k_task=0", "dualselect.rho=0.5",
                        "dualselect.k_ref=2"))
    assert any(not torch.allclose(a[k], _adapter(ds_rho.run_dir)[k]) for k in a)


def test_dualselect_selection_log(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", "train.method=dualselect", "train.epochs=2",
                     "dualselect.warmup_steps=3", "dualselect.k_task=2", "dualselect.k_ref=5"))
    recs = [json.loads(x) for x in (res.run_dir / "selection.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in recs]
    assert kinds == ["warmup"] * 3 + (["refresh"] + ["step"] * 5) * 2
    refresh = recs[3]
    assert len(refresh["ids"]) == 5 and refresh["n_scored"] == 12
    assert refresh["scores"] == sorted(refresh["scores"], reverse=True)
    assert refresh["scores"] == pytest.approx([a + b for a, b in zip(refresh["loss_terms"], refresh["cosine_terms"])])
    cand = dict(zip(refresh["candidates"]["ids"], refresh["candidates"]["losses"]))
    assert [cand[i] for i in refresh["ids"]] == refresh["losses"]
    step = recs[4]
    assert len(step["ids"]) == 2 and len(step["candidates"]["ids"]) == 4
    assert max(step["scores"]) <= min(s for i, s in zip(step["candidates"]["ids"], step["candidates"]["scores"])
                                      if i not in step["ids"])
    assert refresh["d_t_norm"] > 0  # the warm-up built a task direction


def test_bad_inputs_give_clear_errors(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    with pytest.raises(DualSelectError, match="missing.jsonl"):
        train(_cfg(tiny_model_dir, tmp_path / "missing.jsonl", refs, tmp_path / "a"))
    with pytest.raises(DualSelectError, match="reference pool"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "b", "train.method=dualselect", "data.reference=null"))
    train(_cfg(tiny_model_dir, task, refs, tmp_path / "c", "train.max_steps=1"))
    with pytest.raises(DualSelectError, match="already holds a run"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "c", "train.max_steps=1"))
    with pytest.raises(DualSelectError, match="cannot resume.*train.lr"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "c", "train.lr=0.5"), resume=True)


def test_init_adapter_with_other_lora_keys_is_refused_and_run_info_records_the_adapter(tiny_model_dir, toy_data,
                                                                                      tmp_path):
    """model.lora_* keys that do not describe model.init_adapter are refused (they cannot apply to a saved
    adapter, and must not be dropped without a word); run_info.json records the adapter actually trained."""
    task, refs = toy_data
    first = train(_cfg(tiny_model_dir, task, refs, tmp_path / "a", "train.max_steps=1"))
    info = json.loads((first.run_dir / "run_info.json").read_text())["adapter"]
    assert info == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                    "init_adapter": None}
    adapter = first.run_dir / "adapter"
    with pytest.raises(DualSelectError, match=r"does not match model.lora_r=16 \(the adapter has 4\)"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "b", "train.max_steps=1", f"model.init_adapter={adapter}",
                   "model.lora_r=16"))
    with pytest.raises(DualSelectError, match=r"model.lora_targets=\['k_proj', 'q_proj', 'v_proj'\]"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "c", "train.max_steps=1", f"model.init_adapter={adapter}",
                   "model.lora_targets=[q_proj,k_proj,v_proj]"))
    again = train(_cfg(tiny_model_dir, task, refs, tmp_path / "d", "train.max_steps=1",
                       f"model.init_adapter={adapter}"))
    info = json.loads((again.run_dir / "run_info.json").read_text())["adapter"]
    assert info["r"] == 4 and info["init_adapter"] == str(adapter)
