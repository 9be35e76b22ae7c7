"""A bench grid that spans machines: a compact copy of its finished work (`bench.archive`), meant to be committed.

A grid of dozens of cells runs for many hours, longer than a machine may be held; only committed files
survive. After each finished unit (a cell or a tuning cell with done.json, an aligned-model evaluation with
results.json) the bench copies what its report needs into the archive directory, under the same relative
path as in bench.output_dir; a later run restores every archived unit that its output_dir lacks, so the
finished units are skipped, not recomputed.

What is kept: cell.yaml, done.json, the train run's config.yaml, run_info.json, metrics.jsonl and
selection.jsonl (ids, scores; gzipped), the eval's settings.json, results.json and samples.jsonl (gzipped)
*without the text* of prompts, responses and gold answers (ids, verdicts and judge details only): no data
from the data directory is copied into the archive. Not kept: adapters, checkpoints and models (a restored cell
cannot be evaluated again; its verdicts are final). The aligned model is retrained from its recipe on each
machine, and another CPU kind or thread count rounds it into other weights: ALIGNED_FILE records the sha256 of
every aligned model the archived units started from, each unit's done.json names its own (aligned_sha256), and
a run whose aligned model is not among them says so.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DualSelectError
from .logs import write_atomic

log = logging.getLogger("dualselect")

DONE = "done.json"
ALIGNED_FILE = "aligned.json"
LOCK = ".restore.lock"  # in the output dir: restores take turns
# relative path in a unit -> gzipped in the archive
KEPT = {"cell.yaml": False, DONE: False, "train/config.yaml": False, "train/run_info.json": False,
        "train/metrics.jsonl": True, "train/selection.jsonl": True, "eval/settings.json": False,
        "eval/results.json": False, "eval/samples.jsonl": True,
        # an aligned-model evaluation is an eval dir of its own
        "settings.json": False, "results.json": False, "samples.jsonl": True}
TEXT_KEYS = ("prompt", "response", "gold", "baseline_response", "reference_answer")  # dropped from eval samples


def _strip(line: str) -> str:
    rec = json.loads(line)
    for k in TEXT_KEYS:
        rec.pop(k, None)
    return json.dumps(rec, ensure_ascii=False)


def save_unit(unit: Path, out_dir: Path, archive: Path) -> Path:
    """Copy the kept files of a finished unit (a dir under out_dir) to the same relative path under archive;
    the unit's done marker is written last, so an interrupted save is redone by the next one."""
    rel = Path(unit).resolve().relative_to(Path(out_dir).resolve())
    dest = Path(archive) / rel
    marker = DONE if (unit / DONE).exists() else "results.json"
    for name, gz in sorted(KEPT.items(), key=lambda kv: kv[0] == marker):
        src = unit / name
        if not src.is_file():
            continue
        data = src.read_text(encoding="utf-8")
        if name.endswith("samples.jsonl"):
            data = "".join(_strip(line) + "\n" for line in data.splitlines() if line.strip())
        write_atomic(dest / (name + ".gz" if gz else name),
                     gzip.compress(data.encode("utf-8"), mtime=0) if gz else data)
    return dest


def _units(archive: Path) -> list[Path]:
    """The archived units: dirs holding a done.json, or an eval's results.json outside a cell."""
    units = {p.parent for p in archive.rglob(DONE)}
    units |= {p.parent for p in archive.rglob("results.json")
              if not any(u in p.parents for u in units) and p.parent.name != "eval"}
    return sorted(units)


