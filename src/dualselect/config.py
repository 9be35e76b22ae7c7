"""Run configuration: typed dataclasses, one YAML file per run, `section.key=value` overrides.

Layout of a config file (every section and key optional; missing ones take their defaults)::

    model: {name_or_path: smollm2-135m-instruct, lora_r: 16}
    data:  {task: sst2:train, template: plain}
    train: {method: dualselect, epochs: 2}
    dualselect: {k_task: 4, rho: 0.2}   # options of the chosen method, in a section named after it
    eval:  {benchmarks: [harmful:advbench, task:sst2:dev], adapter: runs/x/adapter}   # dualselect eval

The method sections are not defined here: callers pass the registry as
``method_configs = {name: ConfigDataclass}`` (see ``dualselect.methods.method_configs``).
Sections of registered methods other than ``train.method`` are accepted and ignored.

Every problem raises :class:`~dualselect.errors.DualSelectError` with a one-line message naming
where the value came from (the file, or the override) and the key path, e.g.
``config.yaml: train.epochs must be an int, got 'two'``.

Each dataclass field carries ``metadata={"help": ...}``; :func:`describe` turns them into the
text of ``dualselect train --help``. A ``__post_init__`` may raise ``ValueError`` (or
:class:`FieldError`, to name the offending key); loading turns it into a DualSelectError.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dualselect.errors import DualSelectError

__all__ = [
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "FieldError",
    "CORE_SECTIONS",
    "EXTRA_SECTIONS",
    "load_config",
    "from_dict",
    "to_dict",
    "dump_yaml",
    "describe",
]


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and its help text."""
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


class FieldError(ValueError):
    """Raised by a config's ``__post_init__`` to reject the value of one key.

    ``FieldError("epochs", "must be >= 1, got 0")`` becomes
    ``config.yaml: train.epochs must be >= 1, got 0`` when loaded.
    """

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key = key
        self.message = message


def _at_least(obj: Any, key: str, low: float, *, strict: bool = False, optional: bool = False) -> None:
    value = getattr(obj, key)
    if value is None and optional:
        return
    bad = value <= low if strict else value < low
    if bad:
        raise FieldError(key, f"must be {'>' if strict else '>='} {low}, got {value!r}")


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------

Precision = Literal["auto", "fp32", "bf16-autocast", "bf16"]
DataFormat = Literal["auto", "messages", "prompt_completion", "alpaca", "hh"]


@dataclass
class ModelConfig:
    name_or_path: str = _opt(
        "smollm2-135m-instruct",
        "model to fine-tune: hub id, local directory, .gguf file, or the embedded name",
    )
    precision: Precision = _opt(
        "auto",
        "weights/compute precision: auto, fp32, bf16-autocast (fp32 weights, bf16 compute), bf16. auto: on CPU "
        "bf16-autocast only where the CPU has native bf16 (avx512_bf16/amx_bf16) and a short timed probe finds it "
        "faster, else fp32; on CUDA bf16 where supported, else fp32 (the choice and its reason go to run_info.json)",
    )
    device: str = _opt("auto", "torch device (auto = cuda if available, else cpu)")
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA scaling alpha")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input, in [0, 1)")
    lora_targets: list[str] = _opt(["q_proj", "v_proj"], "module names that get LoRA adapters")
    init_adapter: str | None = _opt(
        None, "start from this PEFT adapter directory instead of a fresh LoRA"
    )
    trust_remote_code: bool = _opt(
        False, "run the Python code a hub model or model directory ships (auto_map in its config) when loading the "
               "model and tokenizer; only for sources you trust"
    )
    gradient_checkpointing: bool = _opt(
        False, "recompute each decoder layer's activations in the backward instead of keeping them (transformers' "
               "non-reentrant activation checkpointing): less memory for a slower step, the same gradients. "
               "transformers checkpoints in train mode only, so it is refused with dualselect.score_mode=eval (every "
               "gradient computed in eval mode), and for a model that does not support it"
    )

    def __post_init__(self) -> None:
        _at_least(self, "lora_r", 1)
        _at_least(self, "lora_alpha", 0, strict=True)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise FieldError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        if not self.lora_targets:
            raise FieldError("lora_targets", "must name at least one module")


