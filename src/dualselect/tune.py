"""Validation-based tuning of a bench grid (bench.tune): pick each tuned method's settings (rho, k, budget, ...)
on validation prompts only, then run the grid's cells with them.

    bench:
      tune:
        budget: 3                 # trainings per tuned method, the same for every one
        seed: 0                   # the training seed of the tuning runs
        at: {data.harmful_ratio: "0.1"}   # the other axes' labels the tuning runs at (default: each axis's first)
        benchmarks: [harmful:advbench[100:200], overrefusal:refusal_direction:harmless_val[:100],
                     task:sst2:dev[200:400]]                 # validation sets: none of them may be a test set
        objective: {refusal_rate: 1.0, over_refusal_rate: -1.0, accuracy: 1.0}
        space:                    # method-axis label -> config key -> candidate values
          dualselect: {dualselect.rho: [0.1, 0.2, 0.5], dualselect.k_task: [4, 6]}

A method's candidates are the product of its space, in the order written; a seeded random `budget` of them
are tried (random search; all of them when there are exactly `budget`), so every tuned method gets the same
number of trainings (a space with fewer candidates than the budget is refused). Each candidate is a normal
cell (train + eval on the validation benchmarks) under OUTPUT_DIR/tune/<method>/<candidate>/, resumable like the grid's cells. Its score is the objective: per metric
the mean of its value over the validation benchmarks that report it, weighted and summed. The best candidate
(the first written on a tie) gives its overrides to every cell of that method; OUTPUT_DIR/tune/results.json
records every candidate's values and the choice, and the bench report prints them.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DualSelectError
from .logs import write_atomic

log = logging.getLogger("dualselect")
RESULTS = "results.json"


@dataclass
class TuneConfig:
    space: dict[str, dict[str, list[Any]]] = field(default_factory=dict, metadata={
        "help": "method-axis label -> {config key: [candidate values]}"})
    benchmarks: list[str] = field(default_factory=list, metadata={
        "help": "the validation benchmarks the candidates are scored on (never the test sets of eval.benchmarks)"})
    objective: dict[str, float] = field(default_factory=lambda: {
        "refusal_rate": 1.0, "over_refusal_rate": -1.0, "accuracy": 1.0}, metadata={
        "help": "metric -> weight; a candidate's score is the weighted sum of each metric's mean over the "
                "validation benchmarks"})
    budget: int = field(default=3, metadata={"help": "trainings per tuned method (the same for every one)"})
    seed: int = field(default=0, metadata={"help": "training seed of the tuning runs (and of the random search)"})
    at: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "labels of the grid's other axes the tuning runs at (default: the first value of each)"})

    def __post_init__(self) -> None:
        if not self.space:
            raise ValueError("space must name at least one method")
        for method, keys in self.space.items():
            if not isinstance(keys, dict) or not keys:
                raise ValueError(f"space.{method} must map config keys to lists of values")
            for key, values in keys.items():
                if "." not in key or not isinstance(values, list) or not values:
                    raise ValueError(f"space.{method}.{key}: give a config key (section.key) and a "
                                     "non-empty list of values")
        if not self.benchmarks:
            raise ValueError("benchmarks must list the validation benchmarks")
        if not self.objective:
            raise ValueError("objective must weight at least one metric")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")


def candidates(space: dict[str, list[Any]], budget: int, seed: int) -> list[dict[str, Any]]:
    """The candidates tried: all of the space's product when it has at most `budget`, else a seeded random
    `budget` of them, kept in the order written."""
    keys = list(space)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
    if len(combos) <= budget:
        return combos
    picked = sorted(random.Random(seed).sample(range(len(combos)), budget))
    return [combos[i] for i in picked]


def score(results: dict, objective: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(the objective, per metric its mean over the benchmarks that report it) of one eval's results.json."""
    means = {}
    for metric in objective:
        values = [b["metrics"][metric]["value"] for b in results["benchmarks"]
                  if metric in b.get("metrics", {}) and b["metrics"][metric]["value"] is not None]
        if not values:
            raise DualSelectError(f"bench.tune.objective: no validation benchmark reports {metric!r} (the "
                                  f"benchmarks report: {', '.join(sorted({m for b in results['benchmarks'] for m in b.get('metrics', {})}))})")
        means[metric] = sum(values) / len(values)
    return sum(objective[m] * v for m, v in means.items()), means


