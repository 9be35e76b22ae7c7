"""Append-only JSONL logs of a run (metrics, selections), resumable by byte offset."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(x):
    """JSON-safe: tensors -> lists, NaN/inf -> None."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class JsonlLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")

    def offset(self) -> int:
        return self.path.stat().st_size

    def truncate(self, offset: int) -> None:
        """Drop what was written after a checkpoint (used on resume)."""
        with open(self.path, "r+") as fh:
            fh.truncate(offset)
