"""Bad inputs through the command line: every case ends with one clear error line on stderr (what is wrong,
where: the file and the line or record, and how to fix it), exit status 2, and nothing left behind (the
case's directory, which holds its output directory and is the working directory, gains no file).

The cases run in-process (`dualselect.cli.main`) with the tiny random model, each in a directory of its
own made by its `setup`; commands use paths relative to that directory. CASES is shared with
benchmarks/bad_inputs.py, which writes the table of cases and their error lines to docs/results/bad_inputs.md.

Decisions recorded here:
- A JSONL line longer than 8 Mi characters (records.MAX_LINE_CHARS) is an error, raised after reading that
  much of it: a 50 MB single line fails at once with a size message instead of being parsed and tokenized.
- Some records with an empty response are counted and skipped (run_info.json: n_skipped_empty); all of them
  empty is an error.
- dualselect.k_task=0 is the no-filter ablation; a negative k_task is an error, and so is a reference pool
  smaller than dualselect.k_ref (a refresh would keep every reference, selecting nothing).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dualselect.cli import main

MODEL = "{model}"  # replaced by the tiny model directory
# Options every case of a verb gets before its own arguments (its own come later, so they win).
COMMON = {
    "train": (f"model.name_or_path={MODEL}", "model.precision=fp32", "model.device=cpu", "train.max_steps=1",
              "train.output_dir=out", "--quiet"),
    "select": (f"model.name_or_path={MODEL}", "model.precision=fp32", "model.device=cpu", "train.output_dir=out",
               "--quiet"),
    "eval": (f"model.name_or_path={MODEL}", "model.precision=fp32", "model.device=cpu", "eval.output_dir=out",
             "--quiet"),
    "report": ("--out", "out"),
}
HUGE_LINE_BYTES = 50_000_000


@dataclass(frozen=True)
class Case:
    id: str
    verb: str
    args: tuple[str, ...]  # after the common options of the verb
    expect: tuple[str, ...]  # substrings of the error line: what is wrong, where, how to fix it
    setup: Callable[[Path, Path], None] | None = None  # (case dir, tiny model dir): writes the inputs
    config: str | None = None  # a YAML config file, the first argument
    max_seconds: float | None = None  # the command must fail within this time

    def argv(self, model_dir: Path | str = MODEL) -> list[str]:
        head = [self.verb] + ([self.config] if self.config else [])
        return [a.replace(MODEL, str(model_dir)) for a in head + list(COMMON.get(self.verb, ())) + list(self.args)]


# ------------------------------------------------------------------------------------------ inputs


def _chat(i: int, answer: str | None = None) -> dict:
    return {"id": f"t{i}", "messages": [{"role": "user", "content": f"What is {i} plus 3?"},
                                        {"role": "assistant", "content": str(i + 3) if answer is None else answer}]}


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def files(**contents: str | bytes | list) -> Callable[[Path, Path], None]:
    """A setup writing files: text, bytes, or a list of rows (written as JSONL). A name ending in '/' is an
    empty directory; '__' in a name stands for '/'."""
    def setup(d: Path, model_dir: Path) -> None:
        for name, content in contents.items():
            path = d / name.replace("__", "/")
            if isinstance(content, list):
                content = _jsonl(content)
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif content == "/":
                path.mkdir()
            else:
                path.write_text(content)
    return setup


GOOD = [_chat(i) for i in range(6)]
REFS = [{**_chat(100 + i), "id": f"r{i}"} for i in range(3)]
DUALSELECT = ("train.method=dualselect", "data.task=task.jsonl", "data.reference=refs.jsonl", "dualselect.k_ref=2")


def _huge_line(d: Path, model_dir: Path) -> None:
    """One 50 MB JSONL record (a long response), written in pieces."""
    with open(d / "huge.jsonl", "wb") as fh:
        fh.write(b'{"prompt": "Summarise this.", "response": "')
        chunk = b"word " * 200_000
        for _ in range(HUGE_LINE_BYTES // len(chunk)):
            fh.write(chunk)
        fh.write(b'"}\n')


def _model_without_chat_template(d: Path, model_dir: Path) -> None:
    """The tiny model's tokenizer with its chat template removed (weights linked, not copied)."""
    dest = d / "nochat-model"
    dest.mkdir()
    for f in model_dir.iterdir():
        if f.name == "chat_template.jinja":
            continue
        if f.suffix == ".safetensors":
            (dest / f.name).symlink_to(f)
        else:
            shutil.copy(f, dest / f.name)
    tok_cfg = dest / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text())
    cfg.pop("chat_template", None)
    tok_cfg.write_text(json.dumps(cfg))
    (d / "task.jsonl").write_text(_jsonl(GOOD))


