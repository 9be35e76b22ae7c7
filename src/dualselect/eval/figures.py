"""Pictures of a method comparison as PNG bytes, and one self-contained HTML page holding tables and plots.

    curves = {"dualselect seed 0": read_curves("runs/ds-s0"), "sft seed 0": read_curves("runs/sft-s0")}
    png = render_training_curves(curves)                  # task loss, reference loss, cos(g_T, g_R) over steps
    refs = read_refreshes("runs/ds-s0")                   # chosen reference ids of each refresh
    heat = render_reference_heatmap(refs, categories)     # refreshes x categories (or x the most chosen ids)
    ratio = render_metric_vs_ratio({"sft": [(0.01, 12.0, 9.5, 14.0), ...]}, "harmful ratio", "harmful score")
    page = html_page("Comparison", [("Results", markdown(report), [("training", png), ("refs", heat)])])

Inputs are a `dualselect train` run dir: metrics.jsonl (one record per optimiser step) and selection.jsonl
(selection events; "refresh" events carry the references chosen at a refresh). A truncated last line (a killed
run) is skipped; an unparseable line anywhere else is an error naming the file and the line.

All renderers are pure functions of plain data; matplotlib is used through its object API (Figure +
FigureCanvasAgg), never pyplot, so nothing needs a display.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dualselect.errors import DualSelectError

METRICS, SELECTION = "metrics.jsonl", "selection.jsonl"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OTHER = "other"  # the heatmap column of reference ids without a category
SMOOTH_MIN_POINTS = 20  # fewer task-loss points than this: no smoothing by default


# ------------------------------------------------------------------------------------------ reading run dirs

def read_records(path) -> list[dict]:
    """The JSON objects of a .jsonl file, one a line (blank lines skipped). An unparseable last line (a run
    killed while writing it) is dropped; an unparseable or non-object line elsewhere is a DualSelectError."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DualSelectError(f"{path}: unreadable ({e.__class__.__name__})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for i, (lineno, line) in enumerate(numbered):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(numbered) - 1:
                break  # truncated final line of a killed run
            raise DualSelectError(f"{path}:{lineno}: not valid JSON (only the last line may be cut short)") from None
        if not isinstance(rec, dict):
            raise DualSelectError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _number(rec: dict, key: str, where: str) -> float | None:
    """rec[key] as a float, None where absent or null; anything else is an error naming `where`."""
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DualSelectError(f"{where}: {key} is {value!r}, expected a number")
    return float(value)


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _metrics(train_dir: Path) -> list[dict]:
    path = train_dir / METRICS
    if not path.is_file():
        raise DualSelectError(f"{train_dir}: not a dualselect train run dir (no {METRICS})")
    rows = read_records(path)
    for i, rec in enumerate(rows):
        if not isinstance(rec.get("step"), int) or isinstance(rec.get("step"), bool):
            raise DualSelectError(f"{path}: record {i + 1} has no integer step")
    return sorted(rows, key=lambda r: r["step"])


def _selection(train_dir: Path) -> list[dict]:
    path = train_dir / SELECTION
    return read_records(path) if path.is_file() else []


def refresh_steps(events: Sequence[dict], metrics_rows: Sequence[dict]) -> list[float]:
    """The step at which each refresh event of `events` (selection.jsonl records, in file order) happened.

    A refresh is written just before the step it precedes, so it is placed at the step of the next "step" or
    "warmup" event after it (exact for every refresh mode); failing that, at the first train step of its epoch
    in metrics.jsonl; failing that, at its order (1, 2, ...)."""
    first_of_epoch: dict[int, int] = {}
    for rec in metrics_rows:
        if rec.get("phase", "train") == "train" and rec.get("epoch") is not None:
            first_of_epoch[rec["epoch"]] = min(rec["step"], first_of_epoch.get(rec["epoch"], rec["step"]))
    out, pending = [], []  # pending: positions in `out` waiting for the next step event
    for rec in events:
        kind = rec.get("kind")
        if kind == "refresh":
            pending.append(len(out))
            out.append(first_of_epoch.get(rec.get("epoch"), float(len(out) + 1)))
        elif kind in ("step", "warmup") and isinstance(rec.get("step"), (int, float)) and pending:
            for pos in pending:
                out[pos] = rec["step"]
            pending = []
    return [float(s) for s in out]


