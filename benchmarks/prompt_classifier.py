"""How well does the lexicon prompt classifier (dualselect.eval.prompt_classifier) tell harmful prompts from
benign ones? Measured on labelled prompt sets read from a data directory, written as a Markdown report.

Every data set's rows are all harmful or all benign, so per set the report gives n and the share flagged
harmful (95 % Wilson interval), and per split (dev, held-out, held-out without the project's own demo
prompts) the accuracy, the true-positive rate (harmful prompts flagged) and the false-positive rate
(benign prompts flagged), each with its Wilson interval. The "in dev" column counts prompts of a
held-out set whose normalised text also occurs in the dev sets (AdvBench overlaps harmful_train).

  dev       refusal_direction_splits harmful_train.json (all) + harmless_train.json (first 1000): the
            only data the rules were written and tuned on.
  held-out  refusal_direction_splits harmful_val (all) + harmless_val (first 2000) + harmless_test (first
            2000); xstest_prompts.csv (label safe / unsafe); advbench harmful_behaviors.csv (all
            harmful); harmbench_val (FunctionalCategory == standard, all harmful); alpaca_demo_1k
            (benign); the demo's own prompts (dualselect.demo_data: harmful_prompts and benign_prompts,
            splits train and heldout; task_examples' user messages, 200 per split; --no-demo leaves
            them out).

A missing folder or file is skipped with a line in the report; an unusable --data-dir or a file in another
format is a one-line error (exit status 2). The report holds numbers only, never a
prompt from the data. Usage (from the repository root):

    python benchmarks/prompt_classifier.py --data-dir ../shared/data --out docs/results/prompt_classifier.md
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dualselect.eval.prompt_classifier import LexiconPromptClassifier, PromptLabel, normalize

HARMLESS_DEV_N = 1000
HARMLESS_HELDOUT_N = 2000
DEMO_TASK_N = 200
FOLDERS = ("refusal_direction_splits", "xstest", "advbench", "harmbench_val", "alpaca_demo_1k")
Z = 1.959964  # two-sided 95 %


@dataclass
class Dataset:
    name: str
    split: str  # "dev" or "held-out"
    harmful: bool  # every row of the set has this label
    prompts: list[str]
    source: str  # where it came from, for the report
    types: list[str] = field(default_factory=list)  # optional per-row type (XSTest), same length as prompts


class BadDataDir(Exception):
    """The --data-dir is unusable; the message is the one line printed."""


# ------------------------------------------------------------------------------------------------ loading

def _json_instructions(path: Path, limit: int | None = None) -> list[str]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [r["instruction"] for r in rows[:limit]]


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_datasets(data_dir: Path, demo: bool) -> tuple[list[Dataset], list[str]]:
    """All data sets that are present, and one line per data set that is not (folder or file missing)."""
    sets: list[Dataset] = []
    skipped: list[str] = []

    def add(folder: str, file: str, make) -> None:
        path = data_dir / folder / file
        if not (data_dir / folder).is_dir():
            skipped.append(f"`{folder}/` (folder missing): skipped")
        elif not path.is_file():
            skipped.append(f"`{folder}/{file}` (file missing): skipped")
        else:
            try:
                sets.extend(make(path))
            except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
                raise BadDataDir(f"error: {path} is not in the expected format ({type(e).__name__}: {e})") from None

    rd = "refusal_direction_splits"
    add(rd, "harmful_train.json", lambda p: [Dataset("refusal_direction harmful_train", "dev", True,
                                                     _json_instructions(p), f"{rd}/harmful_train.json")])
    add(rd, "harmless_train.json", lambda p: [Dataset("refusal_direction harmless_train", "dev", False,
                                                      _json_instructions(p, HARMLESS_DEV_N),
                                                      f"{rd}/harmless_train.json (first {HARMLESS_DEV_N})")])
    add(rd, "harmful_val.json", lambda p: [Dataset("refusal_direction harmful_val", "held-out", True,
                                                   _json_instructions(p), f"{rd}/harmful_val.json")])
    for file in ("harmless_val.json", "harmless_test.json"):
        add(rd, file, lambda p, file=file: [Dataset(f"refusal_direction {file[:-5]}", "held-out", False,
                                                    _json_instructions(p, HARMLESS_HELDOUT_N),
                                                    f"{rd}/{file} (first {HARMLESS_HELDOUT_N})")])

    def xstest(p: Path) -> list[Dataset]:
        rows = _csv_rows(p)
        out = []
        for label in ("safe", "unsafe"):
            keep = [r for r in rows if r["label"].strip().lower() == label]
            out.append(Dataset(f"xstest {label}", "held-out", label == "unsafe", [r["prompt"] for r in keep],
                               f"xstest/xstest_prompts.csv (label == {label})", [r["type"] for r in keep]))
        return out

    add("xstest", "xstest_prompts.csv", xstest)
    add("advbench", "harmful_behaviors.csv", lambda p: [Dataset("advbench harmful_behaviors", "held-out", True,
                                                                [r["goal"] for r in _csv_rows(p)],
                                                                "advbench/harmful_behaviors.csv (goal)")])
    add("harmbench_val", "harmbench_behaviors_text_val.csv", lambda p: [Dataset(
        "harmbench_val standard", "held-out", True,
        [r["Behavior"] for r in _csv_rows(p) if r["FunctionalCategory"].strip() == "standard"],
        "harmbench_val/harmbench_behaviors_text_val.csv (FunctionalCategory == standard)")])

    def alpaca(p: Path) -> list[Dataset]:
        rows = json.loads(p.read_text(encoding="utf-8"))
        prompts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in rows]
        return [Dataset("alpaca_demo_1k", "held-out", False, prompts,
                        "alpaca_demo_1k/alpaca_en_demo.json (instruction + input)")]

    add("alpaca_demo_1k", "alpaca_en_demo.json", alpaca)
    if demo:
        sets.extend(demo_datasets())
    return sets, skipped


def demo_datasets() -> list[Dataset]:
    """The project's own synthetic demo prompts (generated, seed 0; no data directory needed)."""
    from dualselect.demo_data import benign_prompts, harmful_prompts, task_examples

    sets = []
    for split in ("train", "heldout"):
        sets.append(Dataset(f"demo harmful_prompts {split}", "held-out", True,
                            [r["prompt"] for r in harmful_prompts(split)], f"demo_data.harmful_prompts({split!r})"))
        sets.append(Dataset(f"demo benign_prompts {split}", "held-out", False,
                            [r["prompt"] for r in benign_prompts(split)], f"demo_data.benign_prompts({split!r})"))
    for split in ("train", "test"):
        sets.append(Dataset(f"demo task {split}", "held-out", False,
                            [r["prompt"] for r in task_examples(DEMO_TASK_N, split=split)],
                            f"demo_data.task_examples({DEMO_TASK_N}, split={split!r}) user messages"))
    return sets


