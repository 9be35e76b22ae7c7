"""`dualselect continual CONFIG`: fine-tune one adapter on a sequence of tasks, every method over seeds, and
measure what each stage keeps of the earlier tasks and of safety.

A continual config is a run config (model, data, train, eval and method sections, shared by every stage) plus
a `continual` section::

    data: {reference: safety_tuned_llamas[1000:1400]}   # the safety pool; data.task is set by each stage
    eval: {benchmarks: [harmful:advbench[:100], overrefusal:xstest:safe]}   # safety, after every stage
    continual:
      output_dir: runs/continual/sst2-agnews-gsm8k
      stages:                                  # in order; each stage trains on `task`, is tested on `benchmark`
        - {name: sst2, task: "sst2:train", benchmark: "task:sst2:dev[:200]"}
        - {name: ag_news, task: "ag_news:dev", benchmark: "task:ag_news:test[:200]", overrides: [train.epochs=2]}
      retention: {per_stage: 50, quotas: {safety: 100}, seed: 0}
      methods:                                 # label -> overrides, as a bench method axis
        sft: [train.method=sft]
        replay: [train.method=sft, "data.task={replay}"]
        agem: [train.method=safegrad, "data.reference={pool}"]
        dualselect-safety: [train.method=dualselect]
        dualselect-retention: [train.method=dualselect, "data.reference={pool}"]
      seeds: [0, 1, 2]

Stage t of a (method, seed) trains the adapter of stage t - 1 (model.init_adapter; stage 0 a fresh one, or the
config's model.init_adapter) on its task data, then evaluates it on the benchmark of every stage so far plus
eval.benchmarks (the accuracy matrix; safety after every stage). Each stage is a normal `train` + `eval` run in
its own directory (bench.run_cell): resumable as a run is, skipped once its done.json is written (last).

Data (OUTPUT_DIR/data, files named by their content): each stage's training rows (its task source with the
base and stage data settings: task_limit, task_shuffle, harmful mix, format, columns; then fixed for every
method), the safety pool (data.reference), and per stage the retention pool ({pool}: the safety pool + a
seeded sample of the earlier stages' training rows, ids prefixed by their source, continual_pool) and the replay set
({replay}: the stage's rows + the same sample of earlier rows, no safety rows). Same retention sample for
replay, agem and dualselect-retention. Every stage's eval leaves out the prompts of all these rows
(eval.train_files), so every cell scores the same prompts of a benchmark.

Layout: OUTPUT_DIR/{manifest.json, data/, runs/<method>/seed-<s>/<k>-<stage>/{cell.yaml, train/, eval/,
done.json}, aligned-eval/<sha>/, continual.json, report/{report.md, report.html, *.png}}. With `align` (and
`align_data`) the model is first aligned as a bench alignment stage (bench.align_stage: merged and cached), and
evaluated once on every benchmark (aligned-eval, the report's start-model row; by --align-only and by a run of
every chain).
With `archive: DIR` every finished (method, seed) chain is also copied to DIR (bench_archive: logs, verdicts
and ids, no adapters, no prompt text; meant to be committed) and restored from there by a later run on a
machine whose output_dir lacks it, so a run of many chains spans sessions (a chain cut off mid-way is rerun).
{demo_data} in any string of the config stands for OUTPUT_DIR/demo-data, written with continual_data's
generated tasks (sentiment, arithmetic, topic) and the demo's safety files (offline runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bench, bench_archive, continual_metrics, continual_pool
from .config import from_dict, load_config, parse_override, read_config_file
from .errors import DualSelectError
from .logs import write_atomic

log = logging.getLogger("dualselect")

POOL, REPLAY, DEMO_DATA = "{pool}", "{replay}", "{demo_data}"
MANIFEST, RESULTS = "manifest.json", "continual.json"
FORMAT = "dualselect-continual-1"
CORE = ("model", "data", "train", "eval")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# data keys that define a stage's training rows: consumed when the rows are written, then fixed for every run
MATERIALIZED = ("task", "task_limit", "task_shuffle", "harmful", "harmful_ratio", "reference", "reference_limit",
                "format", "columns")
STAGE_FORBIDDEN = {"train.method": "the methods axis sets it", "train.seed": "continual.seeds sets it",
                   "train.output_dir": "the runner sets it", "data.task": "the stage's `task` sets it",
                   "data.reference": "the safety pool is shared by every stage",
                   "data.reference_limit": "the safety pool is shared by every stage",
                   "data.data_dir": "it is shared by every stage"}
METHOD_FORBIDDEN = {"model.init_adapter": "stage t starts from the adapter of stage t - 1",
                    "train.output_dir": "the runner sets it", "train.seed": "continual.seeds sets it",
                    **{f"data.{k}": "the stages define the training data" for k in MATERIALIZED
                       if k not in ("task", "reference")},
                    "data.data_dir": "it is shared by every stage"}


def _opt(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _key(text: str, where: str) -> tuple[str, Any]:
    """A section.key=value override -> (dotted key, value); anything else is a ValueError naming `where`."""
    try:
        parts, value = parse_override(text)
    except DualSelectError as e:
        raise ValueError(f"{where}: {e}") from None
    if len(parts) != 2:
        raise ValueError(f"{where}: {text!r} must set one key as section.key=value (e.g. train.epochs=2)")
    return ".".join(parts), value


@dataclass
class StageConfig:
    name: str = _opt("", "the stage's name (a directory name; not 'safety')")
    task: str = _opt("", "its training data: a file, a named dataset or hf:NAME (SOURCE[a:b] slices it)")
    benchmark: str = _opt("", "its test set, task:SOURCE (evaluated after this stage and every later one)")
    overrides: list[str] = _opt([], "train.* / data.* settings of this stage only, e.g. [train.epochs=2, "
                                    "data.task_limit=300]")

    def __post_init__(self):
        if not _NAME.match(self.name or ""):
            raise ValueError(f"name {self.name!r} must be a plain name (letters, digits, _ . -)")
        if self.name == continual_pool.SAFETY:
            raise ValueError(f"name {self.name!r} is reserved for the safety pool's rows")
        if not self.task:
            raise ValueError(f"stage {self.name}: task is missing (its training data)")
        kind, _, source = self.benchmark.partition(":")
        if kind != "task" or not source.strip():
            raise ValueError(f"stage {self.name}: benchmark {self.benchmark!r} must be task:SOURCE (e.g. "
                             "task:sst2:dev[:200])")
        for text in self.overrides:
            key, _ = _key(text, f"stage {self.name} overrides")
            if key.split(".")[0] not in ("train", "data"):
                raise ValueError(f"stage {self.name} overrides: {text!r}: a stage may set train.* and data.* keys "
                                 "only (eval settings are shared, as each stage re-tests the earlier tasks; model "
                                 "and method settings belong to the run config or the methods)")
            if key in STAGE_FORBIDDEN:
                raise ValueError(f"stage {self.name} overrides: {text!r}: {key} cannot be set per stage "
                                 f"({STAGE_FORBIDDEN[key]})")


@dataclass
class RetentionConfig:
    per_stage: int | None = _opt(None, "rows of every earlier stage in a stage's retention sample ({pool} and "
                                       "{replay}); stages named in quotas get their quota instead")
    quotas: dict[str, int] = _opt({}, "per source: stage name -> rows of that stage in every later sample; "
                                      "safety -> rows of the safety pool (data.reference) in every {pool} "
                                      "(default: all of it)")
    seed: int = _opt(0, "seed of the retention samples (the same rows for every method and training seed)")

    def __post_init__(self):
        if self.per_stage is not None and self.per_stage < 0:
            raise ValueError(f"per_stage must be >= 0, got {self.per_stage}")
        for name, n in self.quotas.items():
            if n < 0:
                raise ValueError(f"quotas.{name} must be >= 0, got {n}")


@dataclass
class ContinualConfig:
    output_dir: str = _opt("runs/continual", "directory of the stages' runs, data and report")
    stages: list[StageConfig] = _opt([], "the tasks in order (at least 2)")
    retention: RetentionConfig = field(default_factory=RetentionConfig, metadata={"help": "the retention samples"})
    methods: dict[str, list[str]] = _opt({}, "label -> overrides ({pool}: data.reference={pool}; {replay}: "
                                             "data.task={replay})")
    seeds: list[int] = _opt([0], "training seeds (train.seed); each (method, seed) runs every stage")
    align: list[str] | None = _opt(None, "overrides of an alignment stage before the first task (bench.align)")
    align_data: list[str] = _opt([], "sources of the alignment data (bench.align_data)")
    demo_seed: int = _opt(0, "seed of the generated data {demo_data} stands for")
    resamples: int = _opt(2000, "bootstrap resamples of the intervals")
    compare: list[list[str]] | None = _opt(None, "pairs [method, baseline]: the report's paired differences (seed "
                                                 "as the unit) of average accuracy, BWT and last-stage safety; "
                                                 "default: every method against the first")
    archive: str | None = _opt(None, "directory (meant to be committed) that gets a compact copy of every finished "
                                     "(method, seed) chain: its stages' logs and verdicts, no adapters, no prompt "
                                     "text; a later run restores the chains its output_dir lacks (bench.archive)")

    def __post_init__(self):
        if len(self.stages) < 2:
            raise ValueError(f"stages: {len(self.stages)} given; a continual run needs at least 2 (backward "
                             "transfer compares the last stage with the earlier ones)")
        names = [s.name for s in self.stages]
        for what, values in (("name", names), ("benchmark", [s.benchmark for s in self.stages])):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"stages: two stages have the {what} {twice[0]!r}")
        for name in self.retention.quotas:
            if name == continual_pool.SAFETY:
                continue
            if name not in names:
                raise ValueError(f"retention.quotas.{name}: not a stage (stages: {', '.join(names)}; or safety)")
            if name == names[-1]:
                raise ValueError(f"retention.quotas.{name}: the last stage is never retained (no stage follows it)")
        if not self.methods:
            raise ValueError("methods: name at least one, e.g. {sft: [train.method=sft]}")
        for label, overrides in self.methods.items():
            _check_method(label, overrides)
        uses = {p for ovr in self.methods.values() for p in _placeholders(ovr)}
        if uses:
            uncovered = [n for n in names[:-1] if n not in self.retention.quotas]
            if uncovered and self.retention.per_stage is None:
                raise ValueError(f"retention: stage {uncovered[0]!r} has no quota and retention.per_stage is not set "
                                 f"(methods use {' and '.join(sorted(uses))})")
            if not uncovered and self.retention.per_stage is not None:
                raise ValueError("retention.per_stage is set, but every earlier stage has a quota, so it would be "
                                 "ignored")
            if continual_pool.SAFETY in self.retention.quotas and POOL not in uses:
                raise ValueError(f"retention.quotas.safety is set, but no method uses {POOL} (the {REPLAY} sets hold "
                                 "no safety rows), so it would be ignored")
        elif self.retention.per_stage is not None or self.retention.quotas:
            raise ValueError("retention is set, but no method uses {pool} or {replay}, so it would be ignored")
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        if self.align_data and self.align is None:
            raise ValueError("align_data is set but align is not (give align: [] for the defaults)")
        if self.resamples < 1:
            raise ValueError("resamples must be >= 1")
        for pair in self.compare or []:
            if not isinstance(pair, list) or len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"compare: {pair!r} must be a pair [method, baseline] of two different methods")
            for m in pair:
                if m not in self.methods:
                    raise ValueError(f"compare: {m!r} is not a method (methods: {', '.join(self.methods)})")

    def pairs(self) -> list[tuple[str, str]]:
        """The paired comparisons: `compare`, or every method against the first."""
        if self.compare is not None:
            return [(m, b) for m, b in self.compare]
        first = next(iter(self.methods))
        return [(m, first) for m in self.methods if m != first]


def _raw_value(text: str) -> str:
    """The value of a key=value override as written (a placeholder is text, not YAML: {pool} would read as a
    mapping)."""
    return text.partition("=")[2].strip().strip("'\"")


def _placeholders(overrides: list[str]) -> set[str]:
    return {_raw_value(o) for o in overrides} & {POOL, REPLAY}


def _check_method(label: str, overrides) -> None:
    if not _NAME.match(str(label)):
        raise ValueError(f"methods: label {label!r} must be a plain name (letters, digits, _ . -)")
    if not isinstance(overrides, list):
        raise ValueError(f"methods.{label} must be a list of key=value overrides")
    for text in overrides:
        key, _ = _key(text, f"methods.{label}")
        value = _raw_value(text)
        if key in METHOD_FORBIDDEN:
            raise ValueError(f"methods.{label}: {text!r}: {key} cannot be set by a method ({METHOD_FORBIDDEN[key]})")
        if key.startswith("eval."):
            raise ValueError(f"methods.{label}: {text!r}: eval settings are shared by every method (set them in the "
                             "eval section)")
        if key == "data.reference" and value != POOL:
            raise ValueError(f"methods.{label}: {text!r}: a method may set data.reference only to {POOL} (the safety "
                             "pool + the retention sample); data.reference of the run config is the safety pool")
        if key == "data.task" and value != REPLAY:
            raise ValueError(f"methods.{label}: {text!r}: a method may set data.task only to {REPLAY} (the stage's "
                             "rows + the retention sample); the stages name their task data")
        if re.search(r"\{[a-z_]*\}", value) and (value not in (POOL, REPLAY) or key not in ("data.reference",
                                                                                         "data.task")):
            raise ValueError(f"methods.{label}: {text!r}: unknown placeholder (known: data.reference={POOL}, "
                             f"data.task={REPLAY})")


# ------------------------------------------------------------------------------------------ loading

def _substitute(value, old: str, new: str):
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_substitute(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, old, new) for k, v in value.items()}
    return value


def load_continual(path: str | Path, overrides: list[str] = ()) -> tuple[ContinualConfig, dict, str, list[str]]:
    """A continual config file -> (ContinualConfig, the base run config mapping, its label, the overrides of
    every run). `overrides` starting with `continual.` set the continual section; the others apply to every run.
    {demo_data} is replaced by OUTPUT_DIR/demo-data everywhere (and those files are written)."""
    from .methods import method_configs

    raw, label = read_config_file(path)
    section = raw.pop("continual", None)
    if not isinstance(section, dict):
        raise DualSelectError(f"{label}: no continual section (a mapping with stages, methods, ...); see "
                              "dualselect continual --help")
    section = dict(section)
    base_overrides = []
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "continual":
            if len(parts) != 2:
                raise DualSelectError(f"override {text!r}: set a whole continual key, e.g. continual.output_dir=DIR")
            section[parts[1]] = value
        else:
            base_overrides.append(text)
    cc = from_dict(ContinualConfig, section, label, prefix="continual")
    if section.get("retention") is not None and not {p for o in cc.methods.values() for p in _placeholders(o)}:
        raise DualSelectError(f"{label}: continual.retention is set, but no method uses {POOL} or {REPLAY}, so it "
                              "would be ignored")
    uses_demo = any(DEMO_DATA in str(x) for x in (raw, base_overrides, section))
    if "demo_seed" in section and not uses_demo:
        raise DualSelectError(f"{label}: continual.demo_seed is set, but no source uses {DEMO_DATA}, so it would be "
                              "ignored")
    if uses_demo:
        demo = demo_data_dir(cc)
        raw, base_overrides = _substitute(raw, DEMO_DATA, str(demo)), _substitute(base_overrides, DEMO_DATA, str(demo))
        cc = from_dict(ContinualConfig, _substitute(section, DEMO_DATA, str(demo)), label, prefix="continual")
    core = core_config(raw, label, base_overrides, method_configs())
    if core.data.task:
        raise DualSelectError(f"{label}: data.task is set ({core.data.task}), but each stage names its own task data "
                              "(continual.stages[].task); remove it")
    return cc, raw, label, base_overrides


def demo_data_dir(cc: ContinualConfig) -> Path:
    """OUTPUT_DIR/demo-data with the generated tasks and safety files (written once per seed)."""
    from .continual_data import write_continual_demo_data

    out = Path(cc.output_dir) / "demo-data" / f"seed-{cc.demo_seed}"
    if not (out / "done").exists():
        write_continual_demo_data(out, seed=cc.demo_seed)
        write_atomic(out / "done", "")
    return out


def _core_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if parse_override(o)[0][0] in CORE]


def core_config(base: dict, label: str, base_overrides: list[str], registry: dict, extra: list[str] = ()):
    """The run config of the shared sections alone (method sections left out), with `extra` overrides."""
    raw = {k: v for k, v in base.items() if k in CORE}
    return load_config(None, [*_core_overrides(base_overrides), *extra, "train.method=sft"], registry, raw=raw,
                       label=label)


# ------------------------------------------------------------------------------------------ data

def _q(value) -> str:
    """A value as override text (JSON is YAML: paths and specs with ':' or '[' stay one string)."""
    return json.dumps(value)


def _rows(examples) -> list[dict]:
    return [{"id": ex.id, "messages": ex.messages, "origin": ex.meta.get("source"),
             **({"harmful_pair": True} if ex.meta.get("harmful_pair") else {})} for ex in examples]


def _write_rows(out: Path, stem: str, rows: list[dict]) -> Path:
    """rows as OUTPUT_DIR/data/<stem>-<content hash>.jsonl (written once; a changed content is a new file, so
    a run started on other data is caught by its changed config)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = out / "data" / f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.exists():
        write_atomic(path, text)
    return path


