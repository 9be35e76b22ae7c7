"""`dualselect bench CONFIG`: a grid of cells, each a normal `train` run followed by `eval`; resumable; one
report per table at the end (`dualselect report`).

A bench config is a run config (model, data, train, eval and method sections: the shared settings of every
cell) plus a `bench` section::

    bench:
      output_dir: runs/bench/hft-sst2
      baseline: sft
      align: [data.task=align.jsonl, train.lr=5e-4]   # optional alignment stage (LoRA SFT, merged)
      grid:
        method:                                    # a named axis: label -> the overrides of that value
          sft: [train.method=sft]
          dualselect: [train.method=dualselect]
          dualselect-no-correction: [train.method=dualselect, dualselect.rho=0]
        data.harmful_ratio: [0.0, 0.1, 0.2]        # a config-key axis: one cell per value
        train.seed: [0, 1, 2]

Cells are the product of the axes, seeds varying slowest (a stopped grid holds whole seeds). The base
config may hold the sections of several methods: each cell keeps the one of its own train.method, and a
section no cell uses is an error. Every table of the report is one combination of the axes other than
`method` and `train.seed`: its rows are the methods, each over its seeds (plus `aligned`, the aligned model
itself, when there is an alignment stage).

Resuming (the same command again): a cell with done.json is skipped; a cell killed mid-training resumes
from its last checkpoint (train.checkpoint_every), one killed mid-eval keeps its finished answers. A cell
whose config changed since it started is refused, not mixed.

Layout: OUTPUT_DIR/{bench.json, align/, aligned/, aligned-eval/<table>/, cells/<cell>/{cell.yaml, train/, eval/,
done.json}, report/<table>/, report.md}.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import models
from .config import dump_yaml, from_dict, load_config, parse_override, read_config_file, to_dict
from .errors import DualSelectError
from .logs import write_atomic

log = logging.getLogger("dualselect")

METHOD_AXIS, SEED_AXIS = "method", "train.seed"
DONE, CELL_CONFIG, MANIFEST = "done.json", "cell.yaml", "bench.json"
ALIGNED = "aligned"  # the report row of the aligned model (and its directory)
# keys that may differ between a cell's first start and its resumption
VOLATILE = {"train.quiet", "eval.quiet", "train.max_steps", "train.checkpoint_every", "train.log_every"}


@dataclass
class BenchConfig:
    output_dir: str = field(default="runs/bench", metadata={"help": "directory of the grid's cells and report"})
    grid: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "axes: a config key -> list of values, or a name -> {label: [overrides]}"})
    baseline: str | None = field(default=None, metadata={
        "help": "the method the others are compared with (default: sft when in the grid, else the first)"})
    align: list[str] | None = field(default=None, metadata={
        "help": "overrides of an alignment stage (LoRA SFT on the base model, merged; the cells start from it)"})
    resamples: int = field(default=2000, metadata={"help": "bootstrap resamples of the report"})
    permutations: int = field(default=10000, metadata={"help": "permutations of the report's paired tests"})

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError("bench.grid must name at least one axis")
        for axis, values in self.grid.items():
            if isinstance(values, dict):
                if not values:
                    raise ValueError(f"bench.grid.{axis} has no values")
                for label, overrides in values.items():
                    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
                        raise ValueError(f"bench.grid.{axis}.{label} must be a list of key=value overrides")
            elif isinstance(values, list):
                if "." not in axis:
                    raise ValueError(f"bench.grid.{axis}: a list axis must be a config key (section.key), or give "
                                     "a mapping of labels to overrides")
                if not values:
                    raise ValueError(f"bench.grid.{axis} has no values")
                if len(set(map(repr, values))) < len(values):
                    raise ValueError(f"bench.grid.{axis} lists a value twice")
            else:
                raise ValueError(f"bench.grid.{axis} must be a list of values or a mapping of labels to overrides")
        if self.resamples < 1 or self.permutations < 1:
            raise ValueError("bench.resamples and bench.permutations must be >= 1")


@dataclass
class Cell:
    labels: dict[str, str]  # axis -> value label
    overrides: list[str]
    path: Path
    train_method: str = ""  # set by cell_config

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        """The cell's row in the report: its method-axis label, else its train.method."""
        return self.labels.get(METHOD_AXIS) or self.train_method

    def table(self) -> dict[str, str]:
        """The axes that make this cell's table (all but method and seed)."""
        return {a: v for a, v in self.labels.items() if a not in (METHOD_AXIS, SEED_AXIS)}