def best(scored: list[dict]) -> dict:
    """The highest objective; the first written on a tie."""
    return max(enumerate(scored), key=lambda iv: (iv[1]["objective"], -iv[0]))[1]


def _rows(benchmark: str) -> tuple[str, int, float]:
    """(source without its row range, first row, end row or inf) of a kind:source benchmark."""
    from .data.records import ROW_RANGE

    source = benchmark.split(":", 1)[1] if ":" in benchmark else benchmark
    m = ROW_RANGE.match(source)
    if not m:
        return source, 0, float("inf")
    return m.group(1), int(m.group(2) or 0), int(m.group(3)) if m.group(3) else float("inf")


def check_not_test(validation: list[str], test: list[str], label: str) -> None:
    """Refuse a validation benchmark that shares rows with a test benchmark (same source, overlapping row
    ranges; a source without a range is all its rows)."""
    for v in validation:
        vs, v0, v1 = _rows(v)
        for t in test:
            ts, t0, t1 = _rows(t)
            if vs == ts and v0 < t1 and t0 < v1:
                raise DualSelectError(f"{label}: bench.tune.benchmarks {v!r} shares rows with the test benchmark "
                                      f"{t!r}; tune on validation prompts only (other rows: SOURCE[START:END])")


def tune_cells(tune: TuneConfig, cells: list, out: Path, label: str) -> dict[str, list[tuple[dict, Any]]]:
    """Per tuned method label, its (candidate, tuning cell) pairs: bench.Cells at the `at` labels and the tuning
    seed, evaluated on the validation benchmarks."""
    from . import bench

    by_label = {}
    for c in cells:
        by_label.setdefault(c.labels.get(bench.METHOD_AXIS), []).append(c)
    axes = [a for a in cells[0].labels if a not in (bench.METHOD_AXIS, bench.SEED_AXIS)] if cells else []
    unknown = [a for a in tune.at if a not in axes]
    if unknown:
        raise DualSelectError(f"{label}: bench.tune.at names {unknown[0]!r}, which is not an axis of the grid "
                              f"(axes: {', '.join(axes) or 'none but method and seed'})")
    out_cells = {}
    for method, keys in tune.space.items():
        size = len(list(itertools.product(*keys.values())))
        if size < tune.budget:
            raise DualSelectError(f"{label}: bench.tune.space.{method} has {size} candidates, fewer than the budget "
                                  f"({tune.budget}): every tuned method gets the same number of trainings; add "
                                  "values or lower bench.tune.budget")
        members = by_label.get(method)
        if members is None:
            continue  # not in this run (--only): nothing to tune
        want = {a: bench._value_text(tune.at[a]) if a in tune.at else members[0].labels[a] for a in axes}
        model = next((c for c in members if all(c.labels[a] == v for a, v in want.items())), None)
        if model is None:
            raise DualSelectError(f"{label}: bench.tune.at {want}: the grid has no {method} cell there")
        seed = [f"{bench.SEED_AXIS}={tune.seed}"]
        base = [o for o in model.overrides if not o.startswith(f"{bench.SEED_AXIS}=")]
        tried = []
        for cand in candidates(keys, tune.budget, tune.seed):
            over = [f"{k}={bench._value_text(v)}" for k, v in cand.items()]
            name = bench._slug("__".join(f"{k.rsplit('.', 1)[1]}-{bench._value_text(v)}" for k, v in cand.items()))
            labels = {**{a: v for a, v in model.labels.items() if a != bench.SEED_AXIS},
                      bench.SEED_AXIS: str(tune.seed), "tune": name}
            cell = bench.Cell(labels, [*base, *seed, *over,
                                       f"eval.benchmarks={json.dumps(tune.benchmarks)}", "eval.baseline=null"],
                              out / "tune" / bench._slug(method) / name)
            tried.append((cand, cell))
        out_cells[method] = tried
    return out_cells


