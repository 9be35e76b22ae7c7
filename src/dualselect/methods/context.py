"""What a method gets from the training loop."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.formatting import Encoded
from ..data.records import Example
from ..logs import JsonlLog


@dataclass
class TrainContext:
    model: Any
    params: list[torch.nn.Parameter]
    task: list[Encoded]
    reference: list[Encoded] | None
    engine: Callable  # grads.ENGINES[...] instance
    device: torch.device
    pad_id: int
    batch_size: int
    epochs: int
    seed: int
    autocast: Callable = contextlib.nullcontext
    selection_log: JsonlLog | None = None
    progress: Callable = field(default=lambda it, **kw: it)  # wraps long loops in a progress bar
    run_dir: Path | None = None  # where a method may keep files of its own (e.g. a selector's scores)
    resuming: bool = False  # train(..., resume=True): plan() may reuse what an earlier attempt saved in run_dir
    # For methods that generate or build new targets (feedback-gated): the tokenizer, the prompt template, the
    # examples behind `task` / `reference` (same order) and the encoder of a new example (data settings).
    tokenizer: Any = None
    template: str = "chat"
    task_examples: list[Example] | None = None
    reference_examples: list[Example] | None = None
    encode: Callable[[Example], Encoded] | None = None