def _value_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _axis_values(axis: str, values) -> list[tuple[str, list[str]]]:
    if isinstance(values, dict):
        return [(str(label), list(ovr)) for label, ovr in values.items()]
    return [(_value_text(v), [f"{axis}={_value_text(v)}"]) for v in values]


def _cell_dirname(labels: dict[str, str]) -> str:
    parts = [value if axis == METHOD_AXIS or "." not in axis else f"{axis.rsplit('.', 1)[1]}-{value}"
             for axis, value in labels.items()]
    return "__".join(_slug(p) for p in parts)


def load_bench(path: str | Path, overrides: list[str] = ()) -> tuple[BenchConfig, dict, str, list[str]]:
    """A bench config file -> (BenchConfig, the base run config mapping, its label, the overrides of every
    cell). `overrides` starting with `bench.` set the bench section; the others apply to every cell."""
    raw, label = read_config_file(path)
    bench_raw = dict(raw.pop("bench", None) or {})
    base_overrides = []
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "bench":
            if len(parts) != 2:
                raise DualSelectError(f"override {text!r}: set a whole bench key, e.g. bench.output_dir=DIR")
            bench_raw[parts[1]] = value
        else:
            base_overrides.append(text)
    if not isinstance(bench_raw, dict):
        raise DualSelectError(f"{label}: the bench section must be a mapping")
    bench = from_dict(BenchConfig, bench_raw, label, prefix="bench")
    return bench, raw, label, base_overrides


def cells_of(bench: BenchConfig) -> list[Cell]:
    """The grid's cells, seeds slowest (then the axes in the order written)."""
    axes = list(bench.grid)
    order = ([SEED_AXIS] if SEED_AXIS in axes else []) + [a for a in axes if a != SEED_AXIS]
    out, seen = [], set()
    for combo in itertools.product(*(_axis_values(a, bench.grid[a]) for a in order)):
        chosen = dict(zip(order, combo))
        labels = {a: chosen[a][0] for a in axes}  # directory names and tables keep the written order
        overrides = [o for a in axes for o in chosen[a][1]]
        name = _cell_dirname(labels)
        if name in seen:
            raise DualSelectError(f"bench.grid: two cells get the directory name {name!r}; give the axis values "
                                  "distinct labels")
        seen.add(name)
        out.append(Cell(labels, overrides, Path(bench.output_dir) / "cells" / name))
    return out


def _method_of(base: dict, overrides: list[str]) -> str:
    method = (base.get("train") or {}).get("method", "sft")
    for text in overrides:
        parts, value = parse_override(text)
        if parts == ["train", "method"]:
            method = value
        elif parts == ["train"] and isinstance(value, dict) and "method" in value:
            method = value["method"]
    return str(method)


def cell_config(cell: Cell, base: dict, label: str, base_overrides: list[str], method_configs: dict,
                aligned: Path | None, align_data: list[str]):
    """The run config of one cell: the base (keeping only its method's section) <- the overrides given on the
    command line <- the cell's axis values <- its directories."""
    method = _method_of(base, [*base_overrides, *cell.overrides])
    raw = {k: v for k, v in base.items() if k not in method_configs or k == method}
    fixed = [f"train.output_dir={cell.path / 'train'}", f"eval.adapter={cell.path / 'train' / 'adapter'}",
             f"eval.output_dir={cell.path / 'eval'}"]
    start = [f"model.name_or_path={aligned}"] if aligned else []
    cfg = load_config(None, [*start, *base_overrides, *cell.overrides, *fixed], method_configs, raw=raw,
                      label=f"{label} (cell {cell.name})")
    if align_data:
        seen = list(dict.fromkeys([*cfg.eval.train_files, *align_data]))
        cfg.eval.train_files = seen
    if not cfg.eval.benchmarks:
        raise DualSelectError(f"{label}: cell {cell.name} has no eval.benchmarks; set them in the eval section or "
                              "in an axis")
    cell.train_method = cfg.train.method
    return cfg