def read_curves(train_dir) -> dict:
    """The curves of one train run dir.

    Per train step (warm-up steps are left out; they are counted in "warmup_steps"): "step", "loss" (the task
    loss), "task_ref_cosine" (None where the method logs none). Per refresh (selection.jsonl "refresh" events):
    "refresh_step" (see refresh_steps), "reference_loss" (mean loss of the chosen references) and
    "candidate_reference_loss" (mean over all scored candidates; None where the event lists none)."""
    train_dir = Path(train_dir)
    rows = _metrics(train_dir)
    where = str(train_dir / METRICS)
    train = [r for r in rows if r.get("phase", "train") != "warmup"]
    events = _selection(train_dir)
    refreshes = [e for e in events if e.get("kind") == "refresh"]
    ref_loss, cand_loss = [], []
    for i, ev in enumerate(refreshes, 1):
        losses, cands = ev.get("losses"), (ev.get("candidates") or {}).get("losses")
        if not isinstance(losses, list) or (cands is not None and not isinstance(cands, list)):
            raise DualSelectError(f"{train_dir / SELECTION}: refresh {i} has no list of losses")
        ref_loss.append(_mean(losses))
        cand_loss.append(_mean(cands) if cands else None)
    return {
        "step": [r["step"] for r in train],
        "loss": [_number(r, "loss", f"{where} step {r['step']}") for r in train],
        "task_ref_cosine": [_number(r, "task_ref_cosine", f"{where} step {r['step']}") for r in train],
        "warmup_steps": len(rows) - len(train),
        "refresh_step": refresh_steps(events, rows),
        "reference_loss": ref_loss,
        "candidate_reference_loss": cand_loss,
    }


def read_refreshes(train_dir) -> list[list[str]]:
    """The reference ids chosen at each refresh, in order (empty for a run without refresh events)."""
    train_dir = Path(train_dir)
    out = []
    for i, ev in enumerate((e for e in _selection(train_dir) if e.get("kind") == "refresh"), 1):
        if not isinstance(ev.get("ids"), list):
            raise DualSelectError(f"{train_dir / SELECTION}: refresh {i} has no list of ids")
        out.append([str(x) for x in ev["ids"]])
    return out


