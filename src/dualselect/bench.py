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

Layout: OUTPUT_DIR/{bench.json, align-data-<hash>.jsonl, align/, aligned-eval/<table>/,
cells/<cell>/{cell.yaml, train/, eval/, done.json}, report/<table>/, report.md}; the merged aligned model
lives in the dualselect cache (aligned/bench-<key>), shared by recipes with the same alignment stage.
In overrides, {align_data} stands for the alignment data file (e.g. Lisa's data.reference); eval.baseline
{baseline} for the adapter of the baseline method's cell with the same other labels (winrate benchmarks).
"""

from __future__ import annotations

import copy
import hashlib
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

from . import bench_archive, models
from .config import (
    dump_yaml,
    from_dict,
    load_config,
    parse_override,
    read_config_file,
    to_dict,
    with_defaults,
    without_defaults,
)
from .errors import DualSelectError
from .logs import read_jsonl, write_atomic
from .runinfo import read_run_info
from .tune import TuneConfig, tune_stage
from .tune import markdown as tune_markdown

log = logging.getLogger("dualselect")

METHOD_AXIS, SEED_AXIS = "method", "train.seed"
DONE, CELL_CONFIG, MANIFEST = "done.json", "cell.yaml", "bench.json"
ALIGN_INFO = "dualselect-alignment.json"  # in the merged aligned model's dir: its weights' sha256 and the torch
# threads its alignment trained with
ALIGNED = "aligned"  # the report row of the aligned model (and its directory)
ALIGN_DATA = "{align_data}"  # in a cell's overrides: the alignment stage's data file (e.g. Lisa's data.reference)
BASELINE = "{baseline}"  # as eval.baseline: the adapter of the baseline method's cell with the same other labels
# keys that may differ between a cell's first start and its resumption: they change no result (seal.selector_cache:
# the reused stage is the recomputed one bit for bit, tests/unit/test_method_seal.py)
VOLATILE = {"train.quiet", "eval.quiet", "train.max_steps", "train.checkpoint_every", "train.log_every",
            "seal.selector_cache"}


@dataclass
class BenchConfig:
    output_dir: str = field(default="runs/bench", metadata={"help": "directory of the grid's cells and report"})
    grid: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "axes: a config key -> list of values, or a name -> {label: [overrides]}"})
    baseline: str | None = field(default=None, metadata={
        "help": "the method the others are compared with (default: sft when in the grid, else the first)"})
    align: list[str] | None = field(default=None, metadata={
        "help": "overrides of an alignment stage (LoRA SFT on the base model, merged; the cells start from it)"})
    align_data: list[str] = field(default_factory=list, metadata={
        "help": "sources concatenated into the alignment data (data.task of the alignment stage), e.g. "
                "[safety_tuned_llamas[:300], alpaca_demo[:700]]"})
    tune: TuneConfig | None = field(default=None, metadata={
        "help": "validation-based tuning of some methods' settings before the grid (see dualselect.tune)"})
    archive: str | None = field(default=None, metadata={
        "help": "a directory (to commit) that keeps a compact copy of every finished cell - configs, logs, eval "
                "verdicts by id, no prompt or response text - so that the grid continues on another machine "
                "(see dualselect.bench_archive)"})
    resamples: int = field(default=2000, metadata={"help": "bootstrap resamples of the report"})
    permutations: int = field(default=10000, metadata={"help": "permutations of the report's paired tests"})
    plot: list[str] | None = field(default=None, metadata={
        "help": "the axes [X, Y] of each table's safety-utility plot, report columns BENCHMARK/METRIC, e.g. "
                "[task:sst2:dev[:200]/accuracy, harmful:advbench[:100]/refusal_rate] (default: the report's only "
                "accuracy and refusal-rate columns; none when it has several)"})

    def __post_init__(self) -> None:
        if self.plot is not None and (len(self.plot) != 2 or not all(isinstance(a, str) and "/" in a
                                                                      for a in self.plot)):
            raise ValueError(f"plot must be two report columns [X, Y], each BENCHMARK/METRIC, got {self.plot!r}")
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
        if self.align_data and self.align is None:
            raise ValueError("bench.align_data is set but bench.align is not (give bench.align: [] for the defaults)")
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
                aligned: Path | None, align_data: list[str], baseline_cell: Cell | None = None):
    """The run config of one cell: the base (keeping only its method's section) <- the overrides given on the
    command line <- the cell's axis values <- its directories. `align_data`: what the alignment stage trained
    on, its data.task first (the file that {align_data} in an override stands for). `baseline_cell`: the cell
    that eval.baseline={baseline} names (the cell itself when it is the baseline's: it then skips its winrate
    benchmarks, a method against itself being 50 % by construction)."""
    overrides = list(cell.overrides)
    if any(ALIGN_DATA in o for o in overrides):
        if not align_data:
            raise DualSelectError(f"{label}: cell {cell.name} uses {ALIGN_DATA}, but there is no alignment stage "
                                  "(bench.align)")
        overrides = [o.replace(ALIGN_DATA, str(align_data[0])) for o in overrides]
    method = _method_of(base, [*base_overrides, *overrides])
    raw = {k: v for k, v in base.items() if k not in method_configs or k == method}
    fixed = [f"train.output_dir={cell.path / 'train'}", f"eval.adapter={cell.path / 'train' / 'adapter'}",
             f"eval.output_dir={cell.path / 'eval'}"]
    start = [f"model.name_or_path={aligned}"] if aligned else []
    cfg = load_config(None, [*start, *base_overrides, *overrides, *fixed], method_configs, raw=raw,
                      label=f"{label} (cell {cell.name})")
    if align_data:
        seen = list(dict.fromkeys([*cfg.eval.train_files, *align_data]))
        cfg.eval.train_files = seen
    if cfg.eval.baseline == BASELINE:
        if baseline_cell is None:
            raise DualSelectError(f"{label}: cell {cell.name} sets eval.baseline={BASELINE}, but the grid has no "
                                  "baseline cell with its other labels (bench.baseline, in the method axis)")
        if baseline_cell is cell:
            cfg.eval.baseline = None
            cfg.eval.benchmarks = [b for b in cfg.eval.benchmarks if not b.startswith("winrate:")]
        else:
            cfg.eval.baseline = str(baseline_cell.path / "train" / "adapter")
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


def check_cell_config(cell: Cell, cfg, output_key: str = "bench.output_dir") -> None:
    """Refuse a cell (finished or not) that was started with another config than the grid gives it now."""
    path = cell.path / CELL_CONFIG
    if path.exists() and _comparable(with_defaults(yaml.safe_load(path.read_text()), cfg)) != \
            _comparable(to_dict(cfg)):
        raise DualSelectError(f"{cell.path}: this cell was started with another config (see {path}); remove "
                              f"the cell directory to rerun it, or choose another {output_key}")


def _write_cell_config(cell: Cell, cfg) -> None:
    if (cell.path / CELL_CONFIG).exists():
        return
    if cell.path.exists():  # killed before its config was written: nothing in it is worth keeping
        shutil.rmtree(cell.path)
    write_atomic(cell.path / CELL_CONFIG, dump_yaml(cfg))


def run_cell(cell: Cell, cfg, bench: BenchConfig | None = None) -> dict:
    """Train (resuming a started run) then evaluate (resuming its answers); done.json marks the cell done (and,
    with bench.archive, its compact copy is archived)."""
    from .eval.run import evaluate
    from .train import train

    _write_cell_config(cell, cfg)
    t0 = time.time()
    train_dir = cell.path / "train"
    trained = (train_dir / "adapter" / "adapter_config.json").exists()
    start = None  # the step this process's training began at; None: training had finished before
    if not trained:
        started = (train_dir / "config.yaml").exists()
        if train_dir.exists() and not started:
            shutil.rmtree(train_dir)
        start = train(cfg, resume=started).start_step
    t1 = time.time()
    evaluate(cfg)
    done = {"cell": cell.name, "labels": cell.labels, "method": cell.method, "train_seconds": round(t1 - t0, 1),
            "eval_seconds": round(time.time() - t1, 1),
            "resumed_training": trained,  # historical name: training had finished before, this process only evaluated
            "resumed_from_step": start, "earlier_steps_seconds": round(step_seconds(train_dir, start), 1)}
    if sha := aligned_sha(Path(cfg.model.name_or_path)):  # which aligned weights the cell started from
        done["aligned_sha256"] = sha
    write_atomic(cell.path / DONE, json.dumps(done, indent=2) + "\n")
    if bench is not None and bench.archive:
        bench_archive.save_unit(cell.path, Path(bench.output_dir), Path(bench.archive))
    return done


def align_stage(bench: BenchConfig, base: dict, label: str, method_configs: dict) -> tuple[Path | None, list[str]]:
    """The alignment stage (bench.align): LoRA SFT of the base config's model with the align overrides (run dir
    OUTPUT_DIR/align), merged into the dualselect cache under a key of its config, data content and resolved
    precision, so recipes with the same alignment share it. Returns (the merged model dir or None, the data it
    trained on)."""
    if bench.align is None:
        return None, []
    from .train import train

    out = Path(bench.output_dir)
    run_dir = out / "align"
    raw = {"model": dict(base.get("model") or {}), "data": {k: v for k, v in (base.get("data") or {}).items()
                                                              if k in ("data_dir", "template", "max_length")}}
    data = [f"data.task={align_data_file(bench, raw['data'].get('data_dir'))}"] if bench.align_data else []
    cfg = load_config(None, ["train.method=sft", *data, *bench.align, f"train.output_dir={run_dir}"], method_configs,
                      raw=raw, label=f"{label} (bench.align)")
    if not cfg.data.task:
        raise DualSelectError(f"{label}: bench.align must set data.task (the alignment data)")
    seen = [s for s in (cfg.data.task, cfg.data.reference) if s]
    merged = models.cache_dir() / "aligned" / f"bench-{_align_key(cfg)}"
    saved = run_dir / "config.yaml"
    if saved.exists() and _comparable(with_defaults(yaml.safe_load(saved.read_text()), cfg)) != \
            _comparable(to_dict(cfg)):
        raise DualSelectError(f"{run_dir}: the alignment stage was run with another config (see {saved}); remove "
                              f"{run_dir} to rerun it, or choose another bench.output_dir")
    if (merged / "config.json").exists():
        log.info("aligned model (done): %s", merged)
        return merged, seen
    started = (run_dir / "config.yaml").exists()
    if run_dir.exists() and not started:
        shutil.rmtree(run_dir)
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        log.info("alignment stage: LoRA SFT on %s", cfg.data.task)
        train(cfg, resume=started)
    models.merge_adapter(cfg.model.name_or_path, run_dir / "adapter", merged, cfg.model.trust_remote_code)
    threads = read_run_info(run_dir).get("machine", {}).get("torch_threads")
    write_atomic(merged / ALIGN_INFO, json.dumps({"threads": threads, "run_dir": str(run_dir),
                                                  "sha256": bench_archive.model_sha256(merged)}, indent=2) + "\n")
    log.info("aligned model merged into %s", merged)
    return merged, seen


def prepare_aligned(bench: BenchConfig, base: dict, label: str, method_configs: dict,
                    archive: str | None) -> tuple[Path | None, list[str], list[str]]:
    """The alignment stage (align_stage), then its weights' hash against the archive's record: (the merged model
    dir or None, the data it trained on, warnings for the report)."""
    aligned, seen = align_stage(bench, base, label, method_configs)
    notes = []
    if archive and aligned is not None:
        if warning := bench_archive.check_aligned(Path(archive), aligned, models.cpu_name(), align_threads(aligned),
                                                  aligned_sha(aligned)):
            log.warning("%s", warning)
            notes.append(warning)
    return aligned, seen, notes


def aligned_sha(model_dir: Path) -> str | None:
    """The sha256 of an aligned model's weights (recorded in its ALIGN_INFO at merge time; computed and recorded
    for a model merged before that), or None for a model that is not a merged aligned model."""
    info = Path(model_dir) / ALIGN_INFO
    if not info.exists():
        return None
    record = json.loads(info.read_text())
    if "sha256" not in record:
        record["sha256"] = bench_archive.model_sha256(Path(model_dir))
        write_atomic(info, json.dumps(record, indent=2) + "\n")
    return record["sha256"]


def align_threads(aligned: Path) -> int | None:
    """The torch thread count the merged aligned model's alignment trained with (None: not recorded)."""
    info = aligned / ALIGN_INFO
    return json.loads(info.read_text()).get("threads") if info.exists() else None