def _remove_stale(dest: Path) -> None:
    """The temporary dirs beside unit `dest` that a killed restore left (named with its process id; that
    process is gone). Those of a live process, another one restoring now, are its own."""
    prefix = f".{dest.name}.restore-"
    for stale in dest.parent.glob(prefix + "*") if dest.parent.is_dir() else ():
        pid = stale.name[len(prefix):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass


def restore(archive: Path, out_dir: Path) -> list[Path]:
    """Copy every archived unit that out_dir lacks (no done.json / results.json there) into out_dir, the gzipped
    files unpacked; a unit out_dir started but did not finish is replaced. Processes that restore the same archive
    at once (one per core) take turns (a lock file in out_dir), so none sees, replaces or deletes another's
    half-restored unit; each unit is unpacked beside its place and renamed into it whole, and what a killed
    restore left beside a unit is removed by the next one. Returns the restored unit dirs."""
    archive, out_dir = Path(archive), Path(out_dir)
    if not archive.is_dir():
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    restored = []
    with open(out_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process is killed
        for src in _units(archive):
            dest = out_dir / src.relative_to(archive)
            _remove_stale(dest)
            if (dest / (DONE if (src / DONE).exists() else "results.json")).exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.restore-{os.getpid()}-", dir=dest.parent))
            try:
                for f in sorted(p for p in src.rglob("*") if p.is_file()):
                    name = f.relative_to(src).as_posix()
                    gz = name.endswith(".gz")
                    target = tmp / (name[:-3] if gz else name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(gzip.decompress(f.read_bytes()) if gz else f.read_bytes())
                if dest.exists():
                    shutil.rmtree(dest)
                os.rename(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            restored.append(dest)
    if restored:
        log.info("restored %d finished units from the archive %s", len(restored), archive)
    return restored


def model_sha256(model_dir: Path) -> str:
    """sha256 over a model dir's weight files (safetensors/bin, sorted by name)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise DualSelectError(f"{model_dir}: no weight files (.safetensors or .bin)")
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def check_aligned(archive: Path, aligned: Path, machine: str, threads: int | None = None,
                  sha: str | None = None) -> str | None:
    """Record the aligned model's weights hash in the archive (first time), or compare with the recorded ones.
    `threads`: the torch thread count its alignment trained with (matrix products round differently with
    another count, so it is part of what reproduces the weights); `sha`: the weights' hash, when known. Returns a
    warning line when the hash is not among the recorded ones (cells of this run start from another aligned model
    than the archived ones: same recipe, other float rounding), else None."""
    sha = sha or model_sha256(aligned)
    path = Path(archive) / ALIGNED_FILE
    record = json.loads(path.read_text()) if path.exists() else {"models": []}
    known = {m["sha256"]: m for m in record["models"]}
    if sha not in known:
        record["models"].append({"sha256": sha, "machine": machine, "threads": threads})
        write_atomic(path, json.dumps(record, indent=2) + "\n")
    if not known or sha in known:
        return None
    archived = ", ".join(f"{k[:12]} ({_with_threads(m.get('threads'))})" for k, m in sorted(known.items()))
    hint = ""
    counts = sorted({m["threads"] for m in known.values() if m.get("threads")})
    if counts and threads not in counts:
        hint = (f"; to start from the archived weights, delete {aligned} and align alone with "
                f"OMP_NUM_THREADS={counts[0]} (`--align-only`) before the runs")
    return (f"the aligned model's weights ({sha[:12]}, {_with_threads(threads)}) differ from the archived cells' "
            f"({archived}): the same alignment recipe gave other float rounding (another thread count or CPU "
            f"kind), so this run's cells start from a slightly different aligned model (recorded in {path}){hint}")


def _with_threads(n: int | None) -> str:
    return f"trained with {n} thread{'s' * (n != 1)}" if n else "thread count not recorded"


def start_models_note(units: dict[str, str | None], what: str = "cells") -> str | None:
    """units: a unit's name -> the aligned weights' sha256 it started from (done.json's aligned_sha256; None: not
    recorded). A line naming them when they are not all the same one (the same alignment recipe rounds into other
    weights on another CPU kind or thread count), else None."""
    groups: dict[str, list[str]] = {}
    for name, sha in units.items():
        groups.setdefault(sha[:12] if sha else "not recorded", []).append(name)
    if len(groups) < 2:
        return None
    parts = "; ".join(f"{sha}: {', '.join(names)}" for sha, names in sorted(groups.items()))
    return (f"start models: the {what} started from {len(groups)} aligned models (the same alignment recipe, "
            f"rounded differently on another CPU kind or thread count): {parts}. A paired difference whose two "
            f"{what} of a seed started from different aligned models counts that difference as seed-to-seed "
            "variance")