@dataclass
class StageData:
    files: list[Path]  # per stage: its training rows
    safety: Path | None  # the safety pool (tagged), or None without data.reference
    pools: list[Path | None]  # per stage: safety + retention sample ({pool}); None where empty or unused
    replays: list[Path | None]  # per stage: its rows + retention sample ({replay}); None where unused
    facts: list[dict]  # per stage: rows, harmful pairs, pool composition


def prepare_data(cc: ContinualConfig, base: dict, label: str, base_overrides: list[str], registry: dict) -> StageData:
    """Write every stage's training rows, the safety pool and the per-stage pools and replay sets."""
    from .data.mixing import load_task_examples
    from .data.records import load_examples

    out = Path(cc.output_dir)
    names = [s.name for s in cc.stages]
    stage_rows, files, facts = {}, [], []
    for k, stage in enumerate(cc.stages):
        cfg = core_config(base, f"{label} (stage {stage.name})", base_overrides, registry,
                          [*stage.overrides, f"data.task={_q(stage.task)}"])
        examples, _ = load_task_examples(cfg.data)
        if not examples:
            raise DualSelectError(f"{label}: stage {stage.name}: no training rows in {stage.task}")
        stage_rows[stage.name] = _rows(examples)
        files.append(_write_rows(out, f"stage-{k + 1}-{stage.name}", stage_rows[stage.name]))
        facts.append({"name": stage.name, "task": stage.task, "benchmark": stage.benchmark, "file": str(files[-1]),
                      "n_train": len(examples), "n_harmful_pairs": sum(1 for r in stage_rows[stage.name]
                                                                       if r.get("harmful_pair"))})
    core = core_config(base, label, base_overrides, registry)
    safety_rows, safety = [], None
    if core.data.reference:
        examples, _ = load_examples(core.data.reference, data_dir=core.data.data_dir, fmt=core.data.format,
                                    columns=core.data.columns or None, limit=core.data.reference_limit)
        safety_rows = _rows(examples)
        safety = _write_rows(out, "safety", continual_pool.tag(safety_rows, continual_pool.SAFETY))
    elif continual_pool.SAFETY in cc.retention.quotas:
        raise DualSelectError(f"{label}: continual.retention.quotas.safety is set but data.reference (the safety "
                              "pool) is not")
    uses = {p for ovr in cc.methods.values() for p in _placeholders(ovr)}
    r = cc.retention
    pools, replays = [], []
    for k, stage in enumerate(cc.stages):
        pool = replay = None
        if POOL in uses:
            rows = continual_pool.pool_rows(safety_rows, stage_rows, names, k, r.per_stage, r.quotas, r.seed)
            pool = _write_rows(out, f"pool-{k + 1}-{stage.name}", rows) if rows else None
            facts[k]["pool"] = {"file": str(pool) if pool else None,
                                "by_source": continual_pool.counts_by_source([x["id"] for x in rows])}
        if REPLAY in uses:
            retained = continual_pool.retention_rows(stage_rows, names, k, r.per_stage, r.quotas, r.seed)
            replay = _write_rows(out, f"replay-{k + 1}-{stage.name}", stage_rows[stage.name] + retained) \
                if retained else files[k]
            facts[k]["replay"] = {"file": str(replay), "n_stage": len(stage_rows[stage.name]),
                                  "by_source": continual_pool.counts_by_source([x["id"] for x in retained])}
        pools.append(pool)
        replays.append(replay)
    return StageData(files, safety, pools, replays, facts)