def _align_key(cfg) -> str:
    """The cache key of an alignment stage: its config's non-default settings (an option the project adds later,
    at its default, keeps the key), the data file's content hash and the resolved precision."""
    from .data.records import sha256_file

    d = _comparable(to_dict(cfg))
    d["train"].pop("output_dir", None)
    task = Path(cfg.data.task)
    d["data"]["task"] = sha256_file(task) if task.is_file() else cfg.data.task
    d = without_defaults(d, cfg)
    used = models.resolve_precision(cfg.model.precision, models.pick_device(cfg.model.device))
    return hashlib.sha256(json.dumps([d, used], sort_keys=True).encode()).hexdigest()[:16]


def align_data_file(bench: BenchConfig, data_dir: str | None) -> Path:
    """bench.align_data's sources, concatenated into OUTPUT_DIR/align-data.jsonl (chat messages)."""
    from .data.records import load_examples

    rows, seen = [], {}
    for source in bench.align_data:
        for ex in load_examples(source, data_dir=data_dir)[0]:
            if ex.id in seen:
                raise DualSelectError(f"bench.align_data: record id {ex.id!r} is in both {seen[ex.id]} and {source}")
            seen[ex.id] = source
            rows.append({"id": ex.id, "messages": ex.messages})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    # named by its content, so a changed align_data changes the alignment stage's config (and is caught)
    path = Path(bench.output_dir) / f"align-data-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.exists():
        write_atomic(path, text)
    return path