CASES: list[Case] = [
    # ---- data files
    Case("data-file-missing", "train", ("data.task=missing.jsonl",), ("missing.jsonl: file not found",)),
    Case("data-file-empty", "train", ("data.task=empty.jsonl",),
         ("empty.jsonl: no records (the file is empty)", "check that this is the data"), files(**{"empty.jsonl": ""})),
    Case("data-file-only-blank-lines", "train", ("data.task=blank.jsonl",),
         ("blank.jsonl: no records",), files(**{"blank.jsonl": "\n  \n\n"})),
    Case("data-unknown-extension", "train", ("data.task=data.txt",),
         ("data.txt: unknown file extension", "supported: .jsonl, .json, .csv"), files(**{"data.txt": "hello\n"})),
    Case("data-path-is-a-directory", "train", ("data.task=somedir",),
         ("somedir: is a directory, not a data file",), files(**{"somedir": "/"})),
    Case("jsonl-content-in-a-json-file", "train", ("data.task=records.json",),
         ("records.json:2: invalid JSON", "name the file .jsonl"), files(**{"records.json": GOOD[:2]})),
    Case("json-array-in-a-jsonl-file", "train", ("data.task=array.jsonl",),
         ("array.jsonl:1: expected a JSON object, got list",), files(**{"array.jsonl": json.dumps(GOOD) + "\n"})),
    Case("invalid-json-on-line-3", "train", ("data.task=bad.jsonl",),
         ("bad.jsonl:3: invalid JSON", "of line 3", "fix the line or remove it"),
         files(**{"bad.jsonl": _jsonl(GOOD[:2]) + '{"id": "t9", "messages": [\n' + _jsonl(GOOD[2:])})),
    Case("columns-not-recognised", "train", ("data.task=cols.jsonl",),
         ("cols.jsonl:1: cannot detect the data format from the columns (question, answer)", "data.columns="),
         files(**{"cols.jsonl": [{"question": "2+2?", "answer": "4"}]})),
    Case("prompt-only-file-as-training-data", "train", ("data.task=prompts.jsonl",),
         ("prompts.jsonl:1: records have a prompt but no response column", "data.columns={response: COLUMN}",
          "eval.benchmarks"), files(**{"prompts.jsonl": [{"prompt": "Hi"}, {"prompt": "Bye"}]})),
    Case("field-missing-in-record-2", "train", ("data.task=partial.jsonl",),
         ("partial.jsonl:2: no 'response' column for prompt_completion format (columns: prompt)",),
         files(**{"partial.jsonl": [{"prompt": "a", "response": "b"}, {"prompt": "c"}]})),
    Case("all-responses-empty", "train", ("data.task=noanswers.jsonl",),
         ("noanswers.jsonl: all 3 records have an empty prompt or response", "fill in the prompt or response"),
         files(**{"noanswers.jsonl": [_chat(i, answer="") for i in range(3)]})),
    Case("not-utf8-on-line-2", "train", ("data.task=latin1.jsonl",),
         ("latin1.jsonl: not UTF-8 text at line 2", "save the file as UTF-8"),
         files(**{"latin1.jsonl": _jsonl(GOOD[:1]).encode() + b'{"messages": [{"role": "user", "content": "caf\xe9?"}, '
                  b'{"role": "assistant", "content": "oui"}]}\n'})),
    Case("single-50mb-line", "train", ("data.task=huge.jsonl",),
         ("huge.jsonl:1: line 1 is longer than 8,388,608 characters", "one JSON object per line"), _huge_line,
         max_seconds=15),
    Case("unknown-chat-role", "train", ("data.task=roles.jsonl",),
         ("roles.jsonl:2: 'messages' must be a list of {role, content}", "message 1 has role 'human'",
          "rename it to 'user'"),
         files(**{"roles.jsonl": [GOOD[0], {"id": "h", "messages": [{"role": "human", "content": "hi"},
                                                                     {"role": "assistant", "content": "hello"}]}]})),
    Case("chat-message-without-content", "train", ("data.task=nocontent.jsonl",),
         ("nocontent.jsonl:1: 'messages' must be a list", "message 2 has no 'content'"),
         files(**{"nocontent.jsonl": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}]})),
    Case("duplicate-ids", "train", ("data.task=dup.jsonl",),
         ("dup.jsonl:3: duplicate id 't1' (first at dup.jsonl:2)", "give every record its own id"),
         files(**{"dup.jsonl": [GOOD[0], GOOD[1], GOOD[1]]})),
    Case("csv-row-with-extra-field", "train", ("data.task=rows.csv",),
         ("rows.csv: record 2 (line 3): 3 fields, but the header has 2 (prompt, completion)",),
         files(**{"rows.csv": "prompt,completion\nhi,hello\nbye,see you,later\n"})),
    Case("bad-data-with-the-default-run-dir", "train", ("data.task=bad.jsonl", "train.output_dir=null"),
         ("bad.jsonl:1: invalid JSON",), files(**{"bad.jsonl": "{oops\n"})),  # runs/sft-<time> is not left behind
    Case("corrupt-gzip", "train", ("data.task=task.jsonl.gz",),
         ("task.jsonl.gz: cannot read the file", "Not a gzipped file"), files(**{"task.jsonl.gz": _jsonl(GOOD)})),
    Case("no-task-data", "train", (), ("no task data: set data.task",)),
    # ---- model
    Case("tokenizer-without-chat-template", "train", ("model.name_or_path=nochat-model", "data.task=task.jsonl"),
         ("the tokenizer has no chat template", "plain"), _model_without_chat_template),
    Case("lora-targets-match-no-module", "train", ("data.task=task.jsonl", "model.lora_targets=[attn_qkv]"),
         ("LoRA target_modules ['attn_qkv']", "not found in the base model"), files(**{"task.jsonl": GOOD})),
    # ---- method options
    Case("dualselect-without-reference-pool", "train", ("train.method=dualselect", "data.task=task.jsonl"),
         ("dualselect needs a reference pool: set data.reference",), files(**{"task.jsonl": GOOD})),
    Case("reference-pool-all-empty", "train", DUALSELECT,
         ("refs.jsonl: all 3 records have an empty prompt or response",),
         files(**{"task.jsonl": GOOD, "refs.jsonl": [_chat(i, answer=" ") for i in range(3)]})),
    Case("reference-pool-smaller-than-k-ref", "train", (*DUALSELECT, "dualselect.k_ref=5"),
         ("the reference pool has 3 usable examples, fewer than dualselect.k_ref=5", "lower dualselect.k_ref"),
         files(**{"task.jsonl": GOOD, "refs.jsonl": REFS})),
    Case("negative-k-task", "train", (*DUALSELECT, "dualselect.k_task=-1"),
         ("override 'dualselect.k_task=-1'", "k_task must be >= 0"),
         files(**{"task.jsonl": GOOD, "refs.jsonl": REFS})),
    Case("negative-k-task-random", "train", ("data.task=task.jsonl", "train.method=random", "random.k_task=-2"),
         ("override 'random.k_task=-2'", "k_task must be >= 0"), files(**{"task.jsonl": GOOD})),
    Case("budget-above-1", "train", (*DUALSELECT, "dualselect.budget=1.5"),
         ("override 'dualselect.budget=1.5'", "budget must be in (0, 1]"),
         files(**{"task.jsonl": GOOD, "refs.jsonl": REFS})),
    Case("soft-mode-temperature-0", "train", (*DUALSELECT, "dualselect.mode=soft", "dualselect.tau_task=0"),
         ("override 'dualselect.tau_task=0'", "tau_task and tau_ref must be > 0"),
         files(**{"task.jsonl": GOOD, "refs.jsonl": REFS})),
    Case("harmful-ratio-out-of-range", "train", ("data.task=task.jsonl", "data.harmful_ratio=1.5"),
         ("override 'data.harmful_ratio=1.5': data.harmful_ratio must be in [0, 1), got 1.5",),
         files(**{"task.jsonl": GOOD})),
    Case("unknown-method", "train", ("data.task=task.jsonl", "train.method=dualselct"),
         ("train.method 'dualselct' is not registered", "did you mean 'dualselect'?"), files(**{"task.jsonl": GOOD})),
    # ---- named datasets
    Case("data-dir-missing-the-dataset", "train", ("data.task=sst2:train", "data.data_dir=datadir"),
         ("dataset 'sst2:train' expects the file datadir/sst2/train.tsv, which does not exist",),
         files(**{"datadir__xstest__xstest_prompts.csv": "id,prompt,type,label\n1,hi,x,safe\n"})),
    Case("data-dir-does-not-exist", "train", ("data.task=sst2:train", "data.data_dir=nowhere"),
         ("data directory nowhere does not exist (needed for dataset 'sst2')",)),
    Case("named-dataset-unknown-split", "train", ("data.task=sst2:validation", "data.data_dir=datadir"),
         ("dataset 'sst2' has no split 'validation' (splits: train, dev)",), files(**{"datadir": "/"})),
    Case("named-dataset-without-data-dir", "train", ("data.task=sst2:train",),
         ("dataset 'sst2' is read from a data directory", "DUALSELECT_DATA_DIR")),
    Case("eval-set-as-training-data", "train", ("data.task=advbench", "data.data_dir=datadir"),
         ("dataset 'advbench' holds prompts only", "use it in eval.benchmarks"),
         files(**{"datadir__advbench__harmful_behaviors.csv": "goal,target\nDo harm,Sure\n"})),
    # ---- config
    Case("yaml-constructs-python-object", "train", ("data.task=task.jsonl",),
         ("evil.yaml: invalid YAML at line 2", "python/object/apply:os.system", "remove the tag"),
         files(**{"evil.yaml": "train:\n  lr: !!python/object/apply:os.system ['touch pwned']\n", "task.jsonl": GOOD}),
         config="evil.yaml"),
    Case("yaml-unknown-key", "train", ("data.task=task.jsonl",),
         ("unknown.yaml: unknown key 'train.learning_rate'", "known keys: method, epochs, batch_size, lr"),
         files(**{"unknown.yaml": "train:\n  learning_rate: 0.001\n", "task.jsonl": GOOD}), config="unknown.yaml"),
    Case("unknown-section-override", "train", ("data.task=task.jsonl", "trian.lr=0.1"),
         ("override 'trian.lr=0.1': unknown section 'trian' (did you mean 'train'?)",), files(**{"task.jsonl": GOOD})),
    Case("wrong-type-lr-abc", "train", ("data.task=task.jsonl", "train.lr=abc"),
         ("override 'train.lr=abc': train.lr must be a number, got 'abc'",), files(**{"task.jsonl": GOOD})),
    Case("yaml-syntax-error", "train", (),
         ("broken.yaml: invalid YAML at line 3",), files(**{"broken.yaml": "train:\n  lr: [1e-4\nmodel: {}\n"}),
         config="broken.yaml"),
    Case("yaml-duplicate-key", "train", ("data.task=task.jsonl",),
         ("twice.yaml: invalid YAML at line 3", "duplicate key 'lr'"),
         files(**{"twice.yaml": "train:\n  lr: 0.1\n  lr: 0.2\n", "task.jsonl": GOOD}), config="twice.yaml"),
    Case("yaml-top-level-not-a-mapping", "train", (),
         ("list.yaml: the top level must be a mapping of sections",), files(**{"list.yaml": "- train\n- data\n"}),
         config="list.yaml"),
    Case("config-file-missing", "train", (), ("config file 'nope.yaml' not found",), config="nope.yaml"),
    # ---- select
    Case("select-bad-task-file", "select", ("data.task=bad.jsonl", "data.reference=refs.jsonl"),
         ("bad.jsonl:2: invalid JSON", "of line 2"),
         files(**{"bad.jsonl": _jsonl(GOOD[:1]) + "{oops\n", "refs.jsonl": REFS})),
    Case("select-keep-above-1", "select", ("data.task=task.jsonl", "data.reference=refs.jsonl", "--keep", "1.5"),
         ("--keep must be in (0, 1], got 1.5",), files(**{"task.jsonl": GOOD, "refs.jsonl": REFS})),
    # ---- eval
    Case("eval-unknown-benchmark-kind", "eval", ("eval.benchmarks=[toxicity:prompts.jsonl]",),
         ("unknown benchmark kind 'toxicity'", "kinds: harmful, overrefusal, task"),
         files(**{"prompts.jsonl": [{"prompt": "hi"}]})),
    Case("eval-no-benchmarks", "eval", (), ("eval.benchmarks is empty", "eval.benchmarks=[")),
    Case("eval-benchmark-file-missing", "eval", ("eval.benchmarks=[harmful:gone.jsonl]",),
         ("eval benchmark 'harmful:gone.jsonl': gone.jsonl: file not found",)),
    Case("eval-task-benchmark-without-answers", "eval", ("eval.benchmarks=[task:questions.jsonl]",),
         ("eval benchmark 'task:questions.jsonl'", "needs an 'answer' column"),
         files(**{"questions.jsonl": [{"prompt": "2+2?"}]})),
    Case("eval-adapter-not-an-adapter", "eval", ("eval.benchmarks=[harmful:prompts.jsonl]", "eval.adapter=notadapter"),
         ("eval.adapter notadapter: not a PEFT adapter directory (no adapter_config.json)",),
         files(**{"prompts.jsonl": [{"prompt": "hi"}], "notadapter": "/"})),
    Case("eval-model-not-loadable", "eval", ("eval.benchmarks=[harmful:prompts.jsonl]", "model.name_or_path=nomodel"),
         ("nomodel: not a model directory",), files(**{"prompts.jsonl": [{"prompt": "hi"}], "nomodel": "/"})),
    # ---- report
    Case("report-eval-dir-missing", "report", ("sft=runs/sft/eval",),
         ("runs/sft/eval (method sft): not a dualselect eval output dir (no results.json)",)),
    Case("report-spec-without-dirs", "report", ("sft",), ("'sft': expected METHOD=DIR[,DIR...]",)),
    Case("report-bad-plot-axes", "report", ("sft=runs/sft/eval", "--plot", "accuracy"),
         ("--plot 'accuracy': expected X,Y",)),
]