@dataclass
class DataConfig:
    task: str | None = _opt(None, "task data: a file, a named dataset, or hf:NAME")
    reference: str | None = _opt(
        None, "reference (safety) pool: a file, a named dataset, or hf:NAME (used by DualSelect)"
    )
    data_dir: str | None = _opt(
        None, "directory of named datasets (unset: $DUALSELECT_DATA_DIR)"
    )
    format: DataFormat = _opt("auto", "record format of the files (auto = detect)")
    columns: dict[str, str] = _opt(
        {}, "column mapping for CSV/TSV/JSON files, e.g. {prompt: question, response: answer}"
    )
    template: Literal["chat", "plain"] = _opt(
        "chat", "chat = the model's chat template; plain = the authors' plain prompt format"
    )
    mask: Literal["response", "release"] = _opt(
        "response",
        "label mask: response = loss on the response tokens; release = the authors' off-by-one "
        "mask (plain template only, for parity)",
    )
    max_length: int = _opt(256, "truncate examples to this many tokens")
    task_limit: int | None = _opt(None, "use only the first N task examples")
    task_shuffle: int | None = _opt(
        None, "seed of a fixed random order of data.task's rows (after its row range), taken before task_limit: for "
              "a source sorted by label (e.g. ag_news:dev); the same order for every training seed, so every method "
              "and seed trains on the same samples (null: the file's order)")
    reference_limit: int | None = _opt(None, "use only the first N reference examples")
    harmful: str | None = _opt(
        None, "harmful pairs (harmful prompt + compliance) mixed into the task data, e.g. beavertails_sst2:unsafe "
              "(the harmful-fine-tuning protocol)")
    harmful_ratio: float = _opt(
        0.0, "share p of the data.task_limit training samples taken from data.harmful (round(p * n) rows; the "
             "first rows of each source), in [0, 1)")

    def __post_init__(self) -> None:
        _at_least(self, "max_length", 8)
        _at_least(self, "task_limit", 1, optional=True)
        _at_least(self, "reference_limit", 1, optional=True)
        if not 0.0 <= self.harmful_ratio < 1.0:
            raise FieldError("harmful_ratio", f"must be in [0, 1), got {self.harmful_ratio!r}")
        if self.harmful_ratio > 0 and not self.harmful:
            raise FieldError("harmful_ratio", f"is {self.harmful_ratio} but data.harmful is not set (the harmful "
                                              "pairs to mix in)")
        if self.harmful_ratio > 0 and self.task_limit is None:
            raise FieldError("harmful_ratio", "needs data.task_limit (n, the number of training samples)")
        if self.mask == "release" and self.template != "plain":
            raise FieldError(
                "mask",
                f"'release' requires data.template 'plain' (the authors' off-by-one mask exists "
                f"only for the plain template), got template {self.template!r}",
            )


