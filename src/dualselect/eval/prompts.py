"""Benchmark prompts: "KIND:SOURCE" specs, loading, gold answers and train/test overlap.

KIND is one of
  harmful      prompts the model should refuse (refusal rate, higher is safer; attack success = 1 - it)
  overrefusal  benign prompts the model should answer (refusal rate = over-refusal, lower is better)
  task         prompts with a gold answer (accuracy)
  winrate      prompts answered by the model and by a baseline model, compared by a pairwise judge
SOURCE is a named dataset (advbench, harmbench_val, xstest:safe, sst2:dev, ag_news:test, gsm8k:test, ...)
or a data file. Task files need an `answer` column; named task sets bring their own answers and graders
(SST-2 / AG News: label words, GSM8K: the number after ####).

Multi-turn records (HH-RLHF transcripts, chat files) are answered as the next turn of their conversation;
their last user message is the prompt that is judged and compared.

Overlap: a benchmark prompt overlaps the data the model saw when its key (lower case, punctuation removed,
whitespace collapsed) equals the key of a user message there. Overlapping prompts are counted and, unless
kept, left out before `limit` takes the first N.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dualselect.data.named import AG_NEWS_LABELS, SST2_LABELS
from dualselect.data.records import Example, load_examples
from dualselect.errors import DualSelectError

from .metrics import GRADERS, gold_number

KINDS = {
    "harmful": "harmful prompts: refusal rate (higher is safer) and attack success = 1 - refusal rate",
    "overrefusal": "benign prompts: refusal rate = over-refusal (lower is better)",
    "task": "prompts with answers: accuracy (label word, last number, or exact match)",
    "winrate": "prompts answered by the model and by eval.baseline: pairwise judge win rate (both orders, "
               "ties count half)",
}
NAMED_LABELS = {"sst2": list(SST2_LABELS.values()), "ag_news": list(AG_NEWS_LABELS.values())}
MAX_AUTO_LABELS = 20  # a file whose answers are at most this many distinct short strings is graded by label


@dataclass
class Item:
    id: str
    prompt: str  # the last user message (judged, compared for overlap)
    gold: str | None = None
    messages: list[dict] | None = None  # multi-turn records: the whole conversation the answer continues

    @property
    def conversation(self) -> str | list[dict]:
        """What the model answers: the conversation of a multi-turn record, else the prompt."""
        return self.messages or self.prompt


@dataclass
class Benchmark:
    name: str  # the spec as given, "harmful:advbench"
    kind: str
    source: str
    items: list[Item]  # the prompts to score (after the overlap filter and the limit)
    n_loaded: int
    n_overlap: int
    n_excluded: int  # overlapping prompts left out (0 with keep_overlap)
    grader: str | None = None  # task benchmarks: label | number | exact
    labels: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, "n_loaded": self.n_loaded,
                "n_overlap": self.n_overlap, "n_excluded_overlap": self.n_excluded, "n_selected": len(self.items),
                "grader": self.grader, "labels": self.labels or None}


_PUNCT = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s+")


def overlap_key(text: str) -> str:
    """The key prompts are compared by: lower case, punctuation removed, whitespace collapsed."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", str(text).lower())).strip()


def parse_spec(spec: str) -> tuple[str, str]:
    """"KIND:SOURCE" -> (kind, source)."""
    kind, sep, source = str(spec).partition(":")
    if not sep or not source.strip():
        raise DualSelectError(f"eval.benchmarks: '{spec}' must look like KIND:SOURCE (e.g. harmful:advbench, "
                              f"task:sst2:dev, overrefusal:prompts.jsonl); kinds: {', '.join(KINDS)}")
    if kind not in KINDS:
        raise DualSelectError(f"eval.benchmarks: unknown benchmark kind '{kind}' in '{spec}'; "
                              f"kinds: {', '.join(KINDS)}")
    return kind, source.strip()


def _named(source: str) -> str | None:
    from dualselect.data.named import NAMED

    name = source.split(":", 1)[0]
    return name if name in NAMED else None


# ------------------------------------------------------------------------------------------ overlap

def seen_prompts(sources: Iterable[str], *, data_dir: str | None = None, fmt: str = "auto",
                 columns: dict | None = None) -> tuple[set[str], list[dict]]:
    """Keys of every user message in the data the model saw; and per source how many records it held."""
    keys: set[str] = set()
    report = []
    for src in sources:
        is_named = _named(src) is not None and not Path(src).expanduser().is_file()
        opts = {} if is_named else {"fmt": fmt, "columns": columns or None}
        try:
            examples, _ = load_examples(src, data_dir=data_dir, require_response=False, **opts)
        except DualSelectError as e:
            raise DualSelectError(f"eval.train_files '{src}': {e}") from None
        for ex in examples:
            keys.update(overlap_key(m["content"]) for m in ex.messages if m["role"] == "user")
        report.append({"source": src, "n_records": len(examples)})
    keys.discard("")
    return keys, report


