"""Small helpers shared by several benchmark scripts (the machine facts themselves are in grads_speed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dualselect import models


def tiny_model_dir(path: Path) -> Path:
    """Save the tiny random Llama with the SmolLM2 tokenizer to `path` (a model directory train() can load)."""
    tok = models.load_tokenizer(models.DEFAULT_MODEL)
    models.tiny_llama(len(tok), seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cpu_facts(device: torch.device) -> dict:
    """torch's CPU kernel level and the CPU's native bf16 flags (what precision=auto decides on)."""
    flags = sorted(models.NATIVE_BF16_FLAGS & models.cpu_flags()) if device.type == "cpu" else []
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16_flags": flags}


def run_and_print(args, run, markdown) -> dict:
    """The end of every benchmark's main(): torch threads as --threads asks, run(args), print its Markdown, write
    --json if given."""
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report