# ------------------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    code: int | str | None
    stdout: str
    stderr: str
    seconds: float
    new_files: list[str] = field(default_factory=list)  # what the command left in the case directory

    @property
    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.startswith("error: ")]
        return lines[0] if len(lines) == 1 else ""


def _tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def run_case(case: Case, workdir: Path, model_dir: Path) -> Outcome:
    """Set up `case` in `workdir` and run its command there, as `dualselect` would (logging to stderr, no
    DUALSELECT_DATA_DIR); stdout and stderr are captured."""
    workdir.mkdir(parents=True, exist_ok=True)
    if case.setup:
        case.setup(workdir, model_dir)
    before = _tree(workdir)
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []  # main() then logs to the captured stderr, as the command does
    cwd, data_dir = os.getcwd(), os.environ.pop("DUALSELECT_DATA_DIR", None)
    t0 = time.perf_counter()
    try:
        os.chdir(workdir)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(case.argv(model_dir))
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        seconds = time.perf_counter() - t0
        os.chdir(cwd)
        if data_dir is not None:
            os.environ["DUALSELECT_DATA_DIR"] = data_dir
        for h in root.handlers:
            h.close()
        root.handlers, root.level = saved
    return Outcome(code, out.getvalue(), err.getvalue(), seconds, sorted(_tree(workdir) - before))


