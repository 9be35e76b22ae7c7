"""Offline DualSelect selection (`dualselect select`): score a whole task set once, without training.

The training-time algorithm refreshes its references once per epoch against a task direction built
by warm-up steps. Here nothing is trained, so the task direction d_T is the mean per-sample gradient
of the task set at the starting model (data.task on model.name_or_path + model.init_adapter). Then:
one reference refresh (the same code as training: running top-K_R, scores and selection logged),
and every task sample is scored s_i = mu_T * loss(i) - nu * cos(g(i), g_R); the lowest-scoring
fraction `keep` of the whole set is written out. Cost: two per-sample passes over the task set
(d_T, then scores) and one over the references; memory: one chunk of gradients plus K_R.

Note: at a fresh LoRA initialisation the B matrices are zero, so only B gradients are non-zero;
start from an adapter (model.init_adapter) for directions that cover the whole LoRA space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig, dump_yaml
from .errors import DualSelectError
from .logs import write_jsonl
from .methods.dualselect import DualSelect
from .selection.dualselect import cosines, select_task, task_scores


@dataclass
class SelectResult:
    run_dir: Path
    scores_path: Path
    kept_path: Path
    n_scored: int
    n_kept: int


def _per_sample(method: DualSelect, chunk: int):
    """Yield (position, loss, tokens, grad) over the task set, a chunk at a time."""
    task = method.ctx.task
    for start in method.ctx.progress(range(0, len(task), chunk), desc="task", total=math.ceil(len(task) / chunk)):
        out = method.per_sample_grads(task[start:start + chunk])
        for j in range(len(out.losses)):
            yield start + j, float(out.losses[j]), int(out.tokens[j]), out.grads[j]


def select(cfg: RunConfig, keep: float = 0.5) -> SelectResult:
    from .train import build, default_run_dir

    if cfg.train.method != "dualselect":
        raise DualSelectError("select scores with DualSelect: set train.method=dualselect")
    if not 0 < keep <= 1:
        raise DualSelectError(f"--keep must be in (0, 1], got {keep}")
    if not cfg.data.task or not cfg.data.reference:
        raise DualSelectError("select needs data.task and data.reference")
    run_dir = Path(cfg.train.output_dir) if cfg.train.output_dir else default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    setup = build(cfg, run_dir)
    setup.ctx.selection_log.truncate(0)
    method = DualSelect(cfg.method_args, setup.ctx)
    chunk, a = cfg.method_args.ref_chunk, cfg.method_args

    total = torch.zeros_like(method.d_t)
    for _, _, _, g in _per_sample(method, chunk):
        total += g
    method.d_t = total / len(setup.ctx.task)
    method.refresh(epoch=1)

    rows = []
    for pos, loss, tokens, g in _per_sample(method, chunk):
        cos = float(cosines(g[None], method.g_r)[0])
        rows.append({"id": setup.ctx.task[pos].id, "loss": loss, "cosine": cos, "tokens": tokens})
    scores = task_scores([r["loss"] for r in rows], [r["cosine"] for r in rows], a.mu_task, a.nu)
    chosen = select_task(scores, math.ceil(keep * len(rows)), "hard")
    kept_ids = {rows[i]["id"] for i in chosen.index}
    for r, s in zip(rows, scores.tolist()):
        r.update(score=s, kept=r["id"] in kept_ids)

    by_id = {e.id: e for e in setup.ctx.task_examples}
    kept_rows = [{"id": rows[i]["id"], "messages": by_id[rows[i]["id"]].messages, **by_id[rows[i]["id"]].meta}
                 for i in sorted(chosen.index)]
    scores_path, kept_path = run_dir / "task_scores.jsonl", run_dir / "selected_task.jsonl"
    write_jsonl(scores_path, rows)
    write_jsonl(kept_path, kept_rows)
    return SelectResult(run_dir, scores_path, kept_path, len(rows), len(kept_rows))
