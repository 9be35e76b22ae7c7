"""The report of a continual run (continual.json -> report.md, report.html and PNG figures): per method the
accuracy matrix as a heatmap, average accuracy and backward transfer (forgetting), safety after every stage,
and the references DualSelect's refreshes chose per source."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .errors import DualSelectError
from .eval import figures
from .eval.metrics import interval_text, pct
from .eval.report import MIN_SEEDS, cell_text, p_text, short_name
from .logs import write_atomic

REPORT_MD, REPORT_HTML = "report.md", "report.html"
MATRIX_PNG, FORGETTING_PNG, SAFETY_PNG = "accuracy_matrix.png", "forgetting.png", "safety_per_stage.png"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), "|" + "|".join("---" for _ in header) + "|", *(_row(r) for r in rows)]


def _signed(cell: dict | None) -> str:
    if not cell or cell["value"] is None:
        return "-"
    return pct(cell["value"], True) + (f" {interval_text(cell['ci95'], True)}" if cell["ci95"] else "")


def _count(mean: float) -> str:
    """A mean count over seeds, to one decimal (40, 37.7, 2.3)."""
    return f"{mean:.1f}".removesuffix(".0")


def markdown(result: dict) -> str:
    stages = [s["name"] for s in result["stages"]]
    methods = result["methods"]
    seeds = result["seeds"]
    warn = f" ({result['warning']}: read the intervals with care)" if result.get("warning") else ""
    lines = [f"# Continual learning: {' -> '.join(stages)}", "",
             (f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}){warn}; means over "
              "seeds in percent with 95 % intervals (bootstrap over seeds, then prompts). a[i][j] = accuracy on "
              "task j after stage i; average accuracy = mean of the last row; BWT (backward transfer) = mean over "
              "j < T of a[T][j] - a[j][j] (negative: forgetting)."), ""]
    safety = result["safety_benchmarks"]
    header = ["method", "average accuracy", "BWT (points)"]
    header += [f"{short_name(b)} {'refusal' if k == 'harmful' else 'over-refusal'} (last stage)"
               for b, k in safety.items()]
    rows = []
    for m, info in methods.items():
        row = [m, cell_text(info["average_accuracy"]), _signed(info["bwt"])]
        row += [cell_text(info["safety"][b]["per_stage"][-1]) for b in safety]
        rows.append(row)
    lines += ["## Summary", "", *_table(header, rows), ""]
    if result.get("start"):
        tasks = result["task_benchmarks"]
        lines += ["## Start model", "",
                  ("The aligned model the chains start from, before any stage (one evaluation on the same prompts: "
                   "intervals over prompts only); one row per start model (its weights' sha256, 12 digits)."), ""]
        rows = [[st["aligned_sha256"], *(cell_text(st["values"].get(b)) for b in [*tasks, *safety]),
                 ", ".join(st["chains"]) or "-"] for st in result["start"]]
        lines += [*_table(["start model", *(f"{stages[j]} accuracy" for j in range(len(tasks))),
                           *(f"{short_name(b)} {'refusal' if k == 'harmful' else 'over-refusal'}"
                             for b, k in safety.items()), "chains started from it"], rows), ""]

    lines += ["## Accuracy matrix", "", "Rows: after training stage i; columns: task j.", ""]
    for m, info in methods.items():
        rows = [[f"after {stages[i]}", *(cell_text(c) for c in row), *(["."] * (len(stages) - len(row)))]
                for i, row in enumerate(info["accuracy"])]
        lines += [f"### {m}", "", *_table(["", *stages], rows), ""]

    lines += ["## Forgetting per task", "", "a[T][j] - a[j][j] in points (negative: the task was forgotten).", ""]
    rows = [[m, *(_signed(c) for c in info["forgetting"]), _signed(info["bwt"])] for m, info in methods.items()]
    lines += [*_table(["method", *stages[:-1], "BWT"], rows), ""]

    if safety:
        lines += ["## Safety per stage", "", ("Refusal on held-out harmful prompts (higher is safer) and over-refusal "
                                              "on benign prompts (lower is better), after every stage."), ""]
        rows = [[m, short_name(b), "refusal" if kind == "harmful" else "over-refusal",
                 *(cell_text(c) for c in info["safety"][b]["per_stage"])]
                for m, info in methods.items() for b, kind in safety.items()]
        lines += [*_table(["method", "benchmark", "metric", *(f"after {s}" for s in stages)], rows), ""]

    refs = [(m, r) for m, info in methods.items() for r in info.get("references", [])]
    if refs:
        sources = sorted({s for _, r in refs for s in r["mean_by_source"]})
        lines += ["## References chosen per source", "",
                  ("Per refresh of the methods that refresh a reference set: the chosen references by source (the "
                   "prefix of their ids: safety, or the earlier stage they were retained from), mean over seeds."), ""]
        rows = [[m, r["stage"], str(r["refresh"]), *(_count(r["mean_by_source"].get(s, 0)) for s in sources),
                 ", ".join(f"{t} {_count(n)}" for t, n in r.get("mean_by_target", {}).items()) or "-"]
                for m, r in refs]
        lines += [*_table(["method", "stage", "refresh", *sources, "retained rows by target"], rows), ""]

    answers = [(m, a) for m, info in methods.items() for a in info.get("answers", [])]
    if answers:
        tasks = list(dict.fromkeys(a["benchmark"] for _, a in answers))
        lines += ["## Most frequent answer", "",
                  ("Per label task, after every stage: the share of its test prompts given the most frequent answer "
                   "(mean over seeds, in percent) and, per seed, that answer and its share. Near 100: the model "
                   "answers one label whatever the input, which accuracy alone does not show."), ""]
        cells = {(m, a["stage"], a["benchmark"]): a for m, a in answers}
        rows = [[m, stage, *(_answer_text(cells.get((m, stage, b))) for b in tasks)]
                for m, stage in dict.fromkeys((m, a["stage"]) for m, a in answers)]
        lines += [*_table(["method", "after stage", *(short_name(b) for b in tasks)], rows), ""]

    if result.get("comparisons"):
        lines += ["## Paired differences", "",
                  ("Method minus baseline in points, the training seed as the unit: the mean of the per-seed "
                   "differences (same seed: same stage data and retention sample), a 95 % t interval and the paired "
                   "t-test's p-value (df = seeds - 1); where every seed gave the same difference t is undefined and "
                   "the exact sign-flip test over seeds stands in, with no interval. Over-refusal: lower is better; "
                   "the others: higher."), ""]
        rows = [[c["method"], c["baseline"], metric, _signed({"value": t["mean_difference"], "ci95": t["ci95"]})
                 if t["mean_difference"] is not None else "-", p_text(t["p_value"]), t["test"] or "-"]
                for c in result["comparisons"] for metric, t in c["metrics"].items()]
        lines += [*_table(["method", "baseline", "metric", "difference [95 % CI]", "p", "test"], rows), ""]

    notes = [f"stage {s['name']}: {s['n_train']} training rows of {s['task']} ({s['n_harmful_pairs']} harmful pairs); "
             f"test {s['benchmark']}" + (f"; pool {s['pool']['by_source']}" if s.get("pool") else "")
             + (f"; replay retains {s['replay']['by_source']}" if s.get("replay") else "") for s in result["stages"]]
    notes += [f"{m}: {' '.join(o)}" for m, o in result["method_overrides"].items()]
    r = result["retention"]
    notes.append(f"retention: per_stage {r['per_stage']}, quotas {r['quotas'] or '-'}, seed {r['seed']}")
    if len(seeds) < MIN_SEEDS:
        notes.append(f"fewer than {MIN_SEEDS} seeds")
    notes += result.get("notes", [])
    if note := start_models_note(result):
        notes.append(note + ".")
    lines += ["## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def start_models_note(result: dict) -> str | None:
    """Which aligned weights each (method, seed) chain started from, when not all the same one."""
    from .bench_archive import start_models_note as note

    seeds = result["seeds"]
    return note({f"{m} s{seed}": sha for m, summary in result["methods"].items()
                 for seed, sha in zip(seeds, summary.get("aligned_sha256") or [None] * len(seeds))}, "chains")


def _answer_text(a: dict | None) -> str:
    """Mean share of the most frequent answer, then each seed's answer and its share, e.g. 67.3 (positive 50.5,
    negative 76.5)."""
    if a is None:
        return "-"
    seeds = ", ".join(f"{x['answer']} {100 * x['share']:.1f}" for x in a["per_seed"])
    return f"{100 * a['mean_share']:.1f} ({seeds})"


def _value(cell: dict | None) -> float:
    return math.nan if not cell or cell["value"] is None else 100 * cell["value"]


def render_accuracy_matrices(result: dict) -> bytes:
    """One heatmap per method: mean accuracy a[i][j] (percent) after stage i (rows) on task j (columns)."""
    stages = [s["name"] for s in result["stages"]]
    methods = result["methods"]
    n = len(methods)
    fig = figures.new_figure(min(20.0, 2.4 + 2.6 * n), 2.2 + 0.6 * len(stages))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for col, (ax, (m, info)) in enumerate(zip(axes, methods.items())):
        grid = [[_value(row[j]) if j < len(row) else math.nan for j in range(len(stages))] for row in info["accuracy"]]
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                            color="black" if v > 50 else "white")
        ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(stages)), [f"after {s}" for s in stages] if col == 0 else [], fontsize=7)
        ax.set_title(m, fontsize=9)
    fig.colorbar(image, ax=list(axes), label="accuracy (%)", fraction=0.03)
    fig.suptitle("Accuracy matrix: task (columns) after each stage (rows), mean over seeds", fontsize=9)
    return figures.png_bytes(fig)


def render_forgetting(result: dict) -> bytes:
    """Backward transfer per method (points) with its 95 % interval."""
    methods = result["methods"]
    fig = figures.new_figure(max(4.0, 1.0 + 1.1 * len(methods)), 3.6)
    ax = fig.add_subplot()
    for i, (m, info) in enumerate(methods.items()):
        cell = info["bwt"]
        if cell["value"] is None:
            continue
        y = 100 * cell["value"]
        lo, hi = cell["ci95"] or (cell["value"], cell["value"])
        ax.bar(i, y, color=f"C{i % 10}")
        ax.errorbar(i, y, yerr=[[max(0.0, y - 100 * lo)], [max(0.0, 100 * hi - y)]], color="black", capsize=4)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(methods)), list(methods), rotation=30, fontsize=8)
    ax.set_ylabel("BWT (points; < 0: forgetting)")
    ax.set_title("Backward transfer per method, mean over seeds, 95 % intervals", fontsize=9)
    fig.tight_layout()
    return figures.png_bytes(fig)


def render_safety(result: dict) -> bytes:
    """Per safety benchmark a panel: its metric after every stage, one line per method, 95 % intervals."""
    stages = [s["name"] for s in result["stages"]]
    safety = result["safety_benchmarks"]
    if not safety:
        raise DualSelectError("no safety benchmarks (eval.benchmarks of kind harmful or overrefusal)")
    fig = figures.new_figure(min(18.0, 1.0 + 4.2 * len(safety)), 3.8)
    axes = fig.subplots(1, len(safety), squeeze=False)[0]
    for ax, (b, kind) in zip(axes, safety.items()):
        for i, (m, info) in enumerate(result["methods"].items()):
            cells = info["safety"][b]["per_stage"]
            xs = [k for k, c in enumerate(cells) if c["value"] is not None]
            ys = [100 * cells[k]["value"] for k in xs]
            low = [max(0.0, y - 100 * (cells[k]["ci95"] or [cells[k]["value"]] * 2)[0]) for k, y in zip(xs, ys)]
            high = [max(0.0, 100 * (cells[k]["ci95"] or [cells[k]["value"]] * 2)[1] - y) for k, y in zip(xs, ys)]
            ax.errorbar(xs, ys, yerr=[low, high], fmt="-o", capsize=3, color=f"C{i % 10}", label=m)
        ax.set_xticks(range(len(stages)), [f"after {s}" for s in stages], rotation=30, fontsize=7)
        ax.set_ylabel(("refusal rate" if kind == "harmful" else "over-refusal") + " (%)")
        ax.set_ylim(-3, 103)
        ax.set_title(short_name(b), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return figures.png_bytes(fig)


def write_report(result: dict, out_dir) -> dict:
    """report.md, the PNG figures and report.html (the text and every figure on one page) into out_dir, each
    written atomically after all were rendered. Returns {"markdown": text, "report": path, "html": path,
    "figures": [(caption, path)]}."""
    out = Path(out_dir)
    text = markdown(result)
    shown = [(MATRIX_PNG, "accuracy matrix per method (mean over seeds, %)", render_accuracy_matrices(result)),
             (FORGETTING_PNG, "backward transfer (forgetting) per method", render_forgetting(result))]
    if result["safety_benchmarks"]:
        shown.append((SAFETY_PNG, "safety after every stage", render_safety(result)))
    title = "Continual learning: " + " -> ".join(s["name"] for s in result["stages"])
    page = figures.html_page(title, [("Continual learning", text, [(cap, png) for _, cap, png in shown])])
    for name, _, png in shown:
        write_atomic(out / name, png)
    write_atomic(out / REPORT_MD, text)
    write_atomic(out / REPORT_HTML, page)
    return {"markdown": text, "report": out / REPORT_MD, "html": out / REPORT_HTML,
            "figures": [(cap, out / name) for name, cap, _ in shown]}
