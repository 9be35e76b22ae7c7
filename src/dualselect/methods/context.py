"""What a method gets from the training loop."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.formatting import Encoded
from ..data.records import Example
from ..distributed import SingleProcess
from ..errors import DualSelectError
from ..logs import JsonlLog


class NonFiniteError(DualSelectError):
    """A NaN or inf loss or gradient, with the ids of the samples it came from. Raised inside a step (or by the
    training loop after it); the loop then stops the run (train.nonfinite=stop) or skips the step (skip)."""

    def __init__(self, ids: list[str], what: str, data: str | None = None, message: str | None = None):
        self.ids, self.what, self.data = list(ids), what, data
        super().__init__(message or f"non-finite {what} (NaN or inf) on {data + ' ' if data else ''}samples "
                                    f"{show_ids(self.ids)}")


def show_ids(ids: list[str], most: int = 20) -> str:
    return ", ".join(ids[:most]) + (f" and {len(ids) - most} more" if len(ids) > most else "")



def nonfinite_grad_rows(grads: torch.Tensor) -> torch.Tensor:
    """[n] bool: whether row i of `grads` (a [n, ...] tensor) holds a NaN or inf. A NaN or inf makes its row's sum
    NaN or inf, so only the rows whose sum is not finite (also a finite row whose sum overflows) are checked entry by
    entry, one at a time (the boolean temporary is one row): for 8 SmolLM2 LoRA gradients 2 ms instead of 73 on a 2-core CPU."""
    g = grads.detach().flatten(1) if grads.dim() > 1 else grads.detach().reshape(-1, 1)
    bad = ~torch.isfinite(g.sum(dim=1))
    for i in bad.nonzero().flatten().tolist():
        bad[i] = not bool(torch.isfinite(g[i]).all())
    return bad


def nonfinite_rows(losses: torch.Tensor, grads: torch.Tensor | None = None) -> tuple[list[int], str]:
    """The rows holding a NaN or inf: positions i where losses[i] or any of grads[i] (a [n, ...] tensor) is not
    finite, and what was ("loss", "gradient" or "loss and gradient"; "" when every row is finite)."""
    bad_loss = ~torch.isfinite(losses.detach().reshape(len(losses)))
    bad_grad = nonfinite_grad_rows(grads) if grads is not None else torch.zeros_like(bad_loss)
    what = " and ".join(w for w, bad in (("loss", bad_loss), ("gradient", bad_grad)) if bool(bad.any()))
    return (bad_loss | bad_grad.to(bad_loss.device)).nonzero().flatten().tolist(), what


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
    # train.nonfinite: "stop" or "skip"; with skip, finite_rows records the samples it drops here (the loop logs
    # them with the step and clears the list)
    nonfinite: str = "stop"
    dropped: list[dict] = field(default_factory=list)
    # the processes of the run (distributed.py): each takes its share of a step's batch (comm.share) and the
    # method sum-reduces the shares into the whole batch's update; SingleProcess in an ordinary run
    comm: Any = field(default_factory=SingleProcess)

    def finite_rows(self, ids: list[str], losses: torch.Tensor, grads: torch.Tensor | None = None,
                    data: str = "task") -> list[int]:
        """Positions of the samples (`ids`, with per-sample `losses` [n] and `grads` [n, P]) whose loss and
        gradient are finite. Any other: NonFiniteError naming them (train.nonfinite=stop), else they are left out
        and recorded in `dropped` (skip; the list may come back empty)."""
        bad, what = nonfinite_rows(losses, grads)
        if not bad:
            return list(range(len(ids)))
        bad_ids = [ids[i] for i in bad]
        if self.nonfinite != "skip":
            raise NonFiniteError(bad_ids, what, data)
        self.dropped.append({"data": data, "what": what, "ids": bad_ids})
        left_out = set(bad)
        return [i for i in range(len(ids)) if i not in left_out]
