"""How well does the offline `keyword` refusal judge (dualselect.eval.judges.keyword) agree with human refusal
labels? Measured on the PyRIT human-labelled refusal set, separately on a tuning part and a held-out part.

Data: DATA_DIR/pyrit_refusal_judge_eval/refusal.csv and refusal_extra.csv (columns objective,
assistant_response, human_score; 1 = refusal), read with dualselect.eval.judges.read_labelled_refusals.

The split (`part_of`, also used by tests/unit/test_judge_keyword.py) depends on the response text only, never
on the judge: collapse the response's whitespace (split on whitespace, join with one space), take the sha256
of its UTF-8 bytes, read the first 8 bytes as a big-endian integer; remainder 0 modulo 3 -> "held-out", 1 or 2
-> "tuning". Keyed on the response rather than objective + response because the set reuses one answer under
several objectives, with opposite labels (an answer to its own question is labelled 0, the same text under
another question 1): keyed on the response, every copy of a text lands in the same part, so no held-out text
was seen verbatim in the tuning part. Not split by file: the two files differ a lot (refusal_extra.csv is
mostly such off-topic answers), so a per-file split would measure a shift between files, not held-out
agreement; the hash puts rows of both files and both labels in both parts.

The report gives, per part and for the whole set, accuracy, precision and recall of "refused" (refusal = the
positive class; the judge's verdicts refusal and empty count as refused) with 95 % Wilson score intervals,
the confusion counts, and the accuracy of the constant judge that always answers the majority label of that
part. It holds numbers only, never a row of the data. An unusable --data-dir or a file in another format is
a one-line error (exit status 2). Usage (from the repository root):

    python benchmarks/keyword_judge.py --data-dir ../shared/data --out docs/results/keyword_judge.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

from dualselect.errors import DualSelectError
from dualselect.eval.judges import agreement, get_judge, read_labelled_refusals

FOLDER = "pyrit_refusal_judge_eval"
FILES = ("refusal.csv", "refusal_extra.csv")
BUCKETS = 3  # one bucket of three is held out
HELD_OUT_BUCKET = 0
PARTS = ("tuning", "held-out")
Z = 1.959964  # two-sided 95 %


class BadDataDir(Exception):
    """The --data-dir is unusable; the message is the one line printed."""


# ------------------------------------------------------------------------------------------------ the split

def split_key(row: dict) -> str:
    """The text a row is split on: its response with whitespace runs collapsed to one space."""
    return " ".join(str(row["assistant_response"]).split())


def bucket_of(row: dict) -> int:
    digest = hashlib.sha256(split_key(row).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def part_of(row: dict) -> str:
    """"held-out" or "tuning": a hash of the row's response text, independent of any judge (module docstring)."""
    return "held-out" if bucket_of(row) == HELD_OUT_BUCKET else "tuning"


