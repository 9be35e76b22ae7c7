"""Lisa's bi-state schedule as a pure function (no model): which optimiser steps are alignment steps
(batches of the alignment data) and which are fine-tuning steps (the task batches of plain SFT).

The run starts in the alignment state, as the authors' release does, and then alternates:
`align_steps` alignment steps, `task_steps` task steps, `align_steps` alignment steps, ... until every
task batch of the SFT plan has been used once, in the SFT order. The run always ends on a task step
(no alignment block after the last task batch). Alignment batches cycle through the alignment data:
each pass is a fresh seeded shuffle of range(n_align) cut into batches (the last batch of a pass may
be smaller), like a re-iterated random-sampler data loader."""

from __future__ import annotations

import random

from ..schedule import PlannedStep, plan_of


def alignment_batches(n_align: int, batch_size: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """`count` batches of positions in the alignment data, passes of seeded shuffles.

    The generator is seeded from `seed` but separate from the task plan's (a string seed: the task
    order of batch_plan(seed) is unchanged)."""
    if n_align < 1:
        raise ValueError("no alignment samples to train on")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rng = random.Random(f"lisa-alignment-{seed}")
    out: list[tuple[int, ...]] = []
    while len(out) < count:
        order = list(range(n_align))
        rng.shuffle(order)
        for start in range(0, n_align, batch_size):
            if len(out) == count:
                break
            out.append(tuple(order[start:start + batch_size]))
    return out


def bistate_plan(task_plan: list[PlannedStep], n_align: int, batch_size: int, align_steps: int, task_steps: int,
                 seed: int) -> list[PlannedStep]:
    """Interleave alignment blocks into the task plan.

    Task steps keep their ids, epoch and order (phase "train"); alignment steps get phase "align", ids
    that are positions in the alignment data, and the epoch of the task step that follows them.
    first_of_epoch / last_of_epoch are recomputed on the merged sequence."""
    if align_steps < 0:
        raise ValueError("align_steps must be >= 0")
    if task_steps < 1:
        raise ValueError("task_steps must be >= 1")
    n_blocks = -(-len(task_plan) // task_steps)  # one alignment block before every task block
    align = iter(alignment_batches(n_align, batch_size, n_blocks * align_steps, seed) if align_steps else [])
    raw: list[tuple[str, int, tuple[int, ...]]] = []
    for block in range(n_blocks):
        chunk = task_plan[block * task_steps:(block + 1) * task_steps]
        raw += [("align", chunk[0].epoch, next(align)) for _ in range(align_steps)]
        raw += [("train", t.epoch, t.ids) for t in chunk]
    return plan_of(raw)


def switch_steps(plan: list[PlannedStep]) -> list[int]:
    """Indices of the steps where the state changes (the first step of every block but the first)."""
    return [s.index for prev, s in zip(plan, plan[1:]) if s.phase != prev.phase]