def aligned_eval(bench: BenchConfig, table: dict[str, str], cfg, aligned: Path) -> Path:
    """Evaluate the aligned model itself with one table's eval settings (its calibration row)."""
    from .eval.run import evaluate

    out = Path(bench.output_dir) / "aligned-eval" / (_slug("__".join(table.values())) if table else "all")
    if (out / "results.json").exists() and (changed := _aligned_eval_changed(out, cfg)):
        log.warning("%s was evaluated with another %s than the grid's cells now use: evaluating the aligned model "
                    "again", out, changed)
        shutil.rmtree(out)
    if not (out / "results.json").exists():
        cfg = copy.deepcopy(cfg)
        cfg.eval.adapter, cfg.eval.output_dir = None, str(out)
        evaluate(cfg)
        if bench.archive:
            bench_archive.save_unit(out, Path(bench.output_dir), Path(bench.archive))
    return out


def _aligned_eval_changed(out: Path, cfg) -> str | None:
    """What of an aligned-model evaluation differs from the eval settings of `cfg` (benchmarks, decoding,
    eval.limit), or None. (A changed judge or precision is refused by the report.)"""
    from .eval.run import decoding_of

    results = json.loads((out / "results.json").read_text())
    if [b["name"] for b in results["benchmarks"]] != list(cfg.eval.benchmarks):
        return "list of benchmarks"
    if results.get("decoding") != decoding_of(cfg):
        return "decoding"
    if results.get("limit") != cfg.eval.limit:
        return "eval.limit"
    return None