# ------------------------------------------------------------------------------------------ the runs

def _train_method(base: dict, overrides: list[str]) -> str:
    method = (base.get("train") or {}).get("method", "sft")
    for text in overrides:
        parts, value = parse_override(text)
        if parts == ["train", "method"]:
            method = value
    return str(method)


def cell_of(cc: ContinualConfig, method: str, seed: int, k: int) -> bench.Cell:
    stage = cc.stages[k]
    path = Path(cc.output_dir) / "runs" / method / f"seed-{seed}" / f"{k + 1}-{stage.name}"
    return bench.Cell({"method": method, bench.SEED_AXIS: str(seed), "stage": stage.name}, [], path)


def stage_config(cc: ContinualConfig, base: dict, label: str, base_overrides: list[str], registry: dict,
                 data: StageData, method: str, seed: int, k: int, aligned: Path | None = None,
                 align_data: list[str] = ()):
    """The run config of one stage of one (method, seed): the base (keeping only its method's section) <- the
    command line's overrides <- the stage's overrides <- the method's (placeholders replaced) <- the fixed keys
    (data files, seed, directories, init adapter, benchmarks)."""
    stage, cell = cc.stages[k], cell_of(cc, method, seed, k)
    where = f"{label} (method {method}, seed {seed}, stage {stage.name})"
    own = cc.methods[method]
    task, reference = data.files[k], data.safety
    rest = []
    for text in own:
        value = _raw_value(text)
        if value == REPLAY:
            task = data.replays[k]
        elif value == POOL:
            if data.pools[k] is None:
                raise DualSelectError(f"{where}: its {POOL} is empty (no data.reference and no earlier stage)")
            reference = data.pools[k]
        else:
            rest.append(text)
    train_method = _train_method(base, [*base_overrides, *rest])
    raw = {key: v for key, v in base.items() if key not in registry or key == train_method}
    shared = [o for o in base_overrides if parse_override(o)[0][0] not in registry
              or parse_override(o)[0][0] == train_method]
    benchmarks = [s.benchmark for s in cc.stages[:k + 1]]
    core = core_config(base, label, base_overrides, registry)
    benchmarks += [b for b in core.eval.benchmarks if b not in benchmarks]
    seen = [*core.eval.train_files, *map(str, data.files), *([str(data.safety)] if data.safety else []), *align_data]
    fixed = [f"data.task={_q(str(task))}", f"data.reference={_q(str(reference) if reference else None)}",
             "data.task_limit=null", "data.task_shuffle=null", "data.reference_limit=null", "data.harmful=null",
             "data.harmful_ratio=0.0",
             "data.format=auto", "data.columns={}", f"train.seed={seed}",
             f"train.output_dir={_q(str(cell.path / 'train'))}",
             f"eval.adapter={_q(str(cell.path / 'train' / 'adapter'))}",
             f"eval.output_dir={_q(str(cell.path / 'eval'))}",
             f"eval.benchmarks={_q(benchmarks)}", f"eval.train_files={_q(list(dict.fromkeys(seen)))}"]
    if k > 0:
        fixed.append(f"model.init_adapter={_q(str(cell_of(cc, method, seed, k - 1).path / 'train' / 'adapter'))}")
    start = [f"model.name_or_path={_q(str(aligned))}"] if aligned else []
    try:
        cfg = load_config(None, [*start, *shared, *stage.overrides, *rest, *fixed], registry, raw=raw, label=where)
    except DualSelectError as e:  # an override's error names the override: say whose run it is too
        raise (e if str(e).startswith(where) else DualSelectError(f"{where}: {e}")) from None
    cell.train_method = cfg.train.method
    return cfg


