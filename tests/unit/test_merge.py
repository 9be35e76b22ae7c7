"""models.merge_adapter: the merged weights are W + scale * B @ A computed in float64 and rounded once to fp32,
so an archived alignment adapter gives the same bits on every CPU kind."""

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from dualselect import models


def test_merge_is_the_float64_sum_rounded_once(tiny_model_dir, tmp_path):
    base = models.load_model(str(tiny_model_dir), precision="fp32", device="cpu")[0]
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft = get_peft_model(base, cfg)
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p) * 0.3  # B is zero at init: give both factors values
    peft.save_pretrained(tmp_path / "adapter")
    state = {k: v for k, v in peft.state_dict().items()}
    merged = models.merge_adapter(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged")
    weights = load_file(merged / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    scale = 12 / 4
    checked = 0
    for key, w in weights.items():
        if not key.endswith(("q_proj.weight", "v_proj.weight")):
            continue
        prefix = "base_model.model." + key[: -len(".weight")]
        a = state[f"{prefix}.lora_A.default.weight"].double()
        b = state[f"{prefix}.lora_B.default.weight"].double()
        w0 = state[f"{prefix}.base_layer.weight"].double()
        expected = (w0 + scale * (b @ a)).float()
        assert torch.equal(w, expected), key  # bit for bit, not approximately
        checked += 1
    assert checked == 4  # two layers, q and v
    # the layers the adapter does not touch keep their bits
    untouched = load_file(next(tiny_model_dir.glob("*.safetensors")))
    assert torch.equal(weights["model.layers.0.mlp.up_proj.weight"], untouched["model.layers.0.mlp.up_proj.weight"])
