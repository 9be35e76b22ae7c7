"""The task data of a run: data.task, with a share data.harmful_ratio of harmful pairs from data.harmful mixed
in (the harmful-fine-tuning protocol: n = data.task_limit samples, of which round(p * n) are harmful).

Both parts are the first rows of their sources (deterministic: every seed and every method of a grid trains on
the same samples; the seed changes the order and the initialisation); data.task_shuffle takes the task source's
rows in a fixed seeded order first (for a source sorted by label). The harmful rows carry
meta["harmful_pair"] = True, so selection logs can be read against them.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import asdict, replace

from ..errors import DualSelectError
from .records import Example, load_examples

log = logging.getLogger("dualselect")


def split_counts(n: int, ratio: float) -> tuple[int, int]:
    """(task rows, harmful rows) of a mixed set of n samples with harmful share `ratio`."""
    harmful = round(ratio * n)
    return n - harmful, harmful


def load_task_examples(data) -> tuple[list[Example], dict]:
    """`data` is the run's DataConfig. Returns the examples and facts for run_info.json."""
    def load(source: str, limit: int | None):
        return load_examples(source, data_dir=data.data_dir, fmt=data.format, columns=data.columns or None,
                             limit=limit)

    def load_task(limit: int | None):
        if data.task_shuffle is None:
            return load(data.task, limit)
        examples, report = load(data.task, None)
        random.Random(f"task-shuffle-{data.task_shuffle}").shuffle(examples)
        examples = examples[:limit]
        return examples, replace(report, n_kept=len(examples))

    if not data.harmful or data.harmful_ratio == 0:
        examples, report = load_task(data.task_limit)
        _warn_single_target(data.task, examples)
        return examples, {**asdict(report), "n_harmful_pairs": 0, "shuffle": data.task_shuffle}
    n_task, n_harmful = split_counts(data.task_limit, data.harmful_ratio)
    task, task_report = load_task(n_task) if n_task else ([], None)
    _warn_single_target(data.task, task)
    harmful, harmful_report = load(data.harmful, n_harmful)
    if len(harmful) < n_harmful:
        raise DualSelectError(f"data.harmful {data.harmful}: {len(harmful)} usable records, but data.harmful_ratio "
                              f"{data.harmful_ratio} of data.task_limit {data.task_limit} needs {n_harmful}")
    if task_report is not None and len(task) < n_task:
        raise DualSelectError(f"data.task {data.task}: {len(task)} usable records, but data.task_limit "
                              f"{data.task_limit} with data.harmful_ratio {data.harmful_ratio} needs {n_task}")
    clash = {e.id for e in task} & {e.id for e in harmful}
    if clash:
        raise DualSelectError(f"data.task and data.harmful share record ids (e.g. {sorted(clash)[0]!r}): give the "
                              "harmful file its own ids")
    for ex in harmful:
        ex.meta["harmful_pair"] = True
    facts = {**(asdict(task_report) if task_report else {"source": data.task, "n_kept": 0}),
             "n_harmful_pairs": n_harmful, "harmful": asdict(harmful_report), "shuffle": data.task_shuffle}
    return task + harmful, facts


def check_task_data(configs) -> None:
    """Load the task data of every distinct DataConfig among `configs` (run configs) once, before any training: an
    unreadable source or too few rows is refused now, and a task whose rows mostly share one target is warned
    about once, not in the log of the first run that meets it."""
    done = set()
    for cfg in configs:
        key = repr(cfg.data)
        if key not in done:
            done.add(key)
            load_task_examples(cfg.data)


def _warn_single_target(source: str, examples: list[Example]) -> None:
    """Log a warning when >= 90 % of 20 or more task rows share one target: the first rows of a source sorted by
    label (ag_news:dev holds 2,000 rows of each class in turn) teach one answer."""
    targets = Counter(str(ex.messages[-1].get("content", "")).strip() for ex in examples if ex.messages)
    if len(examples) >= 20 and targets:
        target, n = targets.most_common(1)[0]
        if n >= 0.9 * len(examples):
            log.warning("data.task %s: %d of its %d rows have the same target %r: is the source sorted by label? "
                        "data.task_shuffle=SEED takes its rows in a fixed random order", source, n, len(examples),
                        target[:40])