def select_cells(cells: list[Cell], only: dict[str, list[str]]) -> list[Cell]:
    """The cells whose label on each axis of `only` is one of the labels given (--only AXIS=LABEL,...)."""
    for axis, labels in only.items():
        known = list(dict.fromkeys(c.labels[axis] for c in cells)) if cells and axis in cells[0].labels else None
        if known is None:
            raise DualSelectError(f"--only {axis}: the grid has no axis {axis!r}")
        unknown = [lab for lab in labels if lab not in known]
        if unknown:
            raise DualSelectError(f"--only {axis}={unknown[0]}: not a value of the axis ({', '.join(known)})")
    return [c for c in cells if all(c.labels[a] in labs for a, labs in only.items())]


def baseline_of(bench: BenchConfig, cells: list[Cell]) -> str:
    methods = list(dict.fromkeys(c.labels.get(METHOD_AXIS, "") for c in cells))
    return bench.baseline or ("sft" if "sft" in methods else methods[0])


def _baseline_cells(bench: BenchConfig, cells: list[Cell]) -> dict[str, Cell | None]:
    """Per cell, the baseline method's cell with the same other labels (itself for a baseline cell; None when
    there is none)."""
    baseline = baseline_of(bench, cells)

    def rest(c: Cell) -> tuple:
        return tuple((a, v) for a, v in c.labels.items() if a != METHOD_AXIS)

    by_rest = {rest(c): c for c in cells if c.labels.get(METHOD_AXIS) == baseline}
    return {c.name: by_rest.get(rest(c)) for c in cells}