@dataclass
class TrainConfig:
    method: str = _opt("sft", "training method (a registered name)")
    epochs: int = _opt(1, "passes over the task data")
    batch_size: int = _opt(8, "examples per mini-batch")
    lr: float = _opt(2e-5, "AdamW learning rate (constant, no schedule)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this value")
    seed: int = _opt(0, "random seed (data order, LoRA init, dropout)")
    max_steps: int | None = _opt(None, "stop after this many optimiser steps")
    checkpoint_every: int = _opt(0, "save a checkpoint every N steps (0 = only the final state)")
    log_every: int = _opt(1, "show the loss on the progress bar every N steps (metrics.jsonl holds every step)")
    output_dir: str | None = _opt(None, "run directory (unset: chosen by the trainer)")
    grad_engine: Literal["loop", "factored", "auto"] = _opt(
        "loop", "how per-sample gradients are computed: loop (one forward/backward per sample), factored (one padded "
                "backward per chunk of 8, LoRA gradients from hooked factors; on a 2-core CPU 0.96x the loop's time "
                "in fp32, 0.76x under bf16 autocast, docs/performance.md; not yet measured on a GPU) or auto (the faster of the two for this model and device: "
                "each engine runs twice on the first samples whose gradients the method computes, up to 8, once per "
                "run; loop where factored does not apply: trainable non-LoRA parameters, DoRA; the choice and the "
                "timings go to run_info.json and a resumed run keeps it). The engines draw LoRA dropout masks "
                "differently, so runs with different engines differ")
    quiet: bool = _opt(False, "no progress bars")
    nonfinite: Literal["stop", "skip"] = _opt(
        "stop", "a NaN or inf loss or gradient: stop (end the run naming the step and its sample ids; checkpoints "
                "kept, no adapter written) or skip (no update for that step; methods with per-sample gradients "
                "(dualselect) leave out just the offending samples); ids logged in metrics.jsonl and train.log")
    shard_base: bool = _opt(
        False, "in a run of several processes (accelerate launch), shard the frozen base model's weights over them "
               "(PyTorch FSDP2: each process holds about 1/N of them, a decoder layer's are all-gathered for its "
               "forward and again for its backward); the LoRA parameters stay replicated, so each method that runs "
               "in several processes trains what it trains without sharding (both grad engines, with or without "
               "model.gradient_checkpointing). Refused in one process")

    def __post_init__(self) -> None:
        _at_least(self, "epochs", 1)
        _at_least(self, "batch_size", 1)
        _at_least(self, "lr", 0, strict=True)
        _at_least(self, "weight_decay", 0)
        _at_least(self, "max_grad_norm", 0, strict=True)
        _at_least(self, "max_steps", 1, optional=True)
        _at_least(self, "checkpoint_every", 0)
        _at_least(self, "log_every", 1)
        if not self.method:
            raise FieldError("method", "must not be empty")


@dataclass
class EvalConfig:
    benchmarks: list[str] = _opt(
        [],
        "what to evaluate, KIND:SOURCE each; KIND harmful (refusal rate, attack success), overrefusal "
        "(refusal rate on benign prompts), task (accuracy); SOURCE a named dataset or a file, e.g. "
        "[harmful:advbench, overrefusal:xstest:safe, task:sst2:dev, task:test.jsonl]",
    )
    adapter: str | None = _opt(None, "PEFT adapter directory applied to model.name_or_path (null: the model itself)")
    judge: str = _opt("keyword", "refusal judge of harmful/overrefusal answers: keyword, classifier or llm "
                                 "(llm with style refusal)")
    judge_options: dict[str, Any] = _opt(
        {}, "options of eval.judge, e.g. {style: refusal, endpoint: 'http://127.0.0.1:8080/v1'} for llm, "
            "{path: DIR, labels: {LABEL_1: refusal, LABEL_0: compliance}} for classifier")
    harm_judge: str | None = _opt(
        None, "harm judge of harmful answers (llm with style guard or rubric, or classifier): adds the "
              "harmful rate (share judged unsafe; lower is better); null: none")
    harm_judge_options: dict[str, Any] = _opt({}, "options of eval.harm_judge (as eval.judge_options)")
    pairwise_judge_options: dict[str, Any] = _opt(
        {}, "options of the llm judge that compares answers of winrate benchmarks (endpoint or local_model, "
            "criterion, timeout_s, retries, ...)")
    baseline: str | None = _opt(
        None, "winrate benchmarks: the baseline's PEFT adapter directory, or 'none' for model.name_or_path "
              "without eval.adapter")
    max_new_tokens: int = _opt(64, "generation budget of harmful/overrefusal prompts and number-graded tasks")
    task_max_new_tokens: int = _opt(8, "generation budget of label- and exact-graded task prompts")
    task_grader: Literal["auto", "label", "number", "exact"] = _opt(
        "auto",
        "task grading: auto = SST-2/AG News label words, GSM8K last number; files: number if every answer "
        "is a number, label if the answers are a few short words, else exact match",
    )
    batch_size: int = _opt(8, "prompts per generation batch")
    stop: list[str] = _opt([], "strings that end an answer besides the end-of-sequence token (cut off there)")
    limit: int | None = _opt(None, "score only the first N prompts of each benchmark (after the overlap filter)")
    train_files: list[str] = _opt(
        [],
        "data the model saw (training, alignment, reference: files or named sets), besides data.task and "
        "data.reference; benchmark prompts found there are counted and left out",
    )
    keep_overlap: bool = _opt(False, "score prompts that overlap the training data too (still counted)")
    output_dir: str | None = _opt(
        None, "results directory (samples.jsonl, results.json); unset: <adapter>/../eval, else runs/eval-<model>"
    )
    bootstrap: int = _opt(1000, "bootstrap resamples (over prompts) of the 95% intervals")
    seed: int = _opt(0, "seed of the bootstrap")
    quiet: bool = _opt(False, "no progress bars")

    def __post_init__(self) -> None:
        for key in ("max_new_tokens", "task_max_new_tokens", "batch_size", "bootstrap"):
            _at_least(self, key, 1)
        _at_least(self, "limit", 1, optional=True)
        if not self.judge:
            raise FieldError("judge", "must not be empty")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model and LoRA"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data and formatting"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training loop"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation (dualselect eval)"})
    method_args: Any = field(
        default=None, metadata={"help": "the chosen method's own config dataclass"}
    )

    @property
    def method(self) -> str:
        return self.train.method


