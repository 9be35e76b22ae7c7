"""The retention pool of a continual-learning stage, as pure functions on rows (dicts with id and messages).

The pool of stage t is the union of the safety pool and a seeded sample of the training rows of every earlier
stage j < t: ``quotas[name_j]`` rows of stage j (else ``per_stage``), ``quotas["safety"]`` rows of the safety
pool (else all of it). Each row's id is prefixed with its source and the row carries the source by name::

    {"id": "sst2/sst2-train-17", "retention_source": "sst2", "messages": [...]}

so that a refresh log (chosen reference ids) says where each chosen reference came from. Harmful pairs mixed
into a stage's task data (meta harmful_pair) are never retained. The sample of one source is the first rows of
a permutation seeded by the retention seed and the source name: the same rows at every later stage, whatever the
other quotas.
"""

from __future__ import annotations

import random

from .errors import DualSelectError

SAFETY = "safety"  # the source name of the safety pool's rows
SOURCE_FIELD = "retention_source"


def tag(rows: list[dict], source: str) -> list[dict]:
    """The rows with ids prefixed ``source/`` and the source in SOURCE_FIELD."""
    return [{**r, "id": f"{source}/{r['id']}", SOURCE_FIELD: source} for r in rows]


def source_of(ref_id: str) -> str:
    """The source of a pool row's id (the part before the first '/'); "untagged" for an id without one."""
    head, sep, _ = str(ref_id).partition("/")
    return head if sep else "untagged"


def sample(rows: list[dict], n: int, seed: int, source: str) -> list[dict]:
    """`n` rows of `rows`, the first n of a permutation seeded by (seed, source), kept in their file order."""
    order = list(range(len(rows)))
    random.Random(f"continual-retention-{seed}-{source}").shuffle(order)
    return [rows[i] for i in sorted(order[:n])]


def retainable(rows: list[dict]) -> list[dict]:
    """The rows a retention sample may draw from: not harmful pairs."""
    return [r for r in rows if not r.get("harmful_pair")]


def quota_of(name: str, per_stage: int | None, quotas: dict[str, int]) -> int:
    if name in quotas:
        return quotas[name]
    if per_stage is None:
        raise DualSelectError(f"continual.retention: stage {name!r} has no quota and retention.per_stage is not set")
    return per_stage


def retention_rows(stage_rows: dict[str, list[dict]], names: list[str], t: int, per_stage: int | None,
                   quotas: dict[str, int], seed: int) -> list[dict]:
    """The tagged retention sample of the stages before stage index t (names in stage order)."""
    out = []
    for name in names[:t]:
        n = quota_of(name, per_stage, quotas)
        rows = retainable(stage_rows[name])
        if n > len(rows):
            raise DualSelectError(f"continual.retention: {n} rows of stage {name!r} asked, but its training data has "
                                  f"{len(rows)} (harmful pairs excluded); lower the quota or retention.per_stage")
        out += tag(sample(rows, n, seed, name), name)
    return out


def safety_rows(rows: list[dict], quotas: dict[str, int], seed: int) -> list[dict]:
    """The tagged safety part of every pool: quotas['safety'] sampled rows, else all of them in order."""
    if SAFETY not in quotas:
        return tag(rows, SAFETY)
    n = quotas[SAFETY]
    if n > len(rows):
        raise DualSelectError(f"continual.retention.quotas.safety: {n} rows asked, but the safety pool "
                              f"(data.reference) has {len(rows)}")
    return tag(sample(rows, n, seed, SAFETY), SAFETY)


def pool_rows(safety: list[dict], stage_rows: dict[str, list[dict]], names: list[str], t: int,
              per_stage: int | None, quotas: dict[str, int], seed: int) -> list[dict]:
    """The reference pool of stage index t: the safety part, then the retention sample of the earlier stages."""
    return safety_rows(safety, quotas, seed) + retention_rows(stage_rows, names, t, per_stage, quotas, seed)


def counts_by_source(ids: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in ids:
        out[source_of(i)] = out.get(source_of(i), 0) + 1
    return out
