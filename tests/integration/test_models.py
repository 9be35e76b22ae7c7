"""The embedded model: found inside the installed wheel, converted once to safetensors, loadable."""

import hashlib
from pathlib import Path

import pytest
import torch

from dualselect.models import DEFAULT_MODEL, add_lora, autocast, load_model, resolve_model_path, resolve_precision

pytestmark = pytest.mark.integration

# sha256 of the fp32 weights the authors' parity run saved from the same GGUF (parity README).
PARITY_WEIGHTS_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"


def test_embedded_model_converts_to_the_same_weights_as_the_parity_run():
    path = Path(resolve_model_path(DEFAULT_MODEL))
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    h = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert h == PARITY_WEIGHTS_SHA256


def test_embedded_model_trains_and_saves_a_lora_adapter(tmp_path):
    model, precision, device = load_model(DEFAULT_MODEL)
    assert precision == resolve_precision("auto", device) and device.type == "cpu"  # this machine's choice
    assert not getattr(model, "is_quantized", False)
    model = add_lora(model, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8)  # 30 layers, q 576->576, v 576->192
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with autocast(precision, device):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
