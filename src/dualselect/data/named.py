"""Standard datasets by name ("sst2", "xstest:safe", ...), read from a data directory.

The data directory holds the raw files in the layout below (one folder per dataset, as in the
project's shared data): pass it as `data_dir` / `--data-dir` or set DUALSELECT_DATA_DIR. Each
dataset is turned into the same `Example`s as a file would be; task datasets get the standard
task instruction of the harmful-fine-tuning literature, eval sets are prompt-only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DualSelectError
from .records import Example, LoadReport, Row, build_examples, read_rows

DATA_DIR_ENV = "DUALSELECT_DATA_DIR"

# Standard task instructions. SST-2's is the one the authors' release uses (no final period).
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AG_NEWS_INSTRUCTION = ("Categorize the news article given in the input into one of the 4 categories: "
                       "World, Sports, Business, Sci/Tech.")
SST2_LABELS = {"0": "negative", "1": "positive"}
AG_NEWS_LABELS = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}


@dataclass(frozen=True)
class Named:
    description: str
    files: dict[str, str]  # split -> file path inside the data directory (several splits may share one file)
    fmt: str  # record format after `transform`
    transform: Callable[[Row, str], dict | None] | None = None  # (row, split) -> new row data, or None to leave out

    @property
    def default_split(self) -> str:
        return next(iter(self.files))


def _label(row: Row, column: str, names: dict[str, str]) -> str:
    value = str(row.data.get(column, "")).strip()
    if value not in names:
        raise DualSelectError(f"{row.where}: '{column}' must be one of {', '.join(names)}, got '{value}'")
    return names[value]


def _sst2(row: Row, split: str) -> dict:
    word = _label(row, "label", SST2_LABELS)
    return {"instruction": SST2_INSTRUCTION, "input": row.data["text"], "output": word, "label": word}


def _ag_news(row: Row, split: str) -> dict:
    word = _label(row, "label", AG_NEWS_LABELS)
    return {"instruction": AG_NEWS_INSTRUCTION, "input": row.data["content"], "output": word, "label": word}


def _gsm8k(row: Row, split: str) -> dict:
    answer = str(row.data.get("answer", ""))
    m = re.search(r"####\s*(.+?)\s*$", answer)
    if not m:
        raise DualSelectError(f"{row.where}: GSM8K answer has no final '#### N'")
    return {"prompt": row.data["question"], "response": answer, "final": m.group(1).replace(",", "")}


ALPACA_WRAPPED = re.compile(r"^Below is an instruction that describes a task\..*?### Instruction:\s*(.*?)\s*"
                            r"### Response:\s*$", re.S)


def _beavertails(row: Row, split: str) -> dict | None:
    """The merged file stores its harmful prompts inside the Alpaca prompt wrapper ("Below is an instruction
    ... ### Instruction: X ### Response:"): keep X, so the chat template (or the plain one) wraps it once."""
    if split != "all" and row.data.get("flag") != split:
        return None
    m = ALPACA_WRAPPED.match(str(row.data.get("instruction", "")))
    return {**row.data, "instruction": m.group(1)} if m else row.data


def _safe_responses(row: Row, split: str) -> dict:
    return {"prompt": row.data["Behavior"], "response": row.data["Safe_Response"]}


def _advbench(row: Row, split: str) -> dict:
    return {"prompt": row.data["goal"], "target": row.data["target"]}


def _harmbench(row: Row, split: str) -> dict | None:
    d = row.data
    if split != "all" and d["FunctionalCategory"] != split:
        return None
    prompt = d["Behavior"]
    if d.get("ContextString"):  # HarmBench's own layout for contextual behaviours
        prompt = f"{d['ContextString']}\n\n---\n\n{prompt}"
    extra = {k: v for k, v in d.items() if k not in ("Behavior", "BehaviorID")}
    return {"id": d["BehaviorID"], "prompt": prompt, **extra}


def _instruction_prompt(row: Row, split: str) -> dict:
    return {"prompt": row.data["instruction"], **{k: v for k, v in row.data.items() if k != "instruction"}}


def _xstest(row: Row, split: str) -> dict | None:
    return row.data if split == "all" or row.data.get("label") == split else None


def _flagged(row: Row, split: str) -> dict | None:
    """Safety-Tuned LLaMAs split by the prompt lexicon (eval.prompt_classifier): "flagged" keeps the rows whose
    instruction (+ input) it calls harmful, "unflagged" the others (many are borderline requests, e.g. "compose
    a list of the worst insults", answered with a refusal: training refusals on them teaches over-refusal)."""
    if split == "train":
        return row.data
    from dualselect.eval.prompt_classifier import LexiconPromptClassifier

    text = " ".join(str(row.data.get(k) or "") for k in ("instruction", "input")).strip()
    return row.data if LexiconPromptClassifier().classify(text).harmful == (split == "flagged") else None


NAMED: dict[str, Named] = {
    "sst2": Named("SST-2 sentiment (train 67,349 / dev 872); output positive|negative, meta label",
                  {"train": "sst2/train.tsv", "dev": "sst2/dev.tsv"}, "alpaca", _sst2),
    "ag_news": Named("AG News topics (dev 8,000 / test 7,600); output World|Sports|Business|Sci/Tech",
                     {"dev": "ag_news/dev.csv", "test": "ag_news/test.csv"}, "alpaca", _ag_news),
    "gsm8k": Named("GSM8K math (train 7,473 / test 1,319); response = full answer, meta final = number after ####",
                   {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, "prompt_completion", _gsm8k),
    "hh_rlhf_harmless": Named("HH-RLHF harmless-base test transcripts (chosen = safer reply), 2,312",
                              {"test": "hh_rlhf_harmless_base/test.jsonl.gz"}, "hh"),
    "safety_tuned_llamas": Named("Safety-Tuned LLaMAs safety data: harmful instruction + safe answer, 2,483 "
                                 "(split train|flagged|unflagged: all, or the rows the prompt lexicon calls harmful "
                                 "or not; ids keep the file row)",
                                 dict.fromkeys(("train", "flagged", "unflagged"),
                                               "safety_tuned_llamas/safety_only_data_Instructions.json"),
                                 "alpaca", _flagged),
    "beavertails_sst2": Named("BeaverTails harmful pairs merged with SST-2 (split all|unsafe|finetune; meta flag), 1,000",
                              dict.fromkeys(("all", "unsafe", "finetune"),
                                            "beavertails_harmful_pairs_nc/sst2_train_merged_n1000_p0.2.json"),
                              "alpaca", _beavertails),
    "alpaca_demo": Named("Alpaca-format benign instruction demo set, 1,000",
                         {"train": "alpaca_demo_1k/alpaca_en_demo.json"}, "alpaca"),
    "harmbench_safe_responses": Named("HarmBench behaviours with refusals (split short|longer), 100",
                                      {"short": "harmbench_safe_responses/adv_training_behaviors_safe_responses.csv",
                                       "longer": "harmbench_safe_responses/adv_training_behaviors_safe_responses_longer.csv"},
                                      "prompt_completion", _safe_responses),
    "advbench": Named("AdvBench harmful behaviours (prompts only; meta target), 520",
                      {"behaviors": "advbench/harmful_behaviors.csv"}, "prompt", _advbench),
    "harmbench_val": Named("HarmBench validation behaviours (prompts only; split standard|contextual|copyright|all), 41 standard",
                           dict.fromkeys(("standard", "contextual", "copyright", "all"),
                                         "harmbench_val/harmbench_behaviors_text_val.csv"), "prompt", _harmbench),
    "refusal_direction": Named("refusal-direction prompt splits (prompts only): harmful_train 260, harmful_val 39, "
                               "harmless_train 18,793, harmless_val 6,266, harmless_test 6,266 (harmless = Alpaca)",
                               {split: f"refusal_direction_splits/{split}.json" for split in
                                ("harmless_test", "harmless_val", "harmless_train", "harmful_train", "harmful_val")},
                               "prompt", _instruction_prompt),
    "xstest": Named("XSTest over-refusal prompts (prompts only; split safe|unsafe|all; meta type, label), 250 safe + 200 unsafe",
                    dict.fromkeys(("all", "safe", "unsafe"), "xstest/xstest_prompts.csv"), "prompt", _xstest),
}

NAMED_DATASETS: dict[str, str] = {name: spec.description for name, spec in NAMED.items()}


def resolve_data_dir(data_dir: str | os.PathLike | None, name: str) -> Path:
    """The data directory: the explicit argument, else $DUALSELECT_DATA_DIR."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise DualSelectError(f"dataset '{name}' is read from a data directory: pass data_dir / --data-dir "
                              f"or set {DATA_DIR_ENV}")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DualSelectError(f"data directory {path} does not exist (needed for dataset '{name}')")
    return path


def named_path(source: str, data_dir: str | os.PathLike | None = None) -> tuple[str, str, Path]:
    """"name[:split]" -> (name, split, the file it reads)."""
    name, _, split = source.partition(":")
    if name not in NAMED:
        raise DualSelectError(f"unknown dataset '{name}' (named datasets: {', '.join(NAMED)})")
    spec = NAMED[name]
    split = split or spec.default_split
    if split not in spec.files:
        raise DualSelectError(f"dataset '{name}' has no split '{split}' (splits: {', '.join(spec.files)})")
    path = resolve_data_dir(data_dir, name) / spec.files[split]
    if not path.is_file():
        raise DualSelectError(f"dataset '{name}:{split}' expects the file {path}, which does not exist")
    return name, split, path


def load_named(source: str, *, data_dir: str | os.PathLike | None = None, limit: int | None = None,
               require_response: bool = True) -> tuple[list[Example], LoadReport]:
    """Load a named dataset ("xstest:safe"); see NAMED_DATASETS. Prompt-only sets need require_response=False."""
    name, split, path = named_path(source, data_dir)
    spec = NAMED[name]
    if spec.fmt == "prompt" and require_response:
        raise DualSelectError(f"dataset '{name}' holds prompts only (an eval set): use it in eval.benchmarks, not as "
                              "training data (Python: load it with require_response=False)")

    def transform(row: Row) -> dict | None:
        try:
            return spec.transform(row, split)
        except KeyError as e:
            raise DualSelectError(f"{row.where}: no {e} column for dataset '{name}' "
                                  f"(columns: {', '.join(map(str, row.data))})") from None

    return build_examples(read_rows(path), source=f"{name}:{split}", path=path, stem=f"{name}-{split}",
                          fmt=spec.fmt, limit=limit, require_response=require_response,
                          transform=transform if spec.transform else None)