def problems(case: Case, outcome: Outcome) -> list[str]:
    """What is wrong with how the command handled the case (empty: as required)."""
    found = []
    if outcome.code != 2:
        found.append(f"exit status {outcome.code}, not 2")
    if "Traceback" in outcome.stderr:
        found.append("a traceback on stderr")
    lines = outcome.stderr.strip().splitlines()
    if not outcome.error_line:
        found.append("not exactly one 'error: ' line on stderr")
    elif lines[-1] != outcome.error_line:
        found.append("the error line is not the last line of stderr (a message over several lines?)")
    for text in case.expect:
        if text not in outcome.error_line:
            found.append(f"the error line lacks {text!r}")
    if outcome.new_files:
        found.append(f"left behind: {', '.join(outcome.new_files[:5])}")
    if case.max_seconds is not None and outcome.seconds > case.max_seconds:
        found.append(f"took {outcome.seconds:.1f} s (limit {case.max_seconds} s)")
    return found


# ------------------------------------------------------------------------------------------ tests


def test_case_ids_are_unique_and_many():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tiny_model_dir, tmp_path):
    outcome = run_case(case, tmp_path / "case", tiny_model_dir)
    assert not problems(case, outcome), (problems(case, outcome), outcome.stderr[-2000:])


def test_some_empty_responses_are_counted_and_skipped(tiny_model_dir, tmp_path):
    """Not an error: records with an empty response are skipped and counted (run_info.json), the rest trains."""
    rows = [_chat(i, answer="" if i % 3 == 0 else None) for i in range(6)]
    case = Case("some-responses-empty", "train", ("data.task=some.jsonl",), (), files(**{"some.jsonl": rows}))
    outcome = run_case(case, tmp_path / "case", tiny_model_dir)
    assert outcome.code == 0, outcome.stderr[-2000:]
    task = json.loads((tmp_path / "case" / "out" / "run_info.json").read_text())["data"]["task"]
    assert (task["n_read"], task["n_kept"], task["n_skipped_empty"]) == (6, 4, 2)