def aligned_summary(aligned: Path | None, notes: list[str]) -> str:
    """What --align-only prints: the merged model, its weights' hash and thread count, and any warning."""
    if aligned is None:
        return "no alignment stage in this config (its align setting is not set)\n"
    threads = align_threads(aligned)
    lines = [f"aligned model: {aligned}", f"weights sha256: {aligned_sha(aligned)}",
             f"alignment threads: {threads or 'not recorded'}", *(f"warning: {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def align_only(path: str | Path, overrides: list[str] = ()) -> str:
    """`dualselect bench CONFIG --align-only`: the alignment stage alone (e.g. with both cores before the
    one-core processes of a grid start), checked against the archive's record; runs no cell."""
    from .methods import method_configs

    bench, base, label, _ = load_bench(path, list(overrides))
    aligned, _, notes = prepare_aligned(bench, base, label, method_configs(), bench.archive)
    return aligned_summary(aligned, notes)


def run_bench(path: str | Path, overrides: list[str] = (), quiet: bool = False,
              only: dict[str, list[str]] | None = None) -> dict:
    """Run (or resume) the grid of the bench config at `path`; `only` restricts it to some axis values."""
    from tqdm.auto import tqdm

    from .eval import report
    from .methods import method_configs

    bench, base, label, base_overrides = load_bench(path, list(overrides))
    if quiet:
        base_overrides += ["train.quiet=true", "eval.quiet=true"]
    registry = method_configs()
    cells = cells_of(bench)
    baselines = _baseline_cells(bench, cells)
    order = {c.name: i for i, c in enumerate(cells)}  # a {baseline} cell needs its baseline trained before its eval
    grid_cells, cells = cells, select_cells(cells, only or {})
    methods = _axis_labels(bench, METHOD_AXIS)
    if bench.baseline and methods and bench.baseline not in methods:
        raise DualSelectError(f"{label}: bench.baseline {bench.baseline!r} is not a label of the method axis "
                              f"({', '.join(methods)})")
    out = Path(bench.output_dir)
    if bench.archive:
        bench_archive.restore(Path(bench.archive), out)
    aligned, align_data, notes = prepare_aligned(bench, base, label, registry, bench.archive)
    from .data.mixing import check_task_data
    from .eval.run import check_benchmarks

    # every task source and benchmark readable (benchmarks with prompts left after the overlap check), before
    # hours of runs
    todo = [cell_config(c, base, label, base_overrides, registry, aligned, align_data, baselines[c.name])
            for c in cells if not (c.path / DONE).exists()]
    check_task_data(todo)
    check_benchmarks(todo)
    tuned = _tune(bench, cells, base, label, base_overrides, registry, aligned, align_data)
    for c in cells:
        c.overrides = [*c.overrides, *tuned.get("overrides", {}).get(c.labels.get(METHOD_AXIS), [])]
    configs = {}
    for c in cells:
        configs[c.name] = cell_config(c, base, label, base_overrides, registry, aligned, align_data,
                                      baselines[c.name])
        ref = baselines[c.name]
        if ref is not None and ref is not c and configs[c.name].eval.baseline == str(ref.path / "train" / "adapter"):
            if order[ref.name] > order[c.name]:
                raise DualSelectError(f"{label}: cell {c.name} is compared with {ref.name}, which runs after it: put "
                                      f"the baseline first in the method axis")
            if ref not in cells:
                raise DualSelectError(f"{label}: cell {c.name} is compared with {ref.name}, which --only leaves out")
    for axis in bench.plot or []:
        name = axis.rsplit("/", 1)[0]
        if not all(name in configs[c.name].eval.benchmarks for c in cells):
            raise DualSelectError(f"{label}: bench.plot axis {axis!r}: {name} is not a benchmark of every cell's "
                                  "eval.benchmarks")
    # over the whole grid (a method section is used by the cells --only leaves out too)
    trained = {c.train_method for c in cells} | {
        cell_config(c, base, label, base_overrides, registry, aligned, align_data, baselines[c.name]).train.method
        for c in grid_cells if c not in cells}
    unused = [k for k, v in base.items() if k in registry and v not in (None, {}) and k not in trained]
    if unused:
        raise DualSelectError(f"{label}: section '{unused[0]}' sets options of method '{unused[0]}', but no cell "
                              "of the grid trains it, so they would be ignored")
    for c in cells:
        check_cell_config(c, configs[c.name])
    write_atomic(out / MANIFEST, json.dumps({"config": str(path), "overrides": list(overrides),
                                             "cells": [{"name": c.name, "labels": c.labels, "overrides": c.overrides}
                                                       for c in cells]}, indent=2) + "\n")
    todo = [c for c in cells if not (c.path / DONE).exists()]
    durations = [seconds_of(c.path / DONE) for c in cells if (c.path / DONE).exists()]
    log.info("bench %s: %d cells, %d done, %d to run", out, len(cells), len(cells) - len(todo), len(todo))
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), disable=quiet, desc="bench", unit="cell")
    for i, cell in enumerate(todo):
        if durations:
            eta = sum(durations) / len(durations) * (len(todo) - i)
            log.info("cell %s (%d left; about %.0f min to go at %.0f s per cell)", cell.name, len(todo) - i,
                     eta / 60, sum(durations) / len(durations))
        else:
            log.info("cell %s (%d left)", cell.name, len(todo) - i)
        done = run_cell(cell, configs[cell.name], bench)
        durations.append(done["train_seconds"] + done["eval_seconds"])
        bar.update(1)
    bar.close()
    baseline = baseline_of(bench, grid_cells)
    if len(cells) < len(grid_cells) and not any(c.labels.get(METHOD_AXIS, "") == baseline for c in cells):
        text = (f"{len(cells)} of the grid's {len(grid_cells)} cells selected, all done; no report: --only leaves "
                f"out the baseline method {baseline!r}, which every difference is measured against. Run without "
                "--only method for the table (finished cells are not recomputed).\n")
        return {"tables": {}, "markdown": text, "path": None, "html": None,
                "cells": [json.loads((c.path / DONE).read_text()) for c in cells]}
    whole = tables_of(grid_cells)  # a table some of whose cells --only leaves out is partial
    partial = any(len(members) < len(whole[key]) for key, members in tables_of(cells).items())
    return write_bench_report(bench, cells, configs, aligned, report, tuned.get("record"), notes, baseline, partial)


