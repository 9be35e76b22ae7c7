"""Which term decides DualSelect's task filter, read from a run's selection log: does it drop the harmful pairs
of a harmful-fine-tuning mix, and is that the loss term's doing or the gradient term's?

Every DualSelect step event logs its candidates (the mini-batch) with their losses and cosines to g_R, and the
samples it kept. From them, per step and with the run's own k_T / budget rule:

  kept               the samples the run kept (its score mu_T * loss - nu * cos, optionally standardised)
  loss only          the k_T candidates with the lowest loss (what nu = 0 would keep at that step)
  cosine only        the k_T candidates with the highest cosine to g_R (what mu_T = 0 would keep)

The counterfactual sets are per step, at the run's state (the same losses, cosines and g_R): they say which term
ranks the batch, not where a run with other settings would have gone. Each selection is order-based, so a
positive weight or a per-term standardisation does not change it; soft mode keeps the same samples as hard.
Reported: the share of harmful and of other candidates kept (actual, loss only, cosine only; chance = the
overall keep share), how much of the kept set each one-term rule shares, and the terms' spread within a batch
(mean standard deviation of mu_T * loss and of nu * cos; with score_norm zscore each term is standardised, so
they are mu_T and nu). On a label task (at most MAX_LABELS distinct targets among the candidates that are not
harmful pairs) also the target mix of each rule's kept task samples: keeping the lowest losses can keep mostly
the label the model already favours.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from statistics import mean, pstdev
from typing import Iterable

from ..errors import DualSelectError
from ..selection.dualselect import select_task
from .metrics import pct

MAX_LABELS = 10  # more distinct targets than this: free text, no target mix is reported


def _keep(values: list[float], k: int, tokens: list[int], budget: float | None) -> set[int]:
    """Positions of the candidates a hard, lowest-first rule keeps from `values` (the run's k_T or budget)."""
    return set(select_task(values, k, "hard", tokens=tokens, budget=budget).index)


def step_rows(events: Iterable[dict], harmful: set[str], k: int, budget: float | None, mu: float, nu: float,
              zscore: bool, targets: dict[str, str] | None = None) -> list[dict]:
    """Per step event: candidate ids, which are harmful, their targets (`targets`: id -> target text; None where
    unknown and for harmful pairs), and the kept positions (actual, loss only, cosine only); the terms' spread."""
    targets = targets or {}
    rows = []
    for ev in events:
        if ev.get("kind") != "step" or "candidates" not in ev:
            continue
        cand = ev["candidates"]
        ids, losses, cos = cand["ids"], cand["losses"], cand["cosines"]
        tokens = cand.get("tokens") or [1] * len(ids)
        where = {cid: i for i, cid in enumerate(ids)}
        missing = [i for i in ev["ids"] if i not in where]
        if missing:
            raise DualSelectError(f"step {ev.get('step')}: kept id {missing[0]!r} is not among its candidates")
        finite = all(math.isfinite(x) for x in [*losses, *cos])
        spread = (abs(mu), abs(nu)) if zscore else (abs(mu) * pstdev(losses), abs(nu) * pstdev(cos))
        flags = [cid in harmful for cid in ids]
        rows.append({
            "step": ev.get("step"), "n": len(ids), "harmful": flags,
            "targets": [None if h else targets.get(i) for i, h in zip(ids, flags)],  # the task samples' targets
            "kept": {where[i] for i in ev["ids"]},
            "loss_only": _keep(losses, k, tokens, budget) if finite else None,
            "cosine_only": _keep([-c for c in cos], k, tokens, budget) if finite else None,
            "loss_spread": spread[0], "cosine_spread": spread[1],
            "harmful_loss": [x for x, h in zip(losses, flags) if h],
            "other_loss": [x for x, h in zip(losses, flags) if not h],
            "harmful_cos": [x for x, h in zip(cos, flags) if h],
            "other_cos": [x for x, h in zip(cos, flags) if not h],
        })
    return rows


def _share(rows: list[dict], rule: str, harmful: bool) -> float | None:
    """Share of the (harmful or other) candidates that `rule` kept, over all steps."""
    kept = total = 0
    for r in rows:
        if r[rule] is None:
            continue
        for pos, h in enumerate(r["harmful"]):
            if h == harmful:
                total += 1
                kept += pos in r[rule]
    return kept / total if total else None


def _target_mix(rows: list[dict], rule: str | None) -> dict[str, float] | None:
    """Share of each target among the candidates `rule` kept (all candidates for None), over all steps; None
    without known targets, or when the candidates hold more than MAX_LABELS distinct targets (not a label task)."""
    if len({x for r in rows for x in r["targets"] if x is not None}) > MAX_LABELS:
        return None
    counts: dict[str, int] = {}
    for r in rows:
        if rule is not None and r[rule] is None:
            continue
        for pos, target in enumerate(r["targets"]):
            if target is not None and (rule is None or pos in r[rule]):
                counts[target] = counts.get(target, 0) + 1
    n = sum(counts.values())
    return {t: counts[t] / n for t in sorted(counts)} if n else None


def _agreement(rows: list[dict], rule: str) -> float | None:
    """Mean over steps of |kept & rule's set| / |kept|."""
    vals = [len(r["kept"] & r[rule]) / len(r["kept"]) for r in rows if r[rule] is not None and r["kept"]]
    return mean(vals) if vals else None


def summarize(rows: list[dict]) -> dict:
    """The filter's figures over a run's steps (see the module docstring); None where nothing was seen."""
    def avg(key: str) -> float | None:
        vals = [x for r in rows for x in r[key]]
        return mean(vals) if vals else None

    n = sum(r["n"] for r in rows)
    return {
        "steps": len(rows), "candidates": n, "harmful_candidates": sum(sum(r["harmful"]) for r in rows),
        "chance": sum(len(r["kept"]) for r in rows) / n if n else None,
        "kept_harmful": _share(rows, "kept", True), "kept_other": _share(rows, "kept", False),
        "loss_only_harmful": _share(rows, "loss_only", True), "loss_only_other": _share(rows, "loss_only", False),
        "cosine_only_harmful": _share(rows, "cosine_only", True),
        "cosine_only_other": _share(rows, "cosine_only", False),
        "agree_loss_only": _agreement(rows, "loss_only"), "agree_cosine_only": _agreement(rows, "cosine_only"),
        "loss_spread": mean(r["loss_spread"] for r in rows) if rows else None,
        "cosine_spread": mean(r["cosine_spread"] for r in rows) if rows else None,
        "harmful_loss": avg("harmful_loss"), "other_loss": avg("other_loss"),
        "harmful_cosine": avg("harmful_cos"), "other_cosine": avg("other_cos"),
        "targets": _target_mix(rows, None), "kept_targets": _target_mix(rows, "kept"),
        "loss_only_targets": _target_mix(rows, "loss_only"), "cosine_only_targets": _target_mix(rows, "cosine_only"),
    }


def read_rows(train_dir: str | Path) -> tuple[dict, list[dict]]:
    """(the run's filter settings, step_rows) of a DualSelect train dir (a run's, or its bench archive copy): its
    config.yaml (the k_T / budget rule, the weights, the data, whose harmful pairs are loaded to know their ids:
    the data directory must be readable) and selection.jsonl."""
    from ..config import load_config
    from ..data.mixing import load_task_examples
    from ..methods import method_configs
    from .figures import read_records

    train_dir = Path(train_dir)
    cfg = load_config(train_dir / "config.yaml", [], method_configs())
    if cfg.train.method != "dualselect":
        raise DualSelectError(f"{train_dir}: train.method is {cfg.train.method!r}, not dualselect")
    ds = cfg.method_args
    examples, _ = load_task_examples(cfg.data)
    harmful = {e.id for e in examples if e.meta.get("harmful_pair")}
    targets = {e.id: e.response.strip() for e in examples}
    path, packed = train_dir / "selection.jsonl", train_dir / "selection.jsonl.gz"  # a run's, or a bench archive's
    if path.exists():
        events = read_records(path)
    elif packed.exists():
        events = [json.loads(line) for line in gzip.decompress(packed.read_bytes()).decode().splitlines() if line]
    else:
        raise DualSelectError(f"{train_dir}: no selection.jsonl (or .jsonl.gz)")
    facts = {"k_task": ds.k_task, "budget": ds.budget, "mu_task": ds.mu_task, "nu": ds.nu, "rho": ds.rho,
             "score_norm": ds.score_norm}
    return facts, step_rows(events, harmful, ds.k_task, ds.budget, ds.mu_task, ds.nu, ds.score_norm == "zscore",
                            targets)


def read_run(train_dir: str | Path) -> dict:
    """summarize() of one DualSelect train dir (see read_rows)."""
    facts, rows = read_rows(train_dir)
    return {"label": str(train_dir), **facts, **summarize(rows)}


def read_method(label: str, train_dirs: list[Path]) -> dict:
    """summarize() of several runs of one method (its seeds), their steps pooled; their settings must agree."""
    read = [read_rows(d) for d in train_dirs]
    if any(facts != read[0][0] for facts, _ in read[1:]):
        raise DualSelectError(f"{label}: its runs ({', '.join(map(str, train_dirs))}) differ in their filter settings")
    return {"label": f"{label} ({len(read)} run{'s' if len(read) != 1 else ''})", **read[0][0],
            **summarize([r for _, rows in read for r in rows])}


def markdown(runs: list[dict]) -> str:
    def num(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| run | k_T | mu_T, nu | steps | harmful cand. | chance % | harmful kept %: run / loss only / "
             "cosine only | other kept %: run / loss only / cosine only | run's kept set shared with loss only / "
             "cosine only % | spread mu*loss / nu*cos | loss harmful / other | cos harmful / other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(
            f"| {r['label']} | {r['budget'] if r['budget'] is not None else r['k_task']} | {r['mu_task']:g}, "
            f"{r['nu']:g} | {r['steps']} | {r['harmful_candidates']} | {pct(r['chance'])} | "
            f"{pct(r['kept_harmful'])} / {pct(r['loss_only_harmful'])} / {pct(r['cosine_only_harmful'])} | "
            f"{pct(r['kept_other'])} / {pct(r['loss_only_other'])} / {pct(r['cosine_only_other'])} | "
            f"{pct(r['agree_loss_only'])} / {pct(r['agree_cosine_only'])} | {num(r['loss_spread'])} / "
            f"{num(r['cosine_spread'])} | {num(r['harmful_loss'])} / {num(r['other_loss'])} | "
            f"{num(r['harmful_cosine'])} / {num(r['other_cosine'])} |")
    return "\n".join(lines)


def targets_markdown(runs: list[dict]) -> str:
    """The target mix of the kept samples, one row per (run, target) of the runs on a label task ("" if none)."""
    lines = []
    for r in runs:
        if not r.get("targets"):
            continue
        for target, share in r["targets"].items():
            kept = [(r.get(key) or {}).get(target) for key in ("kept_targets", "loss_only_targets",
                                                                  "cosine_only_targets")]
            lines.append(f"| {r['label']} | {target} | {pct(share)} | {' / '.join(pct(x) for x in kept)} |")
    if not lines:
        return ""
    return "\n".join(["| run | target | of the candidates % | of the kept samples %: run / loss only / cosine only |",
                      "|---|---|---|---|", *lines])