def tune_stage(bench_cfg, cells: list, configure, run_cell, test_benchmarks: list[str], label: str) -> dict:
    """Run (or resume) the tuning cells and choose. `configure(cell)` gives a cell's run config, `run_cell(cell,
    cfg)` trains and evaluates it. Returns {"overrides": {method label: [key=value, ...]}, "record": what
    OUTPUT_DIR/tune/results.json holds} ({} without bench.tune)."""
    from .bench import _value_text

    tune: TuneConfig | None = bench_cfg.tune
    if tune is None:
        return {}
    check_not_test(tune.benchmarks, test_benchmarks, label)
    out = Path(bench_cfg.output_dir)
    plan = tune_cells(tune, cells, out, label)
    configs = {c.path: configure(c) for tried in plan.values() for _, c in tried}
    from .eval.run import check_benchmarks

    check_benchmarks(cfg for path, cfg in configs.items() if not (path / "done.json").exists())
    total = sum(len(t) for t in plan.values())
    log.info("tuning %d methods on validation prompts: %d cells (budget %d each)", len(plan), total, tune.budget)
    chosen, record = {}, {"objective": tune.objective, "benchmarks": tune.benchmarks, "budget": tune.budget,
                          "seed": tune.seed, "methods": {}}
    for method, tried in plan.items():
        scored = []
        for cand, c in tried:
            if not (c.path / "done.json").exists():
                log.info("tune %s: %s", method, c.name)
                run_cell(c, configs[c.path])
            results = json.loads((c.path / "eval" / "results.json").read_text())
            objective, means = score(results, tune.objective)
            scored.append({"candidate": cand, "objective": objective, "metrics": means, "dir": str(c.path)})
        top = best(scored)
        chosen[method] = [f"{k}={_value_text(v)}" for k, v in top["candidate"].items()]
        record["methods"][method] = {"chosen": top["candidate"], "tried": scored}
        log.info("tune %s: chose %s (objective %.4f)", method, " ".join(chosen[method]), top["objective"])
    if plan:
        write_atomic(out / "tune" / RESULTS, json.dumps(record, indent=2) + "\n")
    return {"overrides": chosen, "record": record}


def markdown(record: dict) -> str:
    """The tuning section of a bench report: per method, every candidate's validation metrics and the choice."""
    from .bench import _value_text

    if not record or not record.get("methods"):
        return ""
    metrics = list(record["objective"])
    weights = ", ".join(f"{w:+g} x {m}" for m, w in record["objective"].items())
    lines = [f"Tuned on validation prompts only ({', '.join(record['benchmarks'])}); objective {weights} (each "
             f"metric's mean over the validation benchmarks that report it); {record['budget']} trainings per "
             f"tuned method at seed {record['seed']}. Chosen rows in bold.", "",
             "| method | candidate | " + " | ".join(metrics) + " | objective |",
             "|---|---|" + "---|" * len(metrics) + "---|"]
    for method, info in record["methods"].items():
        for t in info["tried"]:
            mark = "**" if t["candidate"] == info["chosen"] else ""
            cand = " ".join(f"{k}={_value_text(v)}" for k, v in t["candidate"].items())
            vals = " | ".join(f"{100 * t['metrics'][m]:.1f}" for m in metrics)
            lines.append(f"| {mark}{method}{mark} | {mark}{cand}{mark} | {vals} | {100 * t['objective']:.1f} |")
    return "\n".join(lines)