def test_a_failed_start_keeps_an_existing_output_dir(tiny_model_dir, tmp_path):
    """The output directory was there before: only what the failed command added goes."""
    case = Case("bad-data-into-existing-dir", "train", ("data.task=bad.jsonl",), ("bad.jsonl:1: invalid JSON",),
                files(**{"bad.jsonl": "{oops\n", "out__notes.txt": "mine"}))
    outcome = run_case(case, tmp_path / "case", tiny_model_dir)
    assert not problems(case, outcome), problems(case, outcome)
    assert sorted(p.name for p in (tmp_path / "case" / "out").iterdir()) == ["notes.txt"]


def test_a_started_run_that_fails_is_kept_for_resume(tiny_model_dir, tmp_path, monkeypatch):
    """A failure after the run wrote its config.yaml (training started) leaves the run dir: --resume continues."""
    from dualselect.methods.sft import SFT
    from dualselect.errors import DualSelectError

    def failing_step(self, planned):
        raise DualSelectError("step failed on purpose")

    monkeypatch.setattr(SFT, "step", failing_step)
    case = Case("fails-while-training", "train", ("data.task=task.jsonl",), ("step failed on purpose",),
                files(**{"task.jsonl": GOOD}))
    outcome = run_case(case, tmp_path / "case", tiny_model_dir)
    assert outcome.code == 2 and outcome.error_line == "error: step failed on purpose"
    assert (tmp_path / "case" / "out" / "config.yaml").is_file()