def plan(cc: ContinualConfig, base: dict, label: str, base_overrides: list[str], registry: dict, data: StageData,
         aligned: Path | None = None, align_data: list[str] = (), methods: list[str] | None = None,
         seeds: list[int] | None = None) -> list[tuple[bench.Cell, Any]]:
    """The (cell, run config) of the selected methods and seeds (all by default), seeds slowest, then methods,
    then stages in order. The config is checked for every method; a started cell's saved config against its
    new one only for the selected cells (a method another process runs may be mid-change)."""
    cells = []
    for seed in cc.seeds:
        for method in cc.methods:
            for k in range(len(cc.stages)):
                cell = cell_of(cc, method, seed, k)
                cfg = stage_config(cc, base, label, base_overrides, registry, data, method, seed, k, aligned,
                                   align_data)
                cell.train_method = cfg.train.method
                cells.append((cell, cfg))
    used = {cfg.train.method for _, cfg in cells}
    unused = [key for key, v in base.items() if key in registry and v not in (None, {}) and key not in used]
    unused += [parse_override(o)[0][0] for o in base_overrides
               if parse_override(o)[0][0] in registry and parse_override(o)[0][0] not in used]
    if unused:
        raise DualSelectError(f"{label}: section '{unused[0]}' sets options of method '{unused[0]}', but no method "
                              "of continual.methods trains it, so they would be ignored")
    cells = [(c, cfg) for c, cfg in cells if (methods is None or c.method in methods)
             and (seeds is None or int(c.labels[bench.SEED_AXIS]) in seeds)]
    for cell, cfg in cells:
        bench.check_cell_config(cell, cfg, "continual.output_dir")
    return cells