def _comparable(cfg_dict: dict) -> dict:
    out = json.loads(json.dumps(cfg_dict))
    for key in VOLATILE:
        section, name = key.split(".")
        out.get(section, {}).pop(name, None)
    return out


def check_cell_config(cell: Cell, cfg) -> None:
    """Refuse a cell (finished or not) that was started with another config than the grid gives it now."""
    path = cell.path / CELL_CONFIG
    if path.exists() and _comparable(yaml.safe_load(path.read_text())) != _comparable(to_dict(cfg)):
        raise DualSelectError(f"{cell.path}: this cell was started with another config (see {path}); remove "
                              "the cell directory to rerun it, or choose another bench.output_dir")


def _write_cell_config(cell: Cell, cfg) -> None:
    if (cell.path / CELL_CONFIG).exists():
        return
    if cell.path.exists():  # killed before its config was written: nothing in it is worth keeping
        shutil.rmtree(cell.path)
    write_atomic(cell.path / CELL_CONFIG, dump_yaml(cfg))


def run_cell(cell: Cell, cfg) -> dict:
    """Train (resuming a started run) then evaluate (resuming its answers); done.json marks the cell done."""
    from .eval.run import evaluate
    from .train import train

    _write_cell_config(cell, cfg)
    t0 = time.time()
    train_dir = cell.path / "train"
    trained = (train_dir / "adapter" / "adapter_config.json").exists()
    if not trained:
        started = (train_dir / "config.yaml").exists()
        if train_dir.exists() and not started:
            shutil.rmtree(train_dir)
        train(cfg, resume=started)
    t1 = time.time()
    evaluate(cfg)
    done = {"cell": cell.name, "labels": cell.labels, "method": cell.method, "train_seconds": round(t1 - t0, 1),
            "eval_seconds": round(time.time() - t1, 1), "resumed_training": trained}
    write_atomic(cell.path / DONE, json.dumps(done, indent=2) + "\n")
    return done


def align_stage(bench: BenchConfig, base: dict, label: str, method_configs: dict) -> tuple[Path | None, list[str]]:
    """The alignment stage (bench.align): LoRA SFT of the base config's model with the align overrides, merged
    into OUTPUT_DIR/aligned. Returns (the merged model dir or None, the data it trained on)."""
    if bench.align is None:
        return None, []
    from .train import train

    out = Path(bench.output_dir)
    run_dir, merged = out / "align", out / ALIGNED
    raw = {"model": dict(base.get("model") or {}), "data": {k: v for k, v in (base.get("data") or {}).items()
                                                              if k in ("data_dir", "template", "max_length")}}
    cfg = load_config(None, ["train.method=sft", *bench.align, f"train.output_dir={run_dir}"], method_configs,
                      raw=raw, label=f"{label} (bench.align)")
    if not cfg.data.task:
        raise DualSelectError(f"{label}: bench.align must set data.task (the alignment data)")
    seen = [s for s in (cfg.data.task, cfg.data.reference) if s]
    if (merged / "config.json").exists():
        log.info("aligned model (done): %s", merged)
        return merged, seen
    started = (run_dir / "config.yaml").exists()
    if run_dir.exists() and not started:
        shutil.rmtree(run_dir)
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        log.info("alignment stage: LoRA SFT on %s", cfg.data.task)
        train(cfg, resume=started)
    models.merge_adapter(cfg.model.name_or_path, run_dir / "adapter", merged)
    log.info("aligned model merged into %s", merged)
    return merged, seen


def _aligned_eval(bench: BenchConfig, table: dict[str, str], cfg, aligned: Path) -> Path:
    """Evaluate the aligned model itself with one table's eval settings (its calibration row)."""
    from .eval.run import evaluate

    out = Path(bench.output_dir) / "aligned-eval" / (_slug("__".join(table.values())) if table else "all")
    if not (out / "results.json").exists():
        cfg = copy.deepcopy(cfg)
        cfg.eval.adapter, cfg.eval.output_dir = None, str(out)
        evaluate(cfg)
    return out


