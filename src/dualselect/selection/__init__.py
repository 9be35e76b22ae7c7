"""Pure DualSelect selection rules (no model): cosines, scores, hard/soft/budget selections,
weighted directions and the streaming top-k used by the lazy reference refresh."""

from dualselect.selection.dualselect import (
    EPS,
    RunningTopK,
    Selection,
    cosine,
    cosines,
    project_conflict,
    reference_scores,
    select_references,
    select_task,
    standardize,
    task_scores,
    weighted_direction,
)

__all__ = [
    "EPS",
    "RunningTopK",
    "Selection",
    "cosine",
    "cosines",
    "project_conflict",
    "reference_scores",
    "select_references",
    "select_task",
    "standardize",
    "task_scores",
    "weighted_direction",
]