def _selected(cc: ContinualConfig, only: dict[str, list[str]], label: str) -> tuple[list[str], list[int]]:
    """The methods and seeds --only keeps (all by default); an unknown axis or label is an error."""
    known = {"method": list(cc.methods), "seed": [str(s) for s in cc.seeds]}
    for axis, labels in only.items():
        if axis not in known:
            raise DualSelectError(f"{label}: --only {axis}=...: the axes are method and seed")
        unknown = [x for x in labels if x not in known[axis]]
        if unknown:
            raise DualSelectError(f"{label}: --only {axis}={unknown[0]}: not a {axis} of the config "
                                  f"({', '.join(known[axis])})")
    return ([m for m in cc.methods if m in only.get("method", cc.methods)],
            [s for s in cc.seeds if str(s) in only.get("seed", known["seed"])])


def continual_status(path: str | Path, overrides: list[str] = (), only: dict[str, list[str]] | None = None) -> dict:
    """What a continual run has finished and what is left, running nothing (`dualselect continual CONFIG
    --status`): per method its stage runs finished here or in the archive, started, to run, and the core-hours
    left (bench_status.unit_status)."""
    cc, _, label, _ = load_continual(path, list(overrides))
    methods, seeds = _selected(cc, only or {}, label)
    units = [(m, "stages", cell_of(cc, m, s, k).path) for s in seeds for m in methods for k in range(len(cc.stages))]
    from .bench_status import unit_status

    return unit_status(units, Path(cc.output_dir), Path(cc.archive) if cc.archive else None, ["stages"], methods)


