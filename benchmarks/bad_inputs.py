"""What `dualselect` prints for bad inputs: runs the cases of tests/unit/test_bad_inputs.py (the same list,
the same runner) with the tiny random model and writes a Markdown table of case, command and the error line.

Every case must exit with status 2, print exactly one `error: ` line (the last line of stderr) holding the
expected text, and leave nothing in its directory (its output directory included); a case that does not is
listed under "Problems" and the script exits with status 1. Usage (from the repository root):

    python benchmarks/bad_inputs.py --out docs/results/bad_inputs.md
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES_FILE = REPO / "tests" / "unit" / "test_bad_inputs.py"

DECISIONS = """\
## Decisions

- **A 50 MB single line** (`single-50mb-line`) fails at once: a JSONL line longer than 8 Mi characters
  (`dualselect.data.records.MAX_LINE_CHARS`) is an error raised after reading that much of it, so a file without
  line breaks or a runaway record is neither parsed nor tokenized whole. Before, such a line loaded and the run
  trained: 42 s with the tiny model on a busy 2-core CPU (the 50 MB text is parsed and tokenized whole, then
  truncated to `data.max_length`).
- **Some empty responses** are not an error: those records are counted and skipped (`n_skipped_empty` in
  run_info.json; test `test_some_empty_responses_are_counted_and_skipped`). All of them empty is an error
  (`all-responses-empty`, `reference-pool-all-empty`).
- **A failed command leaves nothing behind**: `train`, `select`, `eval` and `report` remove what they created in
  their output directory when they fail (the directory itself if they made it). Kept: a training run that wrote
  its config.yaml (it started; `--resume` continues it) and an evaluation whose samples.jsonl holds answers (the
  same command resumes).
- **Options anywhere**: options may stand between the overrides (`dualselect train a=1 --quiet b=2`); argparse
  rejected that before ("unrecognized arguments").
- **Negative k, small pools**: `dualselect.k_task` / `random.k_task` = 0 keeps the whole batch (the no-filter
  ablation), a negative value is an error; a reference pool smaller than `dualselect.k_ref` is an error (a
  refresh would keep every reference and select nothing).
"""


def load_cases():
    spec = importlib.util.spec_from_file_location("bad_input_cases", CASES_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is made
    spec.loader.exec_module(module)
    return module


def tiny_model_dir(dest: Path) -> Path:
    """The tests' tiny random Llama with the SmolLM2 tokenizer, saved as a model directory."""
    from dualselect.models import DEFAULT_MODEL, load_tokenizer, tiny_llama

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    tiny_llama(len(tokenizer), seed=0).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/results/bad_inputs.md", help="Markdown file to write")
    args = p.parse_args()

    m = load_cases()
    rows, failures = [], []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
        model_dir = tiny_model_dir(Path(tmp) / "tiny-model")
        for case in m.CASES:
            outcome = m.run_case(case, Path(tmp) / "cases" / case.id, model_dir)
            wrong = m.problems(case, outcome)
            last = outcome.stderr.strip().splitlines() or [f"(nothing; exit status {outcome.code})"]
            line = outcome.error_line or last[-1]
            line = line.replace(str(model_dir), "TINY")
            shown = " ".join([case.verb] + ([case.config] if case.config else []) + list(case.args))
            rows.append(f"| {case.id} | {cell('dualselect ' + shown)} | {cell(line)} |")
            if wrong:
                failures.append(f"- {case.id}: {'; '.join(wrong)}")
            print(f"{'ok  ' if not wrong else 'FAIL'} {case.id}: {line}", file=sys.__stdout__)

    common = "\n".join(f"- `{verb}`: `{' '.join(opts).replace(m.MODEL, 'TINY')}`" for verb, opts in m.COMMON.items())
    text = f"""# Bad inputs: what the command line prints

Each case runs `dualselect` in-process in a fresh directory of its own (paths are relative to it), with the
tiny random Llama of the unit tests as the model (`TINY`). Every case exits with status 2, prints exactly one
line starting with `error: ` (the last line of stderr; cases that get as far as loading the model may print
log and progress lines before it) and leaves no file behind, output directory included. The same cases are the
test `tests/unit/test_bad_inputs.py`; this file is written by `python benchmarks/bad_inputs.py`
({len(m.CASES)} cases, {time.time() - t0:.0f} s on {platform.platform()}, Python {platform.python_version()},
{time.strftime('%Y-%m-%d')}).

Besides the arguments shown, every command gets the options of its verb (placed after the YAML config, before
the case's own arguments):

{common}

| case | command | error line |
|---|---|---|
""" + "\n".join(rows) + "\n\n" + DECISIONS
    if failures:
        text += "\n## Problems\n\n" + "\n".join(failures) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"{len(m.CASES)} cases, {len(failures)} with problems -> {out}", file=sys.__stdout__)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
