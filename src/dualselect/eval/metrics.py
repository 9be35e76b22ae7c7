"""Pure metric functions of the evaluation harness: rates, task graders, bootstrap intervals, the table.

Graders take a model response and the gold answer and return (correct, prediction); the prediction is what
was read from the response (None when nothing usable was found) and is stored with each sample.

    grade_label("It is Positive.", "positive", ["positive", "negative"])   # (True, "positive")
    grade_number("3 + 4 = 7, so 7 apples.", "7")                          # (True, "7")
    grade_exact(" Paris. ", "paris")                                       # (True, "paris")
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

GRADERS = ("label", "number", "exact")


# ------------------------------------------------------------------------------------------ rates

def mean(flags: Sequence[bool | float]) -> float | None:
    """Mean of 0/1 flags (or numbers); None for no values."""
    return float(sum(float(f) for f in flags) / len(flags)) if len(flags) else None


def refusal_rate(refused: Sequence[bool]) -> float | None:
    """Share of responses judged refused. Harmful prompts: higher is safer; benign prompts: the
    over-refusal rate, lower is better."""
    return mean(refused)


def attack_success_rate(refused: Sequence[bool]) -> float | None:
    """1 - refusal rate on harmful prompts (the keyword-judge attack success of the fine-tuning-attack line)."""
    rate = refusal_rate(refused)
    return None if rate is None else 1.0 - rate


def accuracy(correct: Sequence[bool]) -> float | None:
    return mean(correct)


# ------------------------------------------------------------------------------------------ graders

def _word_pattern(label: str) -> re.Pattern:
    # the label as a whole word: no letter/digit directly before or after ("Sci/Tech", "positive")
    return re.compile(rf"(?<![^\W_]){re.escape(label)}(?![^\W_])", re.IGNORECASE)


def find_label(response: str, labels: Sequence[str]) -> str | None:
    """The label word of `labels` that occurs first in `response` (case-insensitive, whole words; at equal
    positions the longer label wins), returned as spelled in `labels`; None if no label occurs."""
    best: tuple[int, int, str] | None = None
    for label in labels:
        m = _word_pattern(label).search(response or "")
        if m and (best is None or (m.start(), -len(label)) < best[:2]):
            best = (m.start(), -len(label), label)
    return None if best is None else best[2]


def grade_label(response: str, gold: str, labels: Sequence[str]) -> tuple[bool, str | None]:
    pred = find_label(response, labels)
    return (pred is not None and pred.lower() == gold.strip().lower()), pred


_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?")


def _clean_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").replace("+", "")


def last_number(text: str) -> str | None:
    """The last number written in `text` ("1,234" -> "1234", "$5" -> "5", "-3.5"), or None."""
    found = _NUMBER.findall(text or "")
    return _clean_number(found[-1]) if found else None


def gold_number(answer: str) -> str | None:
    """The gold number of an answer: what follows '####' (GSM8K), else the answer's last number."""
    answer = str(answer)
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    return last_number(answer)


def numbers_equal(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=1e-6)
    except ValueError:
        return False


def grade_number(response: str, gold: str) -> tuple[bool, str | None]:
    """GSM8K rule: the last number in the response equals the gold number (after '####' if present)."""
    pred = last_number(response)
    target = gold_number(gold)
    return (pred is not None and target is not None and numbers_equal(pred, target)), pred


def normalise_answer(text: str) -> str:
    """Lower case, whitespace collapsed, final punctuation (.!?,;:) removed."""
    text = re.sub(r"\s+", " ", str(text or "").lower()).strip()
    return text.rstrip(".!?,;:").strip()


def grade_exact(response: str, gold: str) -> tuple[bool, str | None]:
    pred = normalise_answer(response)
    return pred == normalise_answer(gold), pred


# ------------------------------------------------------------------------------------------ intervals

def bootstrap_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (resampling prompts with replacement);
    None for no values. Deterministic for a given seed."""
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        return None
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("resamples must be >= 1 and confidence in (0, 1)")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------ the table

TABLE_COLUMNS = ("benchmark", "kind", "n", "metric", "value", "95% CI", "unparseable %", "overlap excluded")


def pct(x: float | None, signed: bool = False) -> str:
    """A fraction in percent with one decimal ("-" for None); signed: with a leading + or -."""
    return "-" if x is None else f"{100 * x:{'+' if signed else ''}.1f}"


def interval_text(ci, signed: bool = False) -> str:
    """A 95% interval (fractions) as "[lo, hi]" in percent; "-" for none."""
    return "-" if not ci else f"[{pct(ci[0], signed)}, {pct(ci[1], signed)}]"


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows {benchmark, kind, n, metric, value, ci, unparseable, overlap_excluded} (value, ci and the
    unparseable share as fractions; unparseable None where no judge reads the answers) -> a Markdown table
    with values in percent."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for r in rows:
        ci = r.get("ci")
        cells = [r["benchmark"], r["kind"], str(r["n"]), r["metric"] + " %", pct(r.get("value")),
                 interval_text(ci), pct(r.get("unparseable")),
                 str(r.get("overlap_excluded", 0))]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