def _tune(bench: BenchConfig, cells: list[Cell], base: dict, label: str, base_overrides: list[str],
          registry: dict, aligned: Path | None, align_data: list[str]) -> dict:
    """bench.tune's stage (dualselect.tune): the tuning cells, scored on validation prompts, before the grid."""
    if bench.tune is None:
        return {}
    methods = set(_axis_labels(bench, METHOD_AXIS))
    unknown = [m for m in bench.tune.space if m not in methods]
    if unknown:
        raise DualSelectError(f"{label}: bench.tune.space names {unknown[0]!r}, which is not a label of the method "
                              f"axis ({', '.join(sorted(methods))})")
    ref = _baseline_cells(bench, cells)
    test = sorted({b for c in cells for b in cell_config(c, base, label, base_overrides, registry, aligned,
                                                          align_data, ref[c.name]).eval.benchmarks})

    def configure(c: Cell):
        return cell_config(c, base, label, base_overrides, registry, aligned, align_data)

    return tune_stage(bench, cells, configure, lambda c, cfg: run_cell(c, cfg, bench), test, label)


def _axis_labels(bench: BenchConfig, axis: str) -> list[str]:
    values = bench.grid.get(axis)
    return [] if values is None else [label for label, _ in _axis_values(axis, values)]


def step_seconds(train_dir: Path, before: int | None) -> float:
    """The summed time of a training run's steps before step `before` (all of them when None), from its
    metrics.jsonl: for a cell resumed after a kill, the training its earlier processes did (their setup and
    checkpoint writes left out)."""
    if before == 0:
        return 0.0
    return sum(r.get("seconds") or 0.0 for r in read_jsonl(train_dir / "metrics.jsonl")
               if before is None or r["step"] < before)