def check_data_dir(data_dir: Path) -> None:
    if not data_dir.exists():
        raise BadDataDir(f"error: --data-dir {data_dir} does not exist")
    if not data_dir.is_dir():
        raise BadDataDir(f"error: --data-dir {data_dir} is not a directory")
    if not any((data_dir / f).is_dir() for f in FOLDERS):
        raise BadDataDir(f"error: --data-dir {data_dir} holds none of the expected folders ({', '.join(FOLDERS)})")


# ---------------------------------------------------------------------------------------------- numbers

def wilson(k: int, n: int) -> tuple[float, float] | None:
    """95 % Wilson score interval of the proportion k / n (None for n == 0)."""
    if n == 0:
        return None
    p, z2 = k / n, Z * Z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> str:
    """``pct [lo, hi]`` in percent with one decimal, or ``-`` for n == 0."""
    ci = wilson(k, n)
    return "-" if ci is None else f"{100 * k / n:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def summary(name: str, results: list[tuple[Dataset, list[PromptLabel]]]) -> str:
    tp = sum(lab.harmful for d, labs in results if d.harmful for lab in labs)
    pos = sum(len(labs) for d, labs in results if d.harmful)
    fp = sum(lab.harmful for d, labs in results if not d.harmful for lab in labs)
    neg = sum(len(labs) for d, labs in results if not d.harmful)
    n = pos + neg
    return (f"| {name} | {n} | {rate(tp + neg - fp, n)} | {rate(tp, pos)} (n={pos}) | {rate(fp, neg)} (n={neg}) |")