def run_continual(path: str | Path, overrides: list[str] = (), quiet: bool = False,
                  only: dict[str, list[str]] | None = None) -> dict:
    """Run (or resume) every (method, seed) through the stages, then write continual.json and the report (of the
    methods and seeds `only` keeps, {"method": [...], "seed": [...]}; all by default)."""
    from tqdm.auto import tqdm

    from .methods import method_configs

    cc, base, label, base_overrides = load_continual(path, list(overrides))
    methods, seeds = _selected(cc, only or {}, label)
    if quiet:
        base_overrides += ["train.quiet=true", "eval.quiet=true"]
    registry = method_configs()
    aligned, align_data, notes = align(cc, base, label, registry)
    out = Path(cc.output_dir)
    if cc.archive:
        bench_archive.restore(Path(cc.archive), out)
    data = prepare_data(cc, base, label, base_overrides, registry)
    cells = plan(cc, base, label, base_overrides, registry, data, aligned, align_data, methods, seeds)
    write_atomic(out / MANIFEST, json.dumps({"config": str(path), "overrides": list(overrides), "stages": data.facts,
                                             "aligned": str(aligned) if aligned else None,
                                             "cells": [str(c.path) for c, _ in cells]}, indent=2) + "\n")
    todo = [(c, cfg) for c, cfg in cells if not (c.path / bench.DONE).exists()]
    from .data.mixing import check_task_data
    from .eval.run import check_benchmarks

    check_task_data(cfg for _, cfg in todo)
    check_benchmarks(cfg for _, cfg in todo)  # every benchmark readable, with prompts left, before the first run
    log.info("continual %s: %d stage runs, %d done, %d to run", out, len(cells), len(cells) - len(todo), len(todo))
    n = len(cc.stages)
    if cc.archive:  # chains finished before the archive was set
        for i in range(0, len(cells), n):
            if all((c.path / bench.DONE).exists() for c, _ in cells[i:i + n]):
                _archive_chain(cc, [c for c, _ in cells[i:i + n]])
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), disable=quiet, desc="continual", unit="stage")
    for cell, cfg in todo:
        log.info("stage %s of %s, seed %s", cell.labels["stage"], cell.method, cell.labels[bench.SEED_AXIS])
        if cfg.model.init_adapter and not Path(cfg.model.init_adapter).exists():
            raise DualSelectError(f"{cell.path}: its previous stage has no adapter ({cfg.model.init_adapter}); it was "
                                  "restored from the archive, which keeps none: delete that stage's directory "
                                  "(and the archive's copy) to train it again")
        bench.run_cell(cell, cfg)
        bar.update(1)
        k = next(i for i, s in enumerate(cc.stages) if s.name == cell.labels["stage"])
        if cc.archive and k == n - 1:
            _archive_chain(cc, [cell_of(cc, cell.method, int(cell.labels[bench.SEED_AXIS]), j) for j in range(n)])
    bar.close()
    if aligned is not None and not only:  # one process (every chain): the start model's own row
        start_eval(cc, aligned, cells[-1][1])
    result = collect(cc, data, cells, methods, seeds)
    result["notes"] = notes
    write_atomic(out / RESULTS, json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    from . import continual_report

    written = continual_report.write_report(result, out / "report")
    if cc.archive:  # the results and report go with the archived chains, to be committed
        write_atomic(Path(cc.archive) / RESULTS, (out / RESULTS).read_bytes())
        for f in sorted(p for p in (out / "report").iterdir() if p.is_file()):
            write_atomic(Path(cc.archive) / "report" / f.name, f.read_bytes())
    return {"result": result, "path": out / RESULTS, **written}


def align(cc: ContinualConfig, base: dict, label: str, registry: dict) -> tuple[Path | None, list[str], list[str]]:
    """The alignment stage of continual.align (a bench alignment stage), checked against the archive's record:
    (the merged model dir or None, its data, warnings)."""
    if cc.align is None:
        return None, [], []
    bc = bench.BenchConfig(output_dir=cc.output_dir, grid={"stage": {"all": []}}, align=cc.align,
                           align_data=cc.align_data)
    return bench.prepare_aligned(bc, base, label, registry, cc.archive)


def align_only(path: str | Path, overrides: list[str] = ()) -> str:
    """`dualselect continual CONFIG --align-only`: the alignment stage alone, checked against the archive."""
    from .methods import method_configs

    cc, base, label, base_overrides = load_continual(path, list(overrides))
    registry = method_configs()
    aligned, align_data, notes = align(cc, base, label, registry)
    if aligned is not None:  # the start model's row, with the last stage's eval settings (every benchmark)
        data = prepare_data(cc, base, label, base_overrides, registry)
        method, seed, last = next(iter(cc.methods)), cc.seeds[0], len(cc.stages) - 1
        start_eval(cc, aligned, stage_config(cc, base, label, base_overrides, registry, data, method, seed, last,
                                             aligned, align_data))
    return bench.aligned_summary(aligned, notes)


def start_eval(cc: ContinualConfig, aligned: Path, cfg) -> Path:
    """The aligned model the chains start from, evaluated on every stage's benchmark and the safety benchmarks
    with the last stage's eval settings (the same prompts as every stage run): OUTPUT_DIR/aligned-eval/<its
    weights' sha256, 12 digits>, archived. Run by --align-only and by a run of every chain (one process)."""
    sha = bench.aligned_sha(aligned) or "unrecorded"
    bc = bench.BenchConfig(output_dir=cc.output_dir, grid={"stage": {"all": []}}, archive=cc.archive)
    return bench.aligned_eval(bc, {"start": sha[:12]}, cfg, aligned)


def _archive_chain(cc: ContinualConfig, chain: list[bench.Cell]) -> None:
    """A finished (method, seed) chain into the archive: every stage, its done.json last (a chain is archived
    whole, as its adapters are not: a restored stage cannot start the next one)."""
    for cell in chain:
        bench_archive.save_unit(cell.path, Path(cc.output_dir), Path(cc.archive))


# ------------------------------------------------------------------------------------------ results

def _mean_counts(counts: list[dict[str, int]], n: int | None = None) -> dict[str, float]:
    """Key -> its mean count over n runs (len(counts) by default; a run without the key counts 0)."""
    n = n or len(counts)
    return {key: sum(c.get(key, 0) for c in counts) / n for key in sorted({k for c in counts for k in c})}


def _aligned_of(cell: bench.Cell) -> str | None:
    """The aligned weights a chain started from (its first stage's done.json; None: not recorded)."""
    return json.loads((cell.path / bench.DONE).read_text()).get("aligned_sha256")


def collect(cc: ContinualConfig, data: StageData, cells: list, methods: list[str] | None = None,
            seeds: list[int] | None = None) -> dict:
    """continual.json: per method the accuracy matrix, average accuracy, BWT, forgetting and safety per stage
    (means over seeds with 95 % intervals), and per stage the references its refreshes chose, by source."""
    from .eval.prompts import parse_spec

    task_benchmarks = [s.benchmark for s in cc.stages]
    last_cfg = cells[-1][1]
    safety = {b: parse_spec(b)[0] for b in last_cfg.eval.benchmarks
              if b not in task_benchmarks and parse_spec(b)[0] in ("harmful", "overrefusal")}
    chosen, seeds = methods or list(cc.methods), seeds or list(cc.seeds)
    methods = {}
    targets = [continual_metrics.label_targets(pool) for pool in data.pools]
    for method in chosen:
        per_seed, refs, by_target, answers = [], {}, {}, {}
        for seed in seeds:
            values = {}
            for k in range(len(cc.stages)):
                cell = cell_of(cc, method, seed, k)
                kinds = {**{b: "task" for b in task_benchmarks[:k + 1]}, **safety}
                for name, v in continual_metrics.stage_values(cell.path / "eval", kinds).items():
                    values[(k, name)] = v
                for name, a in continual_metrics.answer_shares(cell.path / "eval", task_benchmarks[:k + 1]).items():
                    answers.setdefault((k, name), []).append(a)
                for r, counts in enumerate(continual_metrics.reference_counts(cell.path / "train"), 1):
                    refs.setdefault((k, r), []).append(counts)
                for r, counts in enumerate(continual_metrics.reference_targets(cell.path / "train", targets[k]), 1):
                    by_target.setdefault((k, r), []).append(counts)
            per_seed.append(values)
        summary = continual_metrics.summarize_method([s.name for s in cc.stages], task_benchmarks, safety, per_seed,
                                                     cc.resamples, 0, method)
        summary["references"] = [
            {"stage": cc.stages[k].name, "refresh": r, "mean_by_source": _mean_counts(counts),
             "mean_by_target": _mean_counts(by_target.get((k, r), []), len(counts))}
            for (k, r), counts in sorted(refs.items())]
        summary["answers"] = [  # the most frequent answer to each label task's prompts, per seed
            {"stage": cc.stages[k].name, "benchmark": name, "per_seed": shares,
             "mean_share": sum(a["share"] for a in shares) / len(shares)}
            for (k, name), shares in sorted(answers.items(),
                                            key=lambda kv: (kv[0][0], task_benchmarks.index(kv[0][1])))]
        summary["aligned_sha256"] = [_aligned_of(cell_of(cc, method, seed, 0)) for seed in seeds]
        summary["train_method"] = next(cfg.train.method for c, cfg in cells if c.method == method)
        methods[method] = summary
    comparisons = [continual_metrics.compare_methods(methods[m], methods[b], m, b, safety) for m, b in cc.pairs()
                   if m in methods and b in methods]
    starts = sorted(p.parent for p in (Path(cc.output_dir) / "aligned-eval").glob("*/results.json"))
    start = [{"aligned_sha256": d.name,
              "chains": [f"{m} s{seed}" for m in methods
                         for seed, sha in zip(seeds, methods[m]["aligned_sha256"]) if (sha or "")[:12] == d.name],
              "values": continual_metrics.start_values(d, task_benchmarks, safety, cc.resamples, d.name)}
             for d in starts]
    from .eval.report import MIN_SEEDS, SEEDS_WARNING

    return {"format": FORMAT, "output_dir": cc.output_dir, "stages": data.facts, "seeds": seeds,
            "retention": {"per_stage": cc.retention.per_stage, "quotas": cc.retention.quotas,
                          "seed": cc.retention.seed},
            "task_benchmarks": task_benchmarks, "safety_benchmarks": safety, "start": start, "methods": methods,
            "comparisons": comparisons,
            "method_overrides": {m: list(cc.methods[m]) for m in methods},
            "warning": SEEDS_WARNING if len(seeds) < MIN_SEEDS else None,
            "bootstrap": {"resamples": cc.resamples, "confidence": 0.95, "over": "seeds, then prompts"}}