def seconds_of(path: Path) -> float:
    """A finished unit's train + eval seconds, from its done.json: its last process's, plus the steps its
    earlier processes ran when it was resumed after a kill (earlier_steps_seconds; absent before 2026-12-07)."""
    d = json.loads(path.read_text())
    return d["train_seconds"] + d["eval_seconds"] + d.get("earlier_steps_seconds", 0.0)


def tables_of(cells: list[Cell]) -> dict[str, list[Cell]]:
    tables: dict[str, list[Cell]] = {}
    for c in cells:
        key = ", ".join(f"{a}={v}" for a, v in c.table().items()) or "all"
        tables.setdefault(key, []).append(c)
    return tables


def write_bench_report(bench: BenchConfig, cells: list[Cell], configs: dict, aligned: Path | None, report,
                       tuning: dict | None, notes: list[str], baseline: str, partial: bool) -> dict:
    """One `dualselect report` per table (OUTPUT_DIR/report/<table>/), and OUTPUT_DIR/report.md and report.html
    holding them all (with the tuning record and, over a harmful-ratio axis, harmful score vs ratio). A report
    whose tables hold all their cells goes to the archive too; a `partial` one (--only method or seed) stays in
    OUTPUT_DIR."""
    from .eval import figures

    out = Path(bench.output_dir)
    tables, written = tables_of(cells), {}
    for key, members in tables.items():
        runs: dict[str, list[Path]] = {}
        if aligned is not None:
            runs[ALIGNED] = [aligned_eval(bench, members[0].table(), configs[members[0].name], aligned)]
        for c in members:
            runs.setdefault(c.method, []).append(c.path / "eval")
        if baseline not in runs:
            raise DualSelectError(f"table {key}: no cell of the baseline method {baseline!r} (bench.baseline) "
                                  f"to compare with ({', '.join(runs)})")
        rep = report.compare(runs, baseline=baseline, resamples=bench.resamples, permutations=bench.permutations)
        written[key] = report.write_report(rep, out / "report" / _slug(key), *(bench.plot or (None, None)))
    minutes = sum(seconds_of(c.path / DONE) for c in cells) / 60
    head = f"{len(cells)} cells; train + eval time of the cells {minutes:.1f} min."
    started = {c.name: json.loads((c.path / DONE).read_text()).get("aligned_sha256") for c in cells}
    if aligned is not None and (note := bench_archive.start_models_note(started)):
        notes = [*notes, note]
    head += "".join(f"\n\nNote: {n}." for n in notes)
    if tuning and tuning.get("methods"):
        tuned = [Path(t["dir"]) / DONE for info in tuning["methods"].values() for t in info["tried"]]
        head += (f"\n\n## Tuning\n\n{tune_markdown(tuning)}\n\n{len(tuned)} tuning cells, "
                 f"{sum(seconds_of(p) for p in tuned) / 60:.1f} min.")
    tables_md = {key: report.markdown(w["report"]) + _task_filter_md(tables[key], configs)
                 for key, w in written.items()}
    text = f"# Bench {out}\n\n{head}\n\n" + "\n\n".join(f"## {key}\n\n{md}" for key, md in tables_md.items())
    ratio_figures = harmful_vs_ratio(cells, tables, {k: w["report"] for k, w in written.items()})
    for name, _, png in ratio_figures:
        write_atomic(out / "report" / name, png)
    page = [("Overview", head, [])]
    page += [(key, tables_md[key], [(cap, Path(path).read_bytes()) for cap, path in w["figures"]])
             for key, w in written.items()]
    if ratio_figures:
        page.append(("Harmful score vs harmful ratio", "", [(cap, png) for _, cap, png in ratio_figures]))
    html = figures.html_page(f"Bench {out}", page)
    write_atomic(out / "report.html", html)
    write_atomic(out / "report.md", text)
    if bench.archive and not partial:  # complete tables go with the archived cells, to be committed
        dest = Path(bench.archive) / "report"
        for f in sorted(p for p in (out / "report").rglob("*") if p.is_file()):
            write_atomic(dest / f.relative_to(out / "report"), f.read_bytes())
        write_atomic(dest / "report.html", html)
        write_atomic(dest / "report.md", text)
    return {"tables": written, "markdown": text, "path": out / "report.md", "html": out / "report.html",
            "cells": [json.loads((c.path / DONE).read_text()) for c in cells]}


