"""The task data of a run: data.task, with a share data.harmful_ratio of harmful pairs from data.harmful mixed
in (the harmful-fine-tuning protocol: n = data.task_limit samples, of which round(p * n) are harmful).

Both parts are the first rows of their sources (deterministic: every seed and every method of a grid trains on
the same samples; the seed changes the order and the initialisation). The harmful rows carry
meta["harmful_pair"] = True, so selection logs can be read against them.
"""

from __future__ import annotations

from dataclasses import asdict

from ..errors import DualSelectError
from .records import Example, load_examples


def split_counts(n: int, ratio: float) -> tuple[int, int]:
    """(task rows, harmful rows) of a mixed set of n samples with harmful share `ratio`."""
    harmful = round(ratio * n)
    return n - harmful, harmful


def load_task_examples(data) -> tuple[list[Example], dict]:
    """`data` is the run's DataConfig. Returns the examples and facts for run_info.json."""
    def load(source: str, limit: int | None):
        return load_examples(source, data_dir=data.data_dir, fmt=data.format, columns=data.columns or None,
                             limit=limit)

    if not data.harmful or data.harmful_ratio == 0:
        examples, report = load(data.task, data.task_limit)
        return examples, {**asdict(report), "n_harmful_pairs": 0}
    n_task, n_harmful = split_counts(data.task_limit, data.harmful_ratio)
    task, task_report = load(data.task, n_task) if n_task else ([], None)
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
             "n_harmful_pairs": n_harmful, "harmful": asdict(harmful_report)}
    return task + harmful, facts