def train_dir_of(eval_dir) -> Path | None:
    """The train run dir behind a `dualselect eval` output dir: the parent of the adapter its settings.json
    names (runs/x/adapter -> runs/x), when that dir holds a metrics.jsonl; else None (a base model, or a train
    dir moved or deleted since)."""
    try:
        settings = json.loads((Path(eval_dir) / "settings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    adapter = settings.get("model.adapter") if isinstance(settings, dict) else None
    if not isinstance(adapter, str) or not adapter:
        return None
    train = Path(adapter).parent
    return train if (train / METRICS).is_file() else None


NO_CUE = "no harm cue"  # the heatmap column of references whose prompt matches no harm cue


def reference_categories(train_dir) -> tuple[dict[str, str] | None, str]:
    """(reference id -> harm category, how it was found) of a train run's reference pool: its config.yaml's
    data.reference loaded again, each prompt's category the strongest harm cue of the prompt lexicon
    (eval.prompt_classifier.harm_category; NO_CUE where none matched). (None, the reason) when the pool
    cannot be loaded here (no reference, data moved, no data dir): the heatmap then shows reference ids."""
    from dualselect.config import load_config
    from dualselect.data import load_examples
    from dualselect.eval.prompt_classifier import LexiconPromptClassifier, harm_category
    from dualselect.methods import method_configs

    try:
        cfg = load_config(Path(train_dir) / "config.yaml", [], method_configs())
        if not cfg.data.reference:
            return None, "the run has no reference pool"
        examples, _ = load_examples(cfg.data.reference, data_dir=cfg.data.data_dir, fmt=cfg.data.format,
                                    columns=cfg.data.columns, limit=cfg.data.reference_limit)
    except DualSelectError as e:
        return None, f"reference pool not loadable here ({str(e).splitlines()[0]})"
    classifier = LexiconPromptClassifier()
    cats = {ex.id: harm_category(classifier.classify(ex.prompt)) or NO_CUE for ex in examples}
    return cats, f"harm category of the prompt ({classifier.id}), pool {cfg.data.reference}"


# ------------------------------------------------------------------------------------------ plain computations

def jaccard(a, b) -> float:
    """|A ∩ B| / |A ∪ B| of two id collections; 1.0 for two empty ones."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def refresh_overlap(refreshes: Sequence[Sequence[str]]) -> list[float]:
    """Jaccard overlap of each refresh with the one before it (n - 1 values)."""
    return [jaccard(refreshes[i - 1], refreshes[i]) for i in range(1, len(refreshes))]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start); window 1 returns the values."""
    if window < 1:
        raise DualSelectError(f"smoothing window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def row_labels(refreshes: Sequence) -> list[str]:
    return [f"refresh {i}" for i in range(1, len(refreshes) + 1)]


def category_counts(refreshes: Sequence[Sequence[str]], categories: dict[str, str]
                    ) -> tuple[list[str], list[str], list[list[int]]]:
    """(row labels, category labels, counts): counts[i][j] is how many references of category j refresh i
    chose. Categories in alphabetical order, ids missing from `categories` under "other" (last)."""
    labels = [[categories.get(r, OTHER) for r in refs] for refs in refreshes]
    found = {c for row in labels for c in row}
    cols = sorted(found - {OTHER}) + ([OTHER] if OTHER in found else [])
    counts = [Counter(row) for row in labels]
    return row_labels(refreshes), cols, [[c[col] for col in cols] for c in counts]


def id_indicator(refreshes: Sequence[Sequence[str]], top: int = 30
                 ) -> tuple[list[str], list[str], list[list[int]]]:
    """(row labels, ids, 0/1 matrix) over the `top` ids chosen most often (ties: first chosen first)."""
    if top < 1:
        raise DualSelectError(f"heatmap top must be >= 1, got {top}")
    freq = Counter(r for refs in refreshes for r in set(refs))
    first: dict[str, int] = {}
    for refs in refreshes:
        for r in refs:
            first.setdefault(r, len(first))
    cols = sorted(freq, key=lambda r: (-freq[r], first[r]))[:top]
    return row_labels(refreshes), cols, [[int(c in set(refs)) for c in cols] for refs in refreshes]


# ------------------------------------------------------------------------------------------ figures

def new_figure(width: float, height: float, dpi: int = 110):
    """A matplotlib Figure with an Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _points(xs, ys) -> tuple[list[float], list[float]]:
    """The (x, y) pairs of two parallel lists where y is a finite number."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def render_training_curves(curves_by_run: dict[str, dict], smooth: int | None = None) -> bytes:
    """Training curves of several runs (label -> read_curves dict) as PNG bytes: up to three panels over the
    step, sharing the x axis: task loss, the chosen references' mean loss at each refresh (with the mean over
    all candidates dotted), cos(g_T, g_R). Panels without data in any run are left out.

    smooth: moving-average window for the task loss (the raw curve stays, faint); None picks one: none below
    SMOOTH_MIN_POINTS points, else about a twentieth of the points."""
    series = {}
    for label, c in curves_by_run.items():
        series[label] = {
            "loss": _points(c.get("step", []), c.get("loss", [])),
            "ref": _points(c.get("refresh_step", []), c.get("reference_loss", [])),
            "cand": _points(c.get("refresh_step", []), c.get("candidate_reference_loss", [])),
            "cos": _points(c.get("step", []), c.get("task_ref_cosine", [])),
        }
    panels = [(key, title) for key, title in (("loss", "task loss"), ("ref", "reference loss (chosen, per refresh)"),
                                              ("cos", "cos(g_T, g_R)"))
              if any(s[key][0] for s in series.values())]
    if not panels:
        raise DualSelectError("training curves: no run has a task loss, reference loss or cosine to plot"
                              + (f" (runs: {', '.join(curves_by_run)})" if curves_by_run else " (no runs)"))
    fig = new_figure(7.0, 2.6 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, title) in zip(axes, panels):
        for i, (label, s) in enumerate(series.items()):
            color = f"C{i % 10}"
            xs, ys = s[key]
            if not xs:
                continue
            if key == "loss":
                window = smooth if smooth is not None else (
                    1 if len(ys) < SMOOTH_MIN_POINTS else max(1, len(ys) // SMOOTH_MIN_POINTS))
                if window > 1:
                    ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                    ax.plot(xs, moving_average(ys, window), color=color, label=f"{label} (mean of {window})")
                else:
                    ax.plot(xs, ys, color=color, label=label)
            elif key == "ref":
                ax.plot(xs, ys, color=color, marker="o", label=label)
                cx, cy = s["cand"]
                if cx:
                    ax.plot(cx, cy, color=color, marker="x", linestyle=":", alpha=0.7,
                            label=f"{label}, all candidates")
            else:
                ax.plot(xs, ys, color=color, label=label)
        if key == "cos":
            ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylabel({"loss": "loss", "ref": "loss", "cos": "cosine"}[key])
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return png_bytes(fig)


def _overlap_text(overlaps: Sequence[float], shown: int = 8) -> str:
    if not overlaps:
        return "a single refresh"
    values = ", ".join(f"{v:.2f}" for v in overlaps[:shown]) + (", ..." if len(overlaps) > shown else "")
    return f"overlap with previous: {values} (mean {sum(overlaps) / len(overlaps):.2f})"


def render_reference_heatmap(refreshes: Sequence[Sequence[str]], categories: dict[str, str] | None = None,
                             top: int = 30) -> bytes:
    """The references chosen at each refresh as a PNG heatmap, refreshes as rows. With `categories` (reference
    id -> label) the columns are categories and a cell counts the chosen references of that category
    (category_counts); without, the columns are the `top` ids chosen most often, cells 0/1 (id_indicator).
    The Jaccard overlap with the previous refresh is written beside each row and summed up in the title."""
    if not refreshes or not any(refreshes):
        raise DualSelectError("reference heatmap: no refresh chose any reference (a method without references?)")
    rows, cols, matrix = category_counts(refreshes, categories) if categories is not None \
        else id_indicator(refreshes, top)
    overlaps = refresh_overlap(refreshes)
    width = min(16.0, max(5.0, 2.5 + 0.32 * len(cols)))
    fig = new_figure(width, min(16.0, max(3.0, 1.6 + 0.32 * len(rows))))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, aspect="auto", cmap="viridis" if categories is not None else "Greys",
                      interpolation="nearest", vmin=0, vmax=None if categories is not None else 1)
    fig.colorbar(image, ax=ax, pad=0.8 / width, fraction=0.4 / width,  # room for the overlap text beside the rows
                 label="chosen references" if categories is not None else "chosen (1) or not (0)",
                 ticks=None if categories is not None else [0, 1])
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if categories is not None and len(rows) * len(cols) <= 400:
        top_value = max(max(r) for r in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="black" if v > top_value / 2 else "white")
    for i, v in enumerate(overlaps, 1):
        ax.text(1.01, 1 - (i + 0.5) / len(rows), f"J={v:.2f}", transform=ax.transAxes, fontsize=7, va="center")
    what = "by category" if categories is not None else f"the {len(cols)} most chosen references"
    ax.set_title(f"References chosen per refresh, {what}\n{_overlap_text(overlaps)}", fontsize=9)
    ax.set_xlabel("category" if categories is not None else "reference id")
    fig.tight_layout()
    return png_bytes(fig)


def render_metric_vs_ratio(points: dict[str, list[tuple[float, float, float | None, float | None]]],
                           xlabel: str, ylabel: str) -> bytes:
    """A metric against a ratio (e.g. harmful score vs harmful ratio) as PNG bytes: per method a line over its
    points sorted by x, with asymmetric error bars from (x, y, ci_low, ci_high) (plotted units; a None bound
    draws no bar on that side)."""
    fig = new_figure(6.4, 4.6)
    ax = fig.add_subplot()
    plotted = 0
    for i, (method, pts) in enumerate(points.items()):
        for p in pts:
            if len(p) != 4 or any(v is not None and not isinstance(v, (int, float)) for v in p) \
                    or p[0] is None or p[1] is None or not all(math.isfinite(v) for v in p if v is not None):
                raise DualSelectError(f"metric vs ratio, method {method}: point {p!r} is not (x, y, ci_low, ci_high) "
                                      "with finite numbers (bounds may be None)")
        if not pts:
            continue
        pts = sorted(pts, key=lambda p: p[0])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        low = [0.0 if lo is None else max(0.0, y - lo) for _, y, lo, _ in pts]
        high = [0.0 if hi is None else max(0.0, hi - y) for _, y, _, hi in pts]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="-o", capsize=4, color=f"C{i % 10}", label=method)
        plotted += 1
    if not plotted:
        raise DualSelectError(f"metric vs ratio ({ylabel} vs {xlabel}): no method has a point to plot")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs {xlabel}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


# ------------------------------------------------------------------------------------------ a report's run figures

TRAINING_PNG = "training_curves.png"


def run_figures(report: dict) -> tuple[list[tuple[str, str, bytes]], list[str]]:
    """The figures of a comparison report (eval.report.compare) drawn from its runs' train dirs: training
    curves of every method (its first seed) in one picture, and per method whose run refreshed a reference set
    the references chosen per refresh. Returns ([(file name, caption, PNG bytes)], notes on what was left out
    and why). Methods without a train dir (the aligned base model) are skipped."""
    curves, heatmaps, notes = {}, [], []
    for method, info in report["methods"].items():
        first = info["runs"][0]["dir"]
        train = train_dir_of(first)
        if train is None:
            notes.append(f"{method}: no train run dir behind {first}; no training curves")
            continue
        try:  # a damaged train log costs its figures, not the report
            curves[method] = read_curves(train)
            refreshes = read_refreshes(train)
        except DualSelectError as e:
            notes.append(f"{method}: {e}")
            continue
        if not refreshes or not any(refreshes):
            continue
        cats, how = reference_categories(train)
        heatmaps.append((f"references-{re.sub(r'[^A-Za-z0-9_.-]+', '-', method)}.png",
                         f"{method} (first seed, {train}): references chosen per refresh, "
                         + (f"by {how}" if cats is not None else f"by id; {how}"),
                         render_reference_heatmap(refreshes, cats)))
    figures = []
    if curves:
        try:
            figures.append((TRAINING_PNG, "training curves (first seed of each method): task loss, reference loss "
                            "at each refresh, cos(g_T, g_R)", render_training_curves(curves)))
        except DualSelectError as e:
            notes.append(f"training curves: {e}")
    return figures + heatmaps, notes


# ------------------------------------------------------------------------------------------ Markdown -> HTML

def markdown_html(text: str) -> str:
    """Our reports' Markdown (headings, paragraphs, lists, pipe tables, code) as HTML, through markdown-it-py
    (CommonMark plus tables). Raw HTML in the text is escaped, not passed through."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
section { margin-bottom: 2.5em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; white-space: nowrap; }
thead th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
code { background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
"""


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def html_page(title: str, sections: Sequence[tuple[str, str, Sequence[tuple[str, bytes]]]]) -> str:
    """One self-contained HTML page (inline CSS, PNGs as base64 data URIs): per section (heading, Markdown
    text, [(caption, PNG bytes), ...]) the heading, the text as HTML (markdown_html) and the figures."""
    body = []
    for n, (heading, text, images) in enumerate(sections, 1):
        parts = [f"<h2>{html.escape(heading)}</h2>", markdown_html(text or "")]
        for caption, png in images:
            if not isinstance(png, (bytes, bytearray)) or not bytes(png).startswith(PNG_SIGNATURE):
                raise DualSelectError(f"html page, section {n} ({heading!r}), figure {caption!r}: not PNG bytes")
            parts.append(f'<figure><img src="{png_data_uri(bytes(png))}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        body.append("<section>\n" + "\n".join(p for p in parts if p) + "\n</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n")