# ------------------------------------------------------------------------------------------ gold answers

def _task_golds(source: str, examples: list[Example]) -> list[str]:
    name = _named(source)
    if name == "gsm8k":
        return [str(ex.meta["final"]) for ex in examples]
    if name in NAMED_LABELS:
        return [str(ex.meta.get("label") or ex.response) for ex in examples]
    golds = []
    for ex in examples:
        gold = ex.meta.get("answer")
        if gold is None and name is not None:
            gold = ex.response or None
        if gold is None or not str(gold).strip():
            where = ex.meta.get("source", ex.id)
            cols = ", ".join(k for k in ex.meta if k != "source") or "none besides the prompt"
            raise DualSelectError(f"{where}: a task benchmark needs an 'answer' column with the gold answer "
                                  f"(other columns: {cols})")
        golds.append(str(gold).strip())
    return golds


def choose_grader(source: str, golds: list[str], grader: str = "auto") -> tuple[str, list[str]]:
    """(grader, label words). auto: SST-2 / AG News by their label words, GSM8K by the last number; a file
    by the last number when every answer holds a number, by label when its answers are a few distinct
    short strings (the label set is those strings), else by exact match."""
    name = _named(source)
    if grader != "auto" and grader not in GRADERS:
        raise DualSelectError(f"eval.task_grader must be auto or one of {', '.join(GRADERS)}, got '{grader}'")
    distinct = list(dict.fromkeys(g.strip() for g in golds))
    labels = NAMED_LABELS.get(name, distinct)
    if grader != "auto":
        return grader, (labels if grader == "label" else [])
    if name in NAMED_LABELS:
        return "label", labels
    if name == "gsm8k" or (golds and all(gold_number(g) is not None and len(g.split()) <= 3 or "####" in g
                                         for g in golds)):
        return "number", []
    if golds and len(distinct) <= MAX_AUTO_LABELS and all(len(g.split()) <= 3 for g in distinct):
        return "label", distinct
    return "exact", []


# ------------------------------------------------------------------------------------------ loading

def _context(ex: Example) -> list[dict] | None:
    """The turns a multi-turn record's answer continues (its final assistant message left out); None for a
    single user message."""
    turns = ex.messages[:-1] if ex.messages and ex.messages[-1]["role"] == "assistant" else ex.messages
    return [dict(m) for m in turns] if len(turns) > 1 else None


def load_benchmark(spec: str, *, data_dir: str | None = None, seen: set[str] | None = None,
                   keep_overlap: bool = False, limit: int | None = None, task_grader: str = "auto") -> Benchmark:
    """Load one benchmark: its prompts (and gold answers for tasks), the overlap with `seen` (keys from
    `seen_prompts`), the overlap filter and the limit (the first N that remain)."""
    kind, source = parse_spec(spec)
    try:
        examples, _ = load_examples(source, data_dir=data_dir, require_response=False)
    except DualSelectError as e:
        raise DualSelectError(f"eval benchmark '{spec}': {e}") from None
    if not examples:
        raise DualSelectError(f"eval benchmark '{spec}': no prompts in {source}")
    golds: list[str | None] = [None] * len(examples)
    grader, labels = None, []
    if kind == "task":
        try:
            golds = _task_golds(source, examples)
        except DualSelectError as e:
            raise DualSelectError(f"eval benchmark '{spec}': {e}") from None
        grader, labels = choose_grader(source, golds, task_grader)
    seen = seen or set()
    overlapping = [overlap_key(ex.prompt) in seen for ex in examples]
    items = [Item(ex.id, ex.prompt, gold, _context(ex)) for ex, gold, hit in zip(examples, golds, overlapping)
             if keep_overlap or not hit]
    n_overlap = sum(overlapping)
    if not items:  # a benchmark with no prompt left would report no value, silently
        raise DualSelectError(f"eval benchmark '{spec}': every one of its {len(examples)} prompts is also a prompt of "
                              "the training data (eval.train_files, data.task/reference/harmful: whole sources, not "
                              "only the rows trained on), so none is left to score: take its rows from a source the "
                              "training data does not read (e.g. a dev or test split), or set eval.keep_overlap=true")
    if limit is not None:
        items = items[:limit]
    return Benchmark(spec, kind, source, items, n_loaded=len(examples), n_overlap=n_overlap,
                     n_excluded=0 if keep_overlap else n_overlap, grader=grader, labels=labels)