def run_bench(path: str | Path, overrides: list[str] = (), quiet: bool = False) -> dict:
    from tqdm.auto import tqdm

    from .eval import report
    from .methods import method_configs

    bench, base, label, base_overrides = load_bench(path, list(overrides))
    if quiet:
        base_overrides += ["train.quiet=true", "eval.quiet=true"]
    registry = method_configs()
    cells = cells_of(bench)
    out = Path(bench.output_dir)
    aligned, align_data = align_stage(bench, base, label, registry)
    configs = {c.name: cell_config(c, base, label, base_overrides, registry, aligned, align_data) for c in cells}
    unused = [k for k, v in base.items() if k in registry and v not in (None, {})
              and all(c.train_method != k for c in cells)]
    if unused:
        raise DualSelectError(f"{label}: section '{unused[0]}' sets options of method '{unused[0]}', but no cell "
                              "of the grid trains it, so they would be ignored")
    for c in cells:
        check_cell_config(c, configs[c.name])
    write_atomic(out / MANIFEST, json.dumps({"config": str(path), "overrides": list(overrides),
                                             "cells": [{"name": c.name, "labels": c.labels, "overrides": c.overrides}
                                                       for c in cells]}, indent=2) + "\n")
    todo = [c for c in cells if not (c.path / DONE).exists()]
    durations = [_seconds(c.path / DONE) for c in cells if (c.path / DONE).exists()]
    log.info("bench %s: %d cells, %d done, %d to run", out, len(cells), len(cells) - len(todo), len(todo))
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), disable=quiet, desc="bench", unit="cell")
    for i, cell in enumerate(todo):
        if durations:
            eta = sum(durations) / len(durations) * (len(todo) - i)
            log.info("cell %s (%d left; about %.0f min to go at %.0f s per cell)", cell.name, len(todo) - i,
                     eta / 60, sum(durations) / len(durations))
        else:
            log.info("cell %s (%d left)", cell.name, len(todo) - i)
        done = run_cell(cell, configs[cell.name])
        durations.append(done["train_seconds"] + done["eval_seconds"])
        bar.update(1)
    bar.close()
    return write_bench_report(bench, cells, configs, aligned, report)


def _seconds(path: Path) -> float:
    d = json.loads(path.read_text())
    return d["train_seconds"] + d["eval_seconds"]


def tables_of(cells: list[Cell]) -> dict[str, list[Cell]]:
    tables: dict[str, list[Cell]] = {}
    for c in cells:
        key = ", ".join(f"{a}={v}" for a, v in c.table().items()) or "all"
        tables.setdefault(key, []).append(c)
    return tables


def write_bench_report(bench: BenchConfig, cells: list[Cell], configs: dict, aligned: Path | None, report) -> dict:
    out = Path(bench.output_dir)
    sections, written = [], {}
    for key, members in tables_of(cells).items():
        runs: dict[str, list[Path]] = {}
        if aligned is not None:
            runs[ALIGNED] = [_aligned_eval(bench, members[0].table(), configs[members[0].name], aligned)]
        for c in members:
            runs.setdefault(c.method, []).append(c.path / "eval")
        baseline = bench.baseline or ("sft" if "sft" in runs else next(iter(runs)))
        if baseline not in runs:
            raise DualSelectError(f"bench.baseline {baseline!r} is not a method of the grid ({', '.join(runs)})")
        rep = report.compare(runs, baseline=baseline, resamples=bench.resamples, permutations=bench.permutations)
        dest = out / "report" / _slug(key)
        written[key] = report.write_report(rep, dest)
        sections.append(f"## {key}\n\n{report.markdown(written[key]['report'])}")
    seconds = sum(_seconds(c.path / DONE) for c in cells)
    text = (f"# Bench {out}\n\n{len(cells)} cells; train + eval time of the cells {seconds / 60:.1f} min.\n\n"
            + "\n\n".join(sections))
    write_atomic(out / "report.md", text)
    return {"tables": written, "markdown": text, "path": out / "report.md",
            "cells": [json.loads((c.path / DONE).read_text()) for c in cells]}