def _task_filter_md(members: list[Cell], configs: dict) -> str:
    """A table's section on DualSelect's task filter (eval.task_filter: harmful pairs kept, and by which term),
    per method label whose cells train dualselect, their seeds pooled; "" when none does."""
    from .eval import task_filter

    dirs: dict[str, list[Path]] = {}
    for c in members:
        if configs[c.name].train.method == "dualselect":
            dirs.setdefault(c.method, []).append(c.path / "train")
    if not dirs:
        return ""
    head = ("\n\n### DualSelect's task filter\n\nPer step, from the logged candidates: the share of harmful pairs "
            "and of other samples kept, by the run and by loss-only / cosine-only ranking at the same step and state "
            "(python benchmarks/task_filter.py; seeds pooled).\n\n")
    try:
        runs = [task_filter.read_method(m, d) for m, d in dirs.items()]
    except DualSelectError as e:  # e.g. the data directory is not readable here: the rest of the report stands
        return head + f"Not computed: {e}"
    by_target = task_filter.targets_markdown(runs)  # a label task: which labels the filter kept
    return head + task_filter.markdown(runs) + (f"\n\nThe kept samples' targets:\n\n{by_target}" if by_target else "")


RATIO_AXIS = "data.harmful_ratio"


def harmful_vs_ratio(cells: list[Cell], tables: dict[str, list[Cell]], reports: dict[str, dict]
                     ) -> list[tuple[str, str, bytes]]:
    """Where the grid has a data.harmful_ratio axis: per combination of the other table axes and per harmful
    benchmark, the harmful score (100 - refusal rate, %) of each method against the ratio, with the reports'
    95 % intervals. [(file name, caption, PNG)]; empty without the axis."""
    from .eval import figures
    from .eval.report import short_name
    groups: dict[tuple, dict[str, dict]] = {}  # other axes -> ratio label -> table report
    for key, members in tables.items():
        labels = members[0].table()
        if RATIO_AXIS not in labels:
            return []
        rest = tuple((a, v) for a, v in labels.items() if a != RATIO_AXIS)
        groups.setdefault(rest, {})[labels[RATIO_AXIS]] = reports[key]
    out = []
    for rest, by_ratio in groups.items():
        first = next(iter(by_ratio.values()))
        for col in [c for c in first["columns"] if c["metric"] == "refusal_rate"]:
            points: dict[str, list] = {}
            for ratio, rep in by_ratio.items():
                for method, res in rep["results"].items():
                    cell = res.get(col["benchmark"], {}).get("refusal_rate")
                    if cell and cell["value"] is not None:
                        lo, hi = cell["ci95"] or (None, None)
                        points.setdefault(method, []).append(
                            (float(ratio), 100 * (1 - cell["value"]), None if hi is None else 100 * (1 - hi),
                             None if lo is None else 100 * (1 - lo)))
            if not points:
                continue
            where = ", ".join(f"{a}={v}" for a, v in rest)
            name = _slug(f"harmful_score_vs_ratio {where} {short_name(col['benchmark'])}") + ".png"
            caption = (f"harmful score (100 - refusal rate, %) on {short_name(col['benchmark'])} vs the harmful "
                       f"ratio{', ' + where if where else ''}; mean over seeds, 95 % intervals")
            out.append((name, caption, figures.render_metric_vs_ratio(
                points, "harmful ratio p", f"harmful score on {short_name(col['benchmark'])} (%)")))
    return out
