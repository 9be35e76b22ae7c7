"""Continual-learning metrics: the accuracy matrix, average accuracy, backward transfer, safety per stage, and
their means over seeds with 95 % intervals.

Notation: a[i][j] = accuracy on task j after training stage i (j <= i; stages and tasks counted from 0),
T = the last stage.
* average accuracy = mean over j of a[T][j];
* backward transfer BWT = mean over j < T of (a[T][j] - a[j][j]) (negative: forgetting); per task, the
  forgetting of task j is a[T][j] - a[j][j].
Intervals: a two-level percentile bootstrap, as `dualselect report` does for one benchmark (seeds with
replacement, then each drawn seed's prompts with replacement, every benchmark of the seed resampled on its own),
applied to any statistic of the per-benchmark means (a matrix cell, the average accuracy, BWT, a refusal rate).
The functions of a matrix work on floats and elementwise on numpy arrays alike (the bootstrap's resamples).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import numpy as np

from .continual_pool import SAFETY, counts_by_source, source_of
from .eval import report as eval_report
from .eval.figures import read_refreshes

# the headline metric of each benchmark kind (eval.report.VALUE_RULES names)
METRIC_OF_KIND = {"task": "accuracy", "harmful": "refusal_rate", "overrefusal": "over_refusal_rate"}


def average_accuracy(a: Sequence[Sequence]) -> float:
    """Mean over the tasks of the last row of the accuracy matrix."""
    last = a[-1]
    return sum(last) / len(last)


def forgetting(a: Sequence[Sequence]) -> list:
    """Per task j before the last: a[T][j] - a[j][j]."""
    last = a[-1]
    return [last[j] - a[j][j] for j in range(len(a) - 1)]


def backward_transfer(a: Sequence[Sequence]) -> float:
    """BWT: mean over j < T of a[T][j] - a[j][j]."""
    if len(a) < 2:
        raise ValueError("backward transfer needs at least 2 stages")
    drops = forgetting(a)
    return sum(drops) / len(drops)


def check_matrix(a: Sequence[Sequence]) -> None:
    """Row i of an accuracy matrix holds i + 1 values (the tasks seen so far)."""
    for i, row in enumerate(a):
        if len(row) != i + 1:
            raise ValueError(f"accuracy matrix row {i} has {len(row)} values, expected {i + 1}")


def two_level_ci(per_seed: Sequence[dict[Hashable, Sequence[float]]], keys: Sequence[Hashable],
                 stat: Callable[[dict], object], resamples: int = 2000, seed=0,
                 confidence: float = eval_report.CONFIDENCE) -> tuple[float, float] | None:
    """Percentile interval of the mean over seeds of stat(per-benchmark means).

    per_seed: one dict per seed, key (a benchmark of a stage) -> the per-prompt values. Each resample draws as
    many seeds as there are, with replacement, and for each drawn seed every key's prompts with replacement;
    stat receives {key: array of means} and must work elementwise. With one key and stat = that key's mean it is
    eval.report.two_level_bootstrap_ci (the same draws). None when some seed has no values for a key."""
    if not per_seed or any(len(s.get(k, ())) == 0 for s in per_seed for k in keys):
        return None
    rng = np.random.default_rng(seed)
    k = len(per_seed)
    picks = rng.integers(0, k, size=(resamples, k))
    totals = np.zeros(resamples)
    for s, values in enumerate(per_seed):
        rows, _ = np.nonzero(picks == s)
        means = {key: eval_report.resampled_means(values[key], rows.size, rng) for key in keys}
        np.add.at(totals, rows, np.asarray(stat(means), dtype=np.float64))
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(totals / k, [tail, 100 - tail])
    return float(lo), float(hi)


def estimate(per_seed: Sequence[dict], keys: Sequence[Hashable], stat: Callable[[dict], object],
             resamples: int, seed: int, *names: str) -> dict:
    """{"value": mean over seeds of stat(the seed's means), "ci95": two_level_ci, "per_seed": [...]}; value None
    when some seed has no values for a key."""
    if any(len(s.get(k, ())) == 0 for s in per_seed for k in keys):
        return {"value": None, "ci95": None, "per_seed": None}
    values = [float(stat({key: float(np.mean(s[key])) for key in keys})) for s in per_seed]
    ci = two_level_ci(per_seed, keys, stat, resamples, eval_report.cell_seed(seed, *names))
    return {"value": sum(values) / len(values), "ci95": ci, "per_seed": values}


# ------------------------------------------------------------------------------------------ reading stage evals

def stage_values(eval_dir: Path, benchmarks: dict[str, str]) -> dict[str, list[float]]:
    """Per benchmark name (-> kind) of one stage's eval dir: the per-prompt values of its headline metric."""
    run = eval_report.load_run("stage", Path(eval_dir))
    out = {}
    for name, kind in benchmarks.items():
        if name not in run.benchmarks:
            continue
        ids, _ = eval_report.select_prompts([run], name)
        metric = eval_report.seed_values(run, name, kind, ids[run.path]).get(METRIC_OF_KIND[kind])
        out[name] = [] if metric is None else [metric["values"][i] for i in sorted(metric["values"])]
    return out


def reference_counts(train_dir: Path) -> list[dict[str, int]]:
    """Per refresh of a train run (selection.jsonl refresh events): chosen references per source."""
    return [counts_by_source(ids) for ids in read_refreshes(train_dir)]


def answer_shares(eval_dir: Path, benchmarks: Sequence[str]) -> dict[str, dict]:
    """Per label-graded benchmark among `benchmarks` of one stage's eval dir: its most frequent answer (None: no
    label found) and that answer's share of the prompts. A share near 1 is a collapse to one answer, whatever the
    input: accuracy alone hides it (the share of that label among the gold answers)."""
    run = eval_report.load_run("stage", Path(eval_dir))
    tops = {name: eval_report.top_answer(run.samples.get(name, {}).values()) for name in benchmarks}
    return {name: top for name, top in tops.items() if top is not None}


MAX_LABELS = 10  # a retained source with at most this many distinct targets is a label task


def label_targets(pool_file: Path | None) -> dict[str, str]:
    """id -> target (the last message) of a pool file's retained rows (not the safety part) whose source has at
    most MAX_LABELS distinct targets; {} without a pool."""
    if pool_file is None:
        return {}
    by_source: dict[str, dict[str, str]] = {}
    with open(pool_file, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            src = source_of(row["id"])
            if src != SAFETY and row.get("messages"):
                by_source.setdefault(src, {})[row["id"]] = str(row["messages"][-1].get("content", "")).strip()
    return {i: t for rows in by_source.values() if len(set(rows.values())) <= MAX_LABELS for i, t in rows.items()}


def reference_targets(train_dir: Path, targets: dict[str, str]) -> list[dict[str, int]]:
    """Per refresh of a train run: the chosen references among `targets` (label_targets), counted by
    "source: target"."""
    return [dict(Counter(f"{source_of(i)}: {targets[i]}" for i in ids if i in targets))
            for ids in read_refreshes(train_dir)]


def summarize_method(stage_names: list[str], task_benchmarks: list[str], safety: dict[str, str],
                     per_seed: list[dict], resamples: int, seed: int, label: str) -> dict:
    """The continual.json entry of one method. per_seed[s][(i, name)] = values of benchmark `name` after stage i.
    Returns the accuracy matrix (mean + interval per cell), average accuracy, BWT, forgetting per task and the
    safety metrics per stage."""
    T = len(stage_names)
    matrix = [[estimate(per_seed, [(i, task_benchmarks[j])], lambda m, k=(i, task_benchmarks[j]): m[k],
                        resamples, seed, label, "acc", str(i), str(j)) for j in range(i + 1)] for i in range(T)]
    keys = [(i, task_benchmarks[j]) for i in range(T) for j in range(i + 1)]

    def as_matrix(m: dict) -> list[list]:
        return [[m[(i, task_benchmarks[j])] for j in range(i + 1)] for i in range(T)]

    out = {
        "accuracy": matrix,
        "average_accuracy": estimate(per_seed, keys, lambda m: average_accuracy(as_matrix(m)), resamples, seed,
                                     label, "average"),
        "bwt": estimate(per_seed, keys, lambda m: backward_transfer(as_matrix(m)), resamples, seed, label, "bwt"),
        "forgetting": [estimate(per_seed, keys, lambda m, j=j: forgetting(as_matrix(m))[j], resamples, seed, label,
                                "forgetting", str(j)) for j in range(T - 1)],
        "safety": {},
    }
    for name, kind in safety.items():
        out["safety"][name] = {"kind": kind, "metric": METRIC_OF_KIND[kind], "per_stage": [
            estimate(per_seed, [(i, name)], lambda m, k=(i, name): m[k], resamples, seed, label, name, str(i))
            for i in range(T)]}
    return out


def start_values(eval_dir: Path, task_benchmarks: Sequence[str], safety: dict[str, str], resamples: int,
                 label: str) -> dict[str, dict]:
    """The start model's row (one evaluation, no seeds): per task and safety benchmark its headline metric,
    the mean over prompts with a bootstrap interval over prompts (estimate with one seed)."""
    kinds = {**{b: "task" for b in task_benchmarks}, **safety}
    values = stage_values(eval_dir, kinds)
    return {name: {"kind": kind, "metric": METRIC_OF_KIND[kind],
                   **estimate([values], [name], lambda m, k=name: m[k], resamples, 0, label, name)}
            for name, kind in kinds.items() if name in values}


def compare_methods(method: dict, baseline: dict, name: str, baseline_name: str, safety: dict[str, str]) -> dict:
    """Method minus baseline, the training seed as the unit (eval.report.seed_level_test: a paired t-test of the
    per-seed differences, seeds paired by position, i.e. by train.seed: the same stage data and retention sample):
    average accuracy, BWT and every safety metric after the last stage."""
    figures = {"average accuracy": (method["average_accuracy"], baseline["average_accuracy"]),
               "BWT": (method["bwt"], baseline["bwt"])}
    for b, kind in safety.items():
        label = f"{b} {'refusal' if kind == 'harmful' else 'over-refusal'} (last stage)"
        figures[label] = (method["safety"][b]["per_stage"][-1], baseline["safety"][b]["per_stage"][-1])
    return {"method": name, "baseline": baseline_name, "metrics": {
        label: eval_report.seed_level_test(m["per_seed"] or [], b["per_seed"] or [])
        for label, (m, b) in figures.items()}}