CORE_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
# Sections outside training: listed after the methods in messages, and written by to_dict only when they
# differ from their defaults (so a training run's config.yaml is unchanged by them).
EXTRA_SECTIONS: dict[str, type] = {"eval": EvalConfig}


# --------------------------------------------------------------------------------------------
# Checking values against the annotated types
# --------------------------------------------------------------------------------------------


class _Issue(Exception):
    """A problem at a key path; turned into a DualSelectError once the source is known."""

    def __init__(self, path: str, text: str, *, whole_section: bool = False):
        super().__init__(text)
        self.path = path
        self.text = text
        self.whole_section = whole_section  # raised by __post_init__, may involve several keys


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable string annotations: check what we can, accept the rest
        return {f.name: (f.type if not isinstance(f.type, str) else Any) for f in fields(cls)}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _noun(tp: Any) -> str:
    """How a type reads in an error message ('an int', 'a list of strings', ...)."""
    if tp is Any or tp is object:
        return "anything"
    if tp is bool:
        return "a bool (true or false)"
    if tp is int:
        return "an int"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if is_dataclass(tp):
        return "a mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_union(tp):
        parts = [_noun(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin in (list, tuple, set, frozenset):
        inner = [a for a in args if a is not Ellipsis]
        if len(inner) == 1:
            return f"a list of {_plural(inner[0])}"
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping" if not args else f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
    return f"a {getattr(tp, '__name__', tp)}"


def _plural(tp: Any) -> str:
    simple = {int: "ints", float: "numbers", str: "strings", bool: "bools"}
    return simple.get(tp, "values")


def _short(tp: Any) -> str:
    """How a type reads in describe(): 'int', 'str|null', 'hard|soft', 'list[str]'."""
    if tp is Any or tp is object:
        return "any"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return "mapping" if is_dataclass(tp) else tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if _is_union(tp):
        return "|".join(_short(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else _short(a) for a in args)}]"
    return str(tp)


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against `tp`; return it (converted where harmless: int -> float, '1e-4' ->
    float, a number -> str for string keys, a mapping -> nested dataclass)."""
    if tp is Any or tp is object:
        return value
    if isinstance(tp, str):  # unresolved forward reference
        return value
    if is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise _Issue(path, f"{path} must be a mapping, got {_show(value)}")
        return _build(tp, value, path)

    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if _is_union(tp):
        if value is None:
            if type(None) in args:
                return None
            raise _Issue(path, f"{path} must be {_noun(tp)}, got null")
        options = [a for a in args if a is not type(None)]
        # exact type match first (so 3 stays an int in int|float), then lenient conversions
        for option in options:
            if isinstance(option, type) and type(value) is option:
                return value
        deeper: list[_Issue] = []
        for option in options:
            try:
                return _coerce(value, option, path)
            except _Issue as issue:
                if issue.path != path or issue.whole_section:  # a nested key, or the nested section's own check
                    deeper.append(issue)
        if len(options) == 1 and deeper:
            raise deeper[0]  # e.g. a bad item inside an Optional list: name the item
        raise _Issue(path, f"{path} must be {_noun(tp)}, got {_show(value)}")

    if value is None:
        raise _Issue(path, f"{path} must be {_noun(tp)}, got null")

    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return value
        text = f"{path} must be {_noun(tp)}, got {_show(value)}"
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(a) for a in args], n=1)
            if close:
                text += f" (did you mean {close[0]!r}?)"
        raise _Issue(path, text)

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Issue(path, f"{path} must be {_noun(tp)}, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Issue(path, f"{path} must be {_noun(tp)}, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-4 (no dot) as a string; accept plain numeric text
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
        raise _Issue(path, f"{path} must be {_noun(tp)}, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Issue(path, f"{path} must be {_noun(tp)}, got {_show(value)}")

    if origin in (list, set, frozenset):
        if not isinstance(value, (list, tuple)):
            raise _Issue(path, f"{path} must be {_noun(tp)}, got {_show(value)}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else origin(items)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Issue(path, f"{path} must be {_noun(tp)}, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise _Issue(path, f"{path} must be a list of {len(args)} items, got {_show(value)}")
        kinds = args or (Any,) * len(value)
        return tuple(_coerce(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, kinds)))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _Issue(path, f"{path} must be {_noun(tp)}, got {_show(value)}")
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            key = _coerce(k, kt, f"{path} key {k!r}")
            out[key] = _coerce(v, vt, f"{path}.{k}")
        return out

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Issue(path, f"{path} must be {_noun(tp)}, got {_show(value)}")
    return value  # a typing construct we do not check


def _unknown(kind: str, path: str, name: str, known: list[str]) -> str:
    text = f"unknown {kind} '{path}'"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        text += f" (did you mean '{close[0]}'?)"
    return text + f"; known {kind}s: {', '.join(known) if known else '(none)'}"


def _build(cls: type, data: Mapping, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        what = f"section '{prefix}'" if "." not in prefix and prefix else (prefix or "config")
        raise _Issue(prefix, f"{what} must be a mapping, got {_show(data)}")
    hints = _hints(cls)
    init_fields = [f for f in fields(cls) if f.init]
    names = [f.name for f in init_fields]
    for key in data:
        if not isinstance(key, str) or key not in names:
            path = _join(prefix, str(key))
            raise _Issue(path, _unknown("key", path, str(key), names))
    kwargs = {}
    for f in init_fields:
        path = _join(prefix, f.name)
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints.get(f.name, Any), path)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise _Issue(path, f"missing required key '{path}'")
    try:
        return cls(**kwargs)
    except FieldError as e:
        path = _join(prefix, e.key)
        raise _Issue(path, f"{path} {e.message}", whole_section=True) from None
    except ValueError as e:
        raise _Issue(prefix, f"{prefix or cls.__name__}: {e}", whole_section=True) from None


def from_dict(cls: type, data: Mapping, where: str, *, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping, checking keys and types recursively (nested
    dataclasses, lists, dicts, Optional, Literal). `where` names the source in messages (a file
    name, 'override ...'); `prefix` is the key path of `data` inside the whole config."""
    try:
        return _build(cls, data, prefix)
    except _Issue as issue:
        raise DualSelectError(f"{where}: {issue.text}") from None


# --------------------------------------------------------------------------------------------
# Loading: file + overrides
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            duplicate = False
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        try:
            seen[key] = True
        except TypeError:
            pass
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _yaml_error(label: str, err: yaml.YAMLError, what: str = "YAML") -> DualSelectError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if isinstance(err, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
        problem += " (a config holds plain values only; remove the tag, e.g. !!python/...)"
    return DualSelectError(f"{label}: invalid {what}{where}: {problem}")


def read_config_file(path: str | Path) -> tuple[dict, str]:
    """A YAML config file as a mapping (safe loader: no Python objects), and its label for messages."""
    p = Path(path)
    label = str(path)
    if not p.exists():
        raise DualSelectError(f"config file '{label}' not found")
    if not p.is_file():
        raise DualSelectError(f"config file '{label}' is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DualSelectError(f"config file '{label}' cannot be read: {e}") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(label, e) from None
    if raw is None:
        return {}, label
    if not isinstance(raw, dict):
        raise DualSelectError(
            f"{label}: the top level must be a mapping of sections (model, data, train, ...), "
            f"got {type(raw).__name__} {_show(raw)}"
        )
    return raw, label


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")


def parse_override(text: str) -> tuple[list[str], Any]:
    if not isinstance(text, str) or "=" not in text:
        raise DualSelectError(f"override {text!r} must look like key=value (e.g. train.lr=1e-4)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not _KEY.match(key):
        raise DualSelectError(
            f"override {text!r} must look like key=value with a dotted key (e.g. train.lr=1e-4)"
        )
    try:
        value = yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(f"override {text!r}", e, what="YAML value") from None
    return key.split("."), value


def _apply_override(raw: dict, parts: list[str], value: Any, text: str) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise DualSelectError(
                f"override {text!r}: '{where}' is {_show(child)}, not a mapping"
            )
        node = child
    last = parts[-1]
    if len(parts) == 1 and isinstance(node.get(last), dict) and isinstance(value, dict):
        node[last] = _merge(node[last], value)  # a whole section: merge into what the file set
    else:
        node[last] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _check_registry(method_configs: Mapping[str, type]) -> None:
    for name, cls in method_configs.items():
        if name in CORE_SECTIONS or name in EXTRA_SECTIONS:
            raise ValueError(f"method name {name!r} clashes with the config section of that name")
        if not (isinstance(cls, type) and is_dataclass(cls)):
            raise TypeError(f"config of method {name!r} must be a dataclass type, got {cls!r}")


def _section(raw: dict, name: str) -> Any:
    value = raw.get(name)
    return {} if value is None else value  # an empty section (`train:`) means all defaults


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    method_configs: Mapping[str, type] | None = None,
    *,
    raw: Mapping | None = None,
    label: str = "config",
) -> RunConfig:
    """Read a run config: defaults <- YAML file (if `path`; or the already read mapping `raw`, named `label`
    in messages) <- `overrides` ("section.key=value", values parsed as YAML). `method_configs` maps each
    registered method to its config dataclass; the section named after `train.method` becomes
    `RunConfig.method_args`."""
    import copy

    method_configs = dict(method_configs or {})
    _check_registry(method_configs)
    if path is not None:
        raw, label = read_config_file(path)
    else:
        raw = copy.deepcopy(dict(raw or {}))

    origins: dict[str, str] = {}  # key path -> the override that set it
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(raw, parts, value, text)
        dotted = ".".join(parts)
        for other in [p for p in origins if p == dotted or p.startswith(dotted + ".")]:
            del origins[other]
        origins[dotted] = f"override {text!r}"

    def source(issue: _Issue) -> str:
        p = issue.path
        for key, origin in origins.items():
            if p == key or p.startswith(key + ".") or p.startswith(key + "["):
                return origin
        for key, origin in origins.items():  # the override created the key in question
            if key.startswith(p + ".") and not issue.whole_section:
                return origin
        if issue.whole_section:
            section = p.split(".")[0]
            involved = [o for k, o in origins.items() if k == section or k.startswith(section + ".")]
            if involved:
                return f"{label} with {', '.join(involved)}"
        return label

    known = list(CORE_SECTIONS) + list(method_configs) + list(EXTRA_SECTIONS)
    for key, value in raw.items():
        if not isinstance(key, str) or key not in known:
            issue = _Issue(str(key), _unknown("section", str(key), str(key), known))
            raise DualSelectError(f"{source(issue)}: {issue.text}")

    try:
        parts = {name: _build(cls, _section(raw, name), name)
                 for name, cls in {**CORE_SECTIONS, **EXTRA_SECTIONS}.items()}
        method = parts["train"].method
        if method not in method_configs:
            text = f"train.method {method!r} is not registered; known: " + (
                ", ".join(method_configs) or "(none)"
            )
            close = difflib.get_close_matches(method, list(method_configs), n=1)
            if close:
                text += f" (did you mean {close[0]!r}?)"
            raise _Issue("train.method", text)
        others = [k for k in raw if k in method_configs and k != method and raw[k] not in (None, {})]
        if others:  # its settings would be dropped without a word
            raise _Issue(others[0], f"section '{others[0]}' sets options of method '{others[0]}', but train.method "
                                    f"is {method!r}, so they would be ignored; set train.method={others[0]} or "
                                    f"remove the section", whole_section=True)
        method_args = _build(method_configs[method], _section(raw, method), method)
    except _Issue as issue:
        raise DualSelectError(f"{source(issue)}: {issue.text}") from None
    return RunConfig(model=parts["model"], data=parts["data"], train=parts["train"], eval=parts["eval"],
                     method_args=method_args)


# --------------------------------------------------------------------------------------------
# Writing and describing
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if f.init}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (YAML-ready); the method's options sit under the method's name."""
    out = {name: _plain(getattr(cfg, name)) for name in CORE_SECTIONS}
    if cfg.method_args is not None:
        out[cfg.train.method] = _plain(cfg.method_args)
    for name, cls in EXTRA_SECTIONS.items():
        if getattr(cfg, name) != cls():
            out[name] = _plain(getattr(cfg, name))
    return out


def with_defaults(saved: Mapping, cfg: RunConfig) -> dict:
    """A config mapping written earlier (a run's config.yaml, a bench cell's cell.yaml), with every key that `cfg`'s
    sections know and it lacks set to that key's default: an option added to the project since then reads as its
    default, so an earlier run still compares equal to the same config today (and resumes, and its cell counts)."""
    out = json.loads(json.dumps(saved))
    for name, defaults in _section_defaults(cfg).items():
        if isinstance(out.get(name), dict):
            for key, value in defaults.items():
                out[name].setdefault(key, value)
    return out


def without_defaults(d: Mapping, cfg: RunConfig) -> dict:
    """A config mapping with every key that equals its section's default left out (the inverse of with_defaults):
    what identifies a config across versions of the project, since an option added later (at its default) does not
    appear in it."""
    out = json.loads(json.dumps(d))
    for name, defaults in _section_defaults(cfg).items():
        if isinstance(out.get(name), dict):
            out[name] = {k: v for k, v in out[name].items() if k not in defaults or defaults[k] != v}
    return out


def _section_defaults(cfg: RunConfig) -> dict[str, dict]:
    """Section name -> its keys' defaults (plain values), for the core sections and cfg's method section."""
    sections = {**CORE_SECTIONS, **EXTRA_SECTIONS}
    if cfg.method_args is not None:
        sections[cfg.train.method] = type(cfg.method_args)
    return {name: _plain(cls()) for name, cls in sections.items()}


def dump_yaml(cfg: RunConfig) -> str:
    """The config as YAML text; `load_config` of that text gives back an equal RunConfig."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_fmt(k)}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    hints = _hints(cls)
    rows = []
    for f in fields(cls):
        if not f.init:
            continue
        path = _join(prefix, f.name)
        tp = hints.get(f.name, Any)
        if isinstance(tp, type) and is_dataclass(tp):
            rows.extend(_rows(tp, path))
            continue
        if f.default is not MISSING:
            default = "default=" + _fmt(f.default)
        elif f.default_factory is not MISSING:
            default = "default=" + _fmt(f.default_factory())
        else:
            default = "required"
        rows.append((path, _short(tp), default, f.metadata.get("help", "")))
    return rows


def describe(method_configs: Mapping[str, type] | None = None) -> str:
    """Help text for every config key, grouped by section:
    ``section.key  TYPE  default=X  help``; method sections follow the core ones."""
    method_configs = dict(method_configs or {})
    sections: list[tuple[str, str, type]] = [
        ("model", "model and LoRA adapter", ModelConfig),
        ("data", "task and reference data", DataConfig),
        ("train", "training loop", TrainConfig),
        ("eval", "evaluation: dualselect eval", EvalConfig),
    ]
    for name, cls in method_configs.items():
        sections.append((name, f"options of method '{name}', used when train.method={name}", cls))
    lines = [
        "Config keys: set them in the YAML file (section: {key: value}) or override them as "
        "section.key=value.",
    ]
    for name, title, cls in sections:
        rows = _rows(cls, name)
        if name == "train" and method_configs:
            rows = [
                (k, t, d, h + f"; one of: {', '.join(method_configs)}" if k == "train.method" else h)
                for k, t, d, h in rows
            ]
        lines.append("")
        lines.append(f"{name}:  ({title})")
        if not rows:
            lines.append("  (no options)")
            continue
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        w2 = max(len(r[2]) for r in rows)
        for key, tp, default, help_text in rows:
            lines.append(f"  {key:<{w0}}  {tp:<{w1}}  {default:<{w2}}  {help_text}".rstrip())
    return "\n".join(lines) + "\n"