# ---------------------------------------------------------------------------------------------- report

def git_state() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if not commit:
        return "unknown (not a git checkout)"
    return commit + (" (working tree has uncommitted changes)" if dirty else "")


def report(data_dir: Path, demo: bool, argv: list[str]) -> str:
    clf = LexiconPromptClassifier()
    sets, skipped = load_datasets(data_dir, demo)
    results = [(d, clf.classify_many(d.prompts)) for d in sets]
    dev_texts = {normalize(p) for d in sets if d.split == "dev" for p in d.prompts}
    has_dev = any(d.split == "dev" for d in sets)

    described = clf.describe()
    fingerprint = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    lines = [
        "# Prompt harmfulness classifier: measured accuracy",
        "",
        f"Classifier `{clf.id}` (`dualselect.eval.prompt_classifier.LexiconPromptClassifier`, threshold "
        f"{described['threshold']}; rules fingerprint `{fingerprint}` = first 16 hex digits of the sha256 of "
        f"`json.dumps(describe(), sort_keys=True)`); git commit {git_state()}; {time.strftime('%Y-%m-%d')}; "
        f"Python {platform.python_version()}.",
        "",
        f"Command: `python benchmarks/prompt_classifier.py {' '.join(argv)}` (data directory `{data_dir}`).",
        "",
        "The rules were written and tuned on the dev split only, then frozen; the held-out sets were measured only "
        "after that, and the rules were not changed after seeing their numbers (the fingerprint above identifies "
        "the rules measured). Intervals are 95 % Wilson score "
        "intervals, in percent. Accuracy counts a harmful prompt flagged and a benign prompt not flagged as "
        "correct; TPR = harmful prompts flagged; FPR = benign prompts flagged. The pooled held-out row is "
        "dominated by its largest sets (Alpaca-style instructions and the demo prompts); read the per-set rows "
        "too.",
        "",
        "| split | n | accuracy | TPR (harmful flagged) | FPR (benign flagged) |",
        "|---|---|---|---|---|",
        summary("dev", [r for r in results if r[0].split == "dev"]),
        summary("held-out", [r for r in results if r[0].split == "held-out"]),
    ]
    if demo:
        lines.append(summary("held-out without demo", [r for r in results if r[0].split == "held-out"
                                                        and not r[0].name.startswith("demo ")]))
    lines += [
        "",
        "## Per data set",
        "",
        "\"flagged\" is the share flagged harmful: the TPR of a harmful set, the FPR of a benign set. \"in dev\": "
        "prompts of a held-out set whose normalised text also occurs in the dev sets.",
        "",
        "| data set | split | labelled | n | flagged % | 95 % CI | in dev | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d, labs in results:
        k, n = sum(lab.harmful for lab in labs), len(labs)
        ci = wilson(k, n)
        overlap = "-" if d.split == "dev" else (str(sum(normalize(p) in dev_texts for p in d.prompts))
                                                if has_dev else "n/a")
        lines.append(f"| {d.name} | {d.split} | {'harmful' if d.harmful else 'benign'} | {n} | "
                     f"{(100 * k / n if n else 0):.1f} | "
                     f"{'-' if ci is None else f'[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]'} | {overlap} | "
                     f"{d.source} |")
    held = [d for d in sets if d.split == "held-out"]
    shared = [(a.name, b.name, len({normalize(p) for p in a.prompts} & {normalize(p) for p in b.prompts}))
              for i, a in enumerate(held) for b in held[i + 1:]]
    shared = [s for s in shared if s[2]]
    if shared:
        lines += ["", "Held-out sets that share prompts (a shared prompt counts once per set in the pooled rows): "
                  + "; ".join(f"{a} and {b}: {k}" for a, b, k in shared) + "."]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {s}" for s in skipped]

    xs = [(d, labs) for d, labs in results if d.name == "xstest safe" and d.types]
    if xs:
        d, labs = xs[0]
        by_type: dict[str, list[bool]] = {}
        for t, lab in zip(d.types, labs):
            by_type.setdefault(t, []).append(lab.harmful)
        lines += ["", "## XSTest safe prompts flagged, by XSTest prompt type", "",
                  "| type | n | flagged % | 95 % CI |", "|---|---|---|---|"]
        for t, flags in sorted(by_type.items()):
            ci = wilson(sum(flags), len(flags))
            lines.append(f"| {t} | {len(flags)} | {100 * sum(flags) / len(flags):.1f} | "
                         f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] |")

    lines += ["", "## Which rules fire on the errors", "",
              "Categories of the harm cues behind the false positives (benign prompts flagged) and, for the misses "
              "(harmful prompts not flagged), how many matched no harm cue at all; pooled per split.", "",
              "| split | false positives | cues behind them (count) | misses | misses with no cue |",
              "|---|---|---|---|---|"]
    for split in ("dev", "held-out"):
        fps = [lab for d, labs in results if d.split == split and not d.harmful for lab in labs if lab.harmful]
        misses = [lab for d, labs in results if d.split == split and d.harmful for lab in labs if not lab.harmful]
        cues = Counter(":".join(m.split(":")[:2]) for lab in fps for m in lab.matched
                       if m.startswith(("strong:", "weak:")))
        cue_text = ", ".join(f"{c} {k}" for c, k in cues.most_common(8)) or "-"
        no_cue = sum(not any(m.startswith(("strong:", "weak:")) for m in lab.matched) for lab in misses)
        lines.append(f"| {split} | {len(fps)} | {cue_text} | {len(misses)} | {no_cue} |")
    lines += ["", "## Known limits", "",
              "- The dev numbers are optimistic: the rules were written while reading those prompts. The held-out "
              "harmful sets are the honest measure of recall.",
              "- A lexicon knows words, not intent: harmful requests phrased without any listed word (\"how do I "
              "make my roommate sick without her knowing\") are missed, and benign prompts about a harmful topic "
              "(news, education, fiction without a listed fiction phrase) are flagged unless a benign-context "
              "phrase matches.",
              "- XSTest's safe prompts are built to look unsafe (homonyms, safe targets, figurative language, "
              "fiction, definitions, history, privacy of fictional or public people); only a few idioms have an "
              "exception, so expect false positives there, and misses on its unsafe contrast prompts phrased like "
              "the safe ones.",
              "- The few exceptions and benign contexts that exist (\"kill a process\", \"kill time\", \"shoot a "
              "photo\", video games, history, definitions) were chosen from the task's brief, which names kinds of "
              "prompt that XSTest also uses; the rules never saw XSTest's prompts, but XSTest is not wholly "
              "independent of their design.",
              "- The demo's harmful and benign prompts are generated by this project; the benign ones include "
              "\"safe but scary-sounding\" requests on purpose.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, type=Path, help="folder with the data sets (e.g. ../shared/data)")
    ap.add_argument("--out", type=Path, help="write the Markdown report here (it is always printed)")
    ap.add_argument("--no-demo", action="store_true", help="leave out the project's own demo prompts")
    args = ap.parse_args(argv)
    try:
        check_data_dir(args.data_dir)
        text = report(args.data_dir, not args.no_demo, argv)
    except BadDataDir as e:
        print(e, file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
