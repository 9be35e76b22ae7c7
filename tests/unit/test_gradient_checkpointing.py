"""model.gradient_checkpointing: the layers really are recomputed, and losses, per-sample gradients (loop and factored
engines, LoRA dropout on) and an SFT run's adapter equal those without it; refused where it cannot apply."""

import pytest
import torch
from safetensors.torch import load_file

from dualselect.config import load_config
from dualselect.errors import DualSelectError
from dualselect.grads import FactoredEngine, LoopEngine, batch_losses, flatten, trainable_params
from dualselect.methods import method_configs
from dualselect.models import add_lora, enable_gradient_checkpointing, tiny_llama
from dualselect.train import build, train

from test_grads import _samples  # three samples of lengths 5-14, prompts masked


def _model(vocab, checkpointing, targets=("q_proj", "v_proj")):
    model = add_lora(tiny_llama(vocab, seed=0), r=4, alpha=8, dropout=0.2, target_modules=list(targets))
    torch.manual_seed(1)
    for p in trainable_params(model):
        p.data.normal_(0, 0.05)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def _forward_count(model):
    """Calls of the first layer's q_proj lora_A forward (a list that grows)."""
    calls = []
    module = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj.lora_A.default"))
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("engine", [LoopEngine(), FactoredEngine(chunk=2), FactoredEngine(chunk=8)],
                         ids=["loop", "factored-2", "factored-8"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj")], ids=["qv", "all"])
def test_per_sample_gradients_equal_those_without_checkpointing(smol_tokenizer, engine, targets):
    plain, ckpt = (_model(len(smol_tokenizer), c, targets) for c in (False, True))
    calls = _forward_count(ckpt)
    batch = _samples()
    torch.manual_seed(5)  # the same dropout draws for both
    want = engine(plain, batch, torch.device("cpu"))
    torch.manual_seed(5)
    got = engine(ckpt, batch, torch.device("cpu"))
    # each forward ran twice (the factored engine's hooks saw both runs): 3 samples, or 2 / 1 padded chunks
    forwards = 3 if isinstance(engine, LoopEngine) else -(-3 // engine.chunk)
    assert len(calls) == 2 * forwards
    torch.testing.assert_close(got.grads, want.grads, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-5, atol=1e-8)
    assert torch.equal(got.tokens, want.tokens) and (want.grads.abs().sum(dim=1) > 0).all()
    assert all(p.grad is None for p in trainable_params(ckpt))


def test_batch_loss_and_its_gradient_equal_those_without_checkpointing(smol_tokenizer):
    plain, ckpt = (_model(len(smol_tokenizer), c) for c in (False, True))
    out = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        losses, _ = batch_losses(model, _samples(), 0, "cpu")
        losses.mean().backward()
        params = trainable_params(model)
        out.append((losses.detach(), flatten([p.grad for p in params], params)))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-8)


def _cfg(model_dir, task, refs, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        "model.lora_dropout=0.1", f"data.task={task}", f"data.reference={refs}", "data.max_length=64",
        "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}",
        *extra], method_configs())


@pytest.mark.parametrize("method", [["train.max_steps=3"],
                                    ["train.method=dualselect", "train.grad_engine=factored", "train.max_steps=4",
                                     "dualselect.warmup_steps=2", "dualselect.k_task=2", "dualselect.k_ref=3"]],
                         ids=["sft", "dualselect-factored"])
def test_a_run_ends_with_the_adapter_of_the_run_without_checkpointing(tiny_model_dir, toy_data, tmp_path, method):
    task, refs = toy_data
    runs = [train(_cfg(tiny_model_dir, task, refs, tmp_path / f"ckpt-{c}", f"model.gradient_checkpointing={c}",
                       *method)) for c in ("false", "true")]
    a, b = (load_file(str(r.run_dir / "adapter" / "adapter_model.safetensors")) for r in runs)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-8)
    assert "gradient_checkpointing: true" in (runs[1].run_dir / "config.yaml").read_text()


def test_checkpointing_is_applied_or_refused(tiny_model_dir, toy_data, tmp_path, smol_tokenizer):
    task, refs = toy_data
    model = build(_cfg(tiny_model_dir, task, refs, tmp_path / "on", "model.gradient_checkpointing=true"),
                  tmp_path / "on").ctx.model
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    with pytest.raises(DualSelectError, match="dualselect.score_mode=eval computes every gradient in eval mode"):
        build(_cfg(tiny_model_dir, task, refs, tmp_path / "eval", "model.gradient_checkpointing=true",
                   "train.method=dualselect", "dualselect.score_mode=eval"), tmp_path / "eval")
    unsupported = tiny_llama(len(smol_tokenizer), seed=0)
    unsupported.supports_gradient_checkpointing = False
    with pytest.raises(DualSelectError, match="LlamaForCausalLM does not support gradient checkpointing"):
        enable_gradient_checkpointing(unsupported)
    with pytest.raises(DualSelectError, match="model.gradient_checkpointing must be"):
        _cfg(tiny_model_dir, task, refs, tmp_path / "x", "model.gradient_checkpointing=sometimes")
