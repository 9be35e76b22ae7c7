"""What a multi-session grid has finished and what is left, running nothing: `dualselect bench CONFIG --status` and
`dualselect continual CONFIG --status`. A unit (a grid cell, a tuning cell, a continual stage run) is finished
when its done.json is in the output dir or in the archive (restored by the next run), started when its
cell.yaml is there without done.json (resumed by the next run), else to run; the compute left is estimated from
the finished units' train + eval seconds, in this CPU's time (units timed on other CPUs scaled by the measured
ratio, see unit_status)."""

from __future__ import annotations

import statistics
from pathlib import Path

from . import bench as b
from .runinfo import read_run_info


def grid_status(path: str | Path, overrides: list[str] = (), only: dict[str, list[str]] | None = None) -> dict:
    """What a grid has done and what is left, without running anything (`dualselect bench CONFIG --status`): per
    method its tuning cells and grid cells (see unit_status)."""
    from .tune import tune_cells

    bench, _, label, _ = b.load_bench(path, list(overrides))
    cells = b.select_cells(b.cells_of(bench), only or {})
    plan = tune_cells(bench.tune, cells, Path(bench.output_dir), label) if bench.tune else {}
    units = [(m, "tuning", c.path) for m, tried in plan.items() for _, c in tried]
    units += [(c.labels.get(b.METHOD_AXIS, ""), "cells", c.path) for c in cells]
    order = list(dict.fromkeys(c.labels.get(b.METHOD_AXIS, "") for c in cells))  # the method axis's order
    return unit_status(units, Path(bench.output_dir), Path(bench.archive) if bench.archive else None,
                       ["tuning", "cells"], order)


def unit_cpu(unit: Path) -> str | None:
    """The CPU a finished unit was trained on (its train run's run_info.json), or None where unrecorded."""
    return read_run_info(unit / "train").get("machine", {}).get("cpu")


def cpu_factor(timed: list[tuple[str, float, str | None]], here: str) -> float | None:
    """How much slower this CPU runs a unit than the other CPUs did: per group (row, kind) timed both here and
    on another recorded CPU, the ratio of its mean seconds here to its mean seconds there; the median over such
    groups, or None when no group was timed on both. `timed`: (group, seconds, cpu or None) of the finished units."""
    ratios = []
    for group in dict.fromkeys(g for g, _, _ in timed):
        on = [s for g, s, cpu in timed if g == group and cpu == here]
        off = [s for g, s, cpu in timed if g == group and cpu not in (here, None)]
        if on and off:
            ratios.append(statistics.fmean(on) / statistics.fmean(off))
    return statistics.median(ratios) if ratios else None


def unit_status(units: list[tuple[str, str, Path]], out: Path, archive: Path | None, kinds: list[str],
                order: list[str], here: str | None = None) -> dict:
    """Per row (a method, in `order`) and kind (tuning, cells, stages), the units (row, kind, dir under `out`)
    finished here (done.json), in the archive (the same relative path under `archive`; restored by the next
    run), started (cell.yaml, no done.json) or to run; and the compute left, estimated per row from its finished
    units of the same kind (else of its other kinds, else every finished unit), as train + eval seconds on this
    CPU (`here`, default models.cpu_name()): a unit timed on another CPU counts its seconds times cpu_factor
    (1 where no group was timed on both)."""
    if here is None:
        from .models import cpu_name
        here = cpu_name()

    def state(unit: Path) -> tuple[str, float | None, str | None]:
        for where, d in (("done", unit), ("archived", archive / unit.relative_to(out) if archive else None)):
            if d is not None and (d / b.DONE).exists():
                return where, b.seconds_of(d / b.DONE), unit_cpu(d)
        return ("started" if (unit / b.CELL_CONFIG).exists() else "todo"), None, None

    rows = {m: {k: {"done": 0, "archived": 0, "started": 0, "todo": 0, "seconds": []} for k in kinds}
            for m in order}
    timed = []
    for method, kind, path in units:
        where, seconds, cpu = state(path)
        rows[method][kind][where] += 1
        if seconds is not None:
            timed.append(((method, kind), seconds, cpu))
    factor = cpu_factor(timed, here)
    for (method, kind), seconds, cpu in timed:
        rows[method][kind]["seconds"].append(seconds if cpu == here or factor is None else seconds * factor)
    everything = [s for r in rows.values() for k in kinds for s in r[k]["seconds"]]
    total = 0.0
    for row in rows.values():
        left = 0.0
        for kind in kinds:
            n_left = row[kind]["started"] + row[kind]["todo"]
            known = row[kind]["seconds"] or [s for k in kinds for s in row[k]["seconds"]] or everything
            if n_left and known:
                left += n_left * sum(known) / len(known)
        row["seconds_left"] = left if everything else None
        total += left
    return {"output_dir": str(out), "archive": str(archive) if archive else None, "kinds": kinds, "methods": rows,
            "seconds_left": total if everything else None, "cpu": here, "cpu_factor": factor,
            "timed_here": sum(cpu == here for _, _, cpu in timed),
            "timed_elsewhere": sum(cpu != here for _, _, cpu in timed)}


def markdown(status: dict) -> str:
    """The --status table: per method, each kind's units finished / total, and the compute left."""
    def count(d: dict) -> str:
        total = d["done"] + d["archived"] + d["started"] + d["todo"]
        if not total:
            return "-"
        extra = [f"{d[k]} {k}" for k in ("archived", "started") if d[k]]
        return f"{d['done'] + d['archived']}/{total}" + (f" ({', '.join(extra)})" if extra else "")

    def hours(s: float | None) -> str:
        return "?" if s is None else f"{s / 3600:.1f}"

    kinds = status["kinds"]
    lines = [f"{status['output_dir']}" + (f" (archive {status['archive']})" if status["archive"] else ""), "",
             "| method | " + " | ".join(f"{k} finished" for k in kinds) + " | core-hours left (est.) |",
             "|---|" + "---|" * len(kinds) + "---|"]
    for method, row in status["methods"].items():
        lines.append(f"| {method} | " + " | ".join(count(row[k]) for k in kinds) + f" | {hours(row['seconds_left'])} |")
    lines += ["", f"Left in all: about {hours(status['seconds_left'])} core-hours of train + eval (from the "
                  "finished units' times; `archived`: finished on another machine, restored by the next run; "
                  "`started`: begun, resumed by the next run)."]
    if status["timed_elsewhere"]:
        factor = status["cpu_factor"]
        lines += ["", f"Times in this CPU's time ({status['cpu']}): {status['timed_here']} finished units timed on it, "
                      f"{status['timed_elsewhere']} on other CPUs or unrecorded, "
                      + (f"counted {factor:.2f}x (this CPU's mean time over the others', median over the methods "
                         "timed on both)." if factor is not None else
                         "counted as they are (no method was timed both here and elsewhere: the estimate is the "
                         "other CPUs' time).")]
    return "\n".join(lines)