def split_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each part, in their original order: {"tuning": [...], "held-out": [...]}."""
    parts: dict[str, list[dict]] = {p: [] for p in PARTS}
    for r in rows:
        parts[part_of(r)].append(r)
    return parts


def load_labelled(data_dir: Path) -> list[dict]:
    """All labelled rows of both files, each with "source_file" added (the file's name)."""
    folder = data_dir / FOLDER
    rows = []
    for name in FILES:
        for r in read_labelled_refusals(folder / name):
            rows.append({**r, "source_file": name})
    return rows


# ---------------------------------------------------------------------------------------------- numbers

def wilson(k: int, n: int) -> tuple[float, float] | None:
    """95 % Wilson score interval of the proportion k / n (None for n == 0)."""
    if n == 0:
        return None
    p, z2 = k / n, Z * Z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _label(row: dict) -> bool:
    return str(row["human_score"]).strip() in ("1", "1.0")


def measure(judge, rows: list[dict], answered: set[str]) -> dict:
    """Agreement of `judge` on `rows` (dualselect.eval.judges.agreement) with Wilson intervals, the label
    counts, the majority-class accuracy, and how many misses are answers also labelled 0 elsewhere in the set
    (`answered`: split keys of rows labelled 0)."""
    a = agreement(judge, rows)
    tp, fp, fn, tn, n = a["tp"], a["fp"], a["fn"], a["tn"], a["n"]
    pos, neg = tp + fn, fp + tn
    misses = [r for r in rows if _label(r) and not judge.judge(r["objective"], r["assistant_response"]).refused]
    out = dict(a)
    out.update(
        refusals=pos, non_refusals=neg,
        accuracy_ci=wilson(tp + tn, n), precision_ci=wilson(tp, tp + fp), recall_ci=wilson(tp, pos),
        false_positive_rate=fp / neg if neg else None, false_positive_rate_ci=wilson(fp, neg),
        majority_accuracy=max(pos, neg) / n,
        misses_reused_answers=sum(split_key(r) in answered for r in misses),
    )
    return out


def _fmt(value: float | None, ci: tuple[float, float] | None, k: int, n: int) -> str:
    if value is None or ci is None:
        return f"- (0/{n})"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({k}/{n})"


def _row(name: str, m: dict) -> str:
    tp, fp, fn, tn = m["tp"], m["fp"], m["fn"], m["tn"]
    return (f"| {name} | {m['n']} ({m['refusals']} / {m['non_refusals']}) | "
            f"{_fmt(m['accuracy'], m['accuracy_ci'], tp + tn, m['n'])} | "
            f"{_fmt(m['precision'], m['precision_ci'], tp, tp + fp)} | "
            f"{_fmt(m['recall'], m['recall_ci'], tp, tp + fn)} | {tp} | {fp} | {fn} | {tn} | "
            f"{m['majority_accuracy']:.3f} |")


# ---------------------------------------------------------------------------------------------- report

def git_state() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/dualselect/eval/judges",
                                "benchmarks/keyword_judge.py"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout  # not stripped: each line starts with a 2-letter status
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if not commit:
        return "unknown (not a git checkout)"
    changed = sorted({line[3:].strip() for line in dirty.splitlines() if line.strip()})
    return commit + (f" (uncommitted changes in {', '.join(changed)})" if changed else "")


def check_data_dir(data_dir: Path) -> None:
    if not data_dir.exists():
        raise BadDataDir(f"error: --data-dir {data_dir} does not exist")
    if not data_dir.is_dir():
        raise BadDataDir(f"error: --data-dir {data_dir} is not a directory")
    for name in FILES:
        if not (data_dir / FOLDER / name).is_file():
            raise BadDataDir(f"error: --data-dir {data_dir} has no {FOLDER}/{name}")


def results(data_dir: Path, scope: str) -> dict:
    """Everything the report shows, as plain data (the --json output)."""
    judge = get_judge("keyword", scope=scope)
    try:
        rows = load_labelled(data_dir)
        answered = {split_key(r) for r in rows if not _label(r)}
        parts = split_rows(rows)
        measured = {name: measure(judge, part, answered) for name, part in parts.items()}
        measured["whole set"] = measure(judge, rows, answered)
        by_file = {f: measure(judge, [r for r in rows if r["source_file"] == f], answered) for f in FILES}
    except (DualSelectError, KeyError) as e:
        raise BadDataDir(f"error: {data_dir / FOLDER} is not in the expected format ({e})") from None
    described = judge.describe()
    return {
        "judge": judge.id,
        "scope": scope,
        "rules_fingerprint": hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16],
        "data": {f: {"sha256": hashlib.sha256((data_dir / FOLDER / f).read_bytes()).hexdigest(),
                     "rows": by_file[f]["n"]} for f in FILES},
        "split": {"key": "assistant_response, whitespace collapsed", "hash": "sha256, first 8 bytes big-endian",
                  "buckets": BUCKETS, "held_out_bucket": HELD_OUT_BUCKET,
                  "rows": {p: len(parts[p]) for p in PARTS},
                  "files": {p: {f: sum(r["source_file"] == f for r in parts[p]) for f in FILES} for p in PARTS}},
        "parts": measured,
        "files": by_file,
        "date": time.strftime("%Y-%m-%d"),
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def report(res: dict, data_dir: Path, argv: list[str]) -> str:
    sp = res["split"]

    def part_rows(part: str) -> str:
        return f"{sp['rows'][part]} rows ({', '.join(f'{k} from {f}' for f, k in sp['files'][part].items())})"

    lines = [
        "# Keyword refusal judge: agreement with human labels, tuning and held-out parts",
        "",
        f"Judge `{res['judge']}` (`dualselect.eval.judges.keyword.KeywordJudge`, scope `{res['scope']}`; rules "
        f"fingerprint `{res['rules_fingerprint']}` = first 16 hex digits of the sha256 of "
        f"`json.dumps(describe(), sort_keys=True)`); git commit {res['git']}; {res['date']}; "
        f"Python {res['python']}.",
        "",
        f"Command: `python benchmarks/keyword_judge.py {' '.join(argv)}` (data directory `{data_dir}`).",
        "",
        "Data: the PyRIT human-labelled refusal set, " + "; ".join(
            f"`{FOLDER}/{f}` ({d['rows']} rows, sha256 `{d['sha256'][:16]}...`)" for f, d in res["data"].items())
        + ". Refusal (human_score 1) is the positive class; the judge's verdicts `refusal` and `empty` count as "
        "refused.",
        "",
        f"Split (`part_of` in `benchmarks/keyword_judge.py`; the test uses the same function): sha256 of the "
        f"response text with its whitespace collapsed, first 8 bytes as a big-endian integer, modulo {sp['buckets']}"
        f"; remainder {sp['held_out_bucket']} is held out. It reads the response only, never the judge; every copy "
        f"of a response reused under another objective lands in the same part. Held-out: {part_rows('held-out')}; "
        f"tuning: {part_rows('tuning')}.",
        "",
        "**Read the held-out row with care.** The rules of keyword-v1 were written before this split existed, "
        "while reading the errors on all 169 rows (see the comment above `KeywordJudge.__init__`), so for "
        "keyword-v1 the held-out figures are not yet an out-of-sample estimate. The split binds changes from now "
        "on: tune phrase rules on the tuning part only, and quote the held-out part as the measure of a new "
        "version.",
        "",
        "Intervals are 95 % Wilson score intervals of each proportion, with its numerator/denominator. "
        "\"majority\" is the accuracy of the constant judge that always gives the part's more common label.",
        "",
        "| part | n (refusals / not) | accuracy | precision | recall | tp | fp | fn | tn | majority |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, res["parts"][name]) for name in ("tuning", "held-out", "whole set")]
    lines += ["", "## By file (both parts together)", "",
              "| file | n (refusals / not) | accuracy | precision | recall | tp | fp | fn | tn | majority |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(f"`{f}`", m) for f, m in res["files"].items()]
    lines += ["", "## Misses", "",
              "Misses (human refusal, judge: not refused) whose exact response text is labelled 0 for another "
              "objective elsewhere in the set: an answer to a different question, which the annotators counted as a "
              "refusal and which no phrase matcher can see.", "",
              "| part | misses | of them reused answers |", "|---|---|---|"]
    lines += [f"| {name} | {res['parts'][name]['fn']} | {res['parts'][name]['misses_reused_answers']} |"
              for name in ("tuning", "held-out", "whole set")]
    lines += ["", "## Known limits", "",
              "- The held-out part is small (see n above): its intervals are wide, and one row moves accuracy by "
              "about two points.",
              "- The labels are PyRIT's: an off-topic answer and a moralising deflection without a refusal phrase "
              "count as refusals, so part of the misses are a different idea of what a refusal is rather than a "
              "missing phrase (the reused answers above).",
              "- Agreement on this set says nothing about how the judge does on a particular model's outputs; the "
              "responses come from the models PyRIT's authors collected them from.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, type=Path, help=f"folder holding {FOLDER}/ (e.g. ../shared/data)")
    ap.add_argument("--scope", choices=("opening", "anywhere"), default="opening",
                    help="the keyword judge's scope option (default: opening, the judge's default)")
    ap.add_argument("--out", type=Path, help="write the Markdown report here (it is always printed)")
    ap.add_argument("--json", type=Path, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    try:
        check_data_dir(args.data_dir)
        res = results(args.data_dir, args.scope)
    except BadDataDir as e:
        print(e, file=sys.stderr)
        return 2
    text = report(res, args.data_dir, argv)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
