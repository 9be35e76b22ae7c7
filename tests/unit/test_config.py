"""Run config: defaults, YAML + overrides, types, validation messages, round trip, --help text."""

from dataclasses import dataclass, field, fields
from typing import Literal

import pytest
import yaml

from dualselect.config import (
    DataConfig,
    FieldError,
    ModelConfig,
    RunConfig,
    TrainConfig,
    describe,
    dump_yaml,
    from_dict,
    load_config,
    to_dict,
)
from dualselect.errors import DualSelectError


# ---- a toy registry, standing in for dualselect.methods.method_configs() ----------------------


@dataclass
class PlainConfig:
    """A method without options (like sft)."""


@dataclass
class Window:
    size: int = field(default=3, metadata={"help": "window size"})
    names: list[str] = field(default_factory=lambda: ["a"], metadata={"help": "names"})


@dataclass
class ToyConfig:
    k: int = field(default=4, metadata={"help": "samples kept per batch"})
    mode: Literal["hard", "soft"] = field(default="hard", metadata={"help": "selection mode"})
    rho: float = field(default=0.2, metadata={"help": "correction strength"})
    budget: float | None = field(default=None, metadata={"help": "token budget fraction"})
    window: Window = field(default_factory=Window, metadata={"help": "nested options"})

    def __post_init__(self):
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.mode == "soft" and self.rho > 1:
            raise FieldError("rho", f"must be <= 1 in soft mode, got {self.rho}")


@dataclass
class OtherConfig:
    alpha: float = field(default=0.5, metadata={"help": "unused here"})


REG = {"sft": PlainConfig, "toy": ToyConfig, "other": OtherConfig}


def write(tmp_path, text, name="config.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(path, overrides=(), reg=REG):
    with pytest.raises(DualSelectError) as info:
        load_config(path, list(overrides), reg)
    return str(info.value)


# ---- defaults ---------------------------------------------------------------------------------


def test_defaults_without_file():
    cfg = load_config(None, [], REG)
    assert isinstance(cfg, RunConfig)
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.name_or_path, m.precision, m.device) == ("smollm2-135m-instruct", "auto", "auto")
    assert (m.lora_r, m.lora_alpha, m.lora_dropout) == (16, 32, 0.05)
    assert m.lora_targets == ["q_proj", "v_proj"] and m.init_adapter is None
    assert (d.task, d.reference, d.data_dir, d.format) == (None, None, None, "auto")
    assert d.columns == {} and (d.template, d.mask, d.max_length) == ("chat", "response", 256)
    assert d.task_limit is None and d.reference_limit is None
    assert (t.method, t.epochs, t.batch_size, t.lr) == ("sft", 1, 8, 2e-5)
    assert (t.weight_decay, t.max_grad_norm, t.seed, t.max_steps) == (0.0, 1.0, 0, None)
    assert (t.checkpoint_every, t.log_every, t.output_dir) == (0, 1, None)
    assert (t.grad_engine, t.quiet) == ("loop", False)
    assert cfg.method_args == PlainConfig() and cfg.method == "sft"


def test_default_lists_are_not_shared():
    a, b = ModelConfig(), ModelConfig()
    a.lora_targets.append("k_proj")
    assert b.lora_targets == ["q_proj", "v_proj"]
    c, e = DataConfig(), DataConfig()
    c.columns["prompt"] = "q"
    assert e.columns == {}


def test_every_field_has_help():
    for cls in (ModelConfig, DataConfig, TrainConfig):
        for f in fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_empty_file_and_empty_sections_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), [], REG) == load_config(None, [], REG)
    cfg = load_config(write(tmp_path, "model:\ntrain:\n", "b.yaml"), [], REG)
    assert cfg == load_config(None, [], REG)


# ---- file + overrides -------------------------------------------------------------------------


def test_file_then_overrides(tmp_path):
    p = write(
        tmp_path,
        "model: {name_or_path: /models/x, lora_r: 8}\n"
        "data: {task: sst2:train, template: plain}\n"
        "train: {method: toy, epochs: 2, lr: 0.001}\n"
        "toy: {k: 2, mode: soft}\n",
    )
    cfg = load_config(p, ["train.lr=1e-4", "toy.k=6", "train.lr=3e-4"], REG)
    assert cfg.model.name_or_path == "/models/x" and cfg.model.lora_r == 8
    assert cfg.data.task == "sst2:train" and cfg.data.template == "plain"
    assert cfg.train.epochs == 2  # from the file
    assert cfg.train.lr == pytest.approx(3e-4)  # the last override wins
    assert cfg.method_args == ToyConfig(k=6, mode="soft")


def test_override_can_switch_method_and_section_merge(tmp_path):
    p = write(tmp_path, "train: {epochs: 3}\ntoy: {k: 1, rho: 0.5}\n")
    cfg = load_config(p, ["train.method=toy", "toy={mode: soft}"], REG)
    assert cfg.train.method == "toy" and cfg.train.epochs == 3
    assert cfg.method_args == ToyConfig(k=1, rho=0.5, mode="soft")


def test_other_method_sections_are_refused_unless_empty(tmp_path):
    p = write(tmp_path, "train: {method: toy}\nother: {alpha: 0.9}\nsft: {}\n")
    with pytest.raises(DualSelectError, match="section 'other' sets options of method 'other', but train.method is "
                                              "'toy', so they would be ignored"):
        load_config(p, [], REG)
    cfg = load_config(write(tmp_path, "train: {method: toy}\nsft: {}\nother:\n"), [], REG)  # empty: nothing lost
    assert cfg.method_args == ToyConfig()
    assert set(to_dict(cfg)) == {"model", "data", "train", "toy"}


# ---- nested types -----------------------------------------------------------------------------


def test_nested_types():
    cfg = load_config(
        None,
        [
            "model.lora_targets=[q_proj, k_proj, v_proj]",
            "data.columns={prompt: question, response: answer}",
            "model.init_adapter=/runs/a/adapter",
            "data.task_limit=100",
            "model.precision=bf16-autocast",
            "train.method=toy",
            "toy.window={size: 5, names: [x, y]}",
            "toy.budget=0.9",
        ],
        REG,
    )
    assert cfg.model.lora_targets == ["q_proj", "k_proj", "v_proj"]
    assert cfg.data.columns == {"prompt": "question", "response": "answer"}
    assert cfg.model.init_adapter == "/runs/a/adapter"
    assert cfg.data.task_limit == 100
    assert cfg.model.precision == "bf16-autocast"
    assert cfg.method_args.window == Window(size=5, names=["x", "y"])
    assert cfg.method_args.budget == 0.9


def test_optional_back_to_null(tmp_path):
    p = write(tmp_path, "model: {init_adapter: /a}\ndata: {task_limit: 5}\n")
    cfg = load_config(p, ["model.init_adapter=null", "data.task_limit="], REG)
    assert cfg.model.init_adapter is None and cfg.data.task_limit is None


def test_numbers_are_converted_where_harmless(tmp_path):
    p = write(tmp_path, "train: {lr: 1, max_grad_norm: 2}\nmodel: {lora_dropout: 0}\n")
    cfg = load_config(p, [], REG)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.train.max_grad_norm, float) and isinstance(cfg.model.lora_dropout, float)
    # YAML 1.1 reads `1e-4` (no dot) as text: accepted for float keys
    assert yaml.safe_load("1e-4") == "1e-4"
    p2 = write(tmp_path, "train: {lr: 1e-4}\n", "b.yaml")
    assert load_config(p2, [], REG).train.lr == pytest.approx(1e-4)
    assert load_config(None, ["train.lr=5e-5"], REG).train.lr == pytest.approx(5e-5)
    # a number for a string key becomes text
    assert load_config(None, ["model.device=0"], REG).model.device == "0"


# ---- errors -----------------------------------------------------------------------------------


def test_unknown_key_suggests_and_lists(tmp_path):
    msg = error_of(write(tmp_path, "train: {lrr: 0.1}\n"))
    assert msg.startswith(str(tmp_path / "config.yaml") + ": unknown key 'train.lrr'")
    assert "(did you mean 'lr'?)" in msg
    assert "known keys: method, epochs, batch_size, lr," in msg


def test_unknown_key_in_method_section(tmp_path):
    msg = error_of(write(tmp_path, "train: {method: toy}\ntoy: {kk: 3}\n"))
    assert "config.yaml: unknown key 'toy.kk' (did you mean 'k'?)" in msg


def test_unknown_section(tmp_path):
    msg = error_of(write(tmp_path, "trian: {lr: 0.1}\n"))
    assert "config.yaml: unknown section 'trian' (did you mean 'train'?)" in msg
    assert "known sections: model, data, train, sft, toy, other" in msg
    msg = error_of(None, ["modle.lora_r=4"])
    assert msg.startswith("override 'modle.lora_r=4': unknown section 'modle'")


def test_unknown_key_from_override_names_the_override(tmp_path):
    msg = error_of(write(tmp_path, "train: {epochs: 2}\n"), ["train.lrr=1e-4"])
    assert msg.startswith("override 'train.lrr=1e-4': unknown key 'train.lrr'")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=two", "train.epochs must be an int, got 'two'"),
        ("train.epochs=true", "train.epochs must be an int, got True"),
        ("train.epochs=2.5", "train.epochs must be an int, got 2.5"),
        ("train.lr=fast", "train.lr must be a number, got 'fast'"),
        ("train.lr=true", "train.lr must be a number, got True"),
        ("train.quiet=1", "train.quiet must be a bool (true or false), got 1"),
        ("model.name_or_path=[a]", "model.name_or_path must be a string, got ['a']"),
        ("model.lora_targets=q_proj", "model.lora_targets must be a list of strings, got 'q_proj'"),
        ("model.lora_targets=[q_proj, [x]]", "model.lora_targets[1] must be a string, got ['x']"),
        ("data.columns=[a, b]", "data.columns must be a mapping of strings to strings, got ['a', 'b']"),
        ("data.columns={prompt: [q]}", "data.columns.prompt must be a string, got ['q']"),
        ("data.task_limit=lots", "data.task_limit must be an int or null, got 'lots'"),
        ("model.precision=fp16", "model.precision must be one of 'auto', 'fp32', 'bf16-autocast', 'bf16', got 'fp16' (did you mean 'bf16'?)"),
        ("data.template=plian", "data.template must be one of 'chat', 'plain', got 'plian' (did you mean 'plain'?)"),
        ("model.precision=null", "model.precision must be one of 'auto', 'fp32', 'bf16-autocast', 'bf16', got null"),
        ("train.epochs=null", "train.epochs must be an int, got null"),
        ("model.device=", "model.device must be a string, got null"),
    ],
)
def test_type_errors_from_overrides(override, expected):
    assert error_of(None, [override]) == f"override {override!r}: {expected}"


def test_type_error_in_file_names_file(tmp_path):
    msg = error_of(write(tmp_path, "train:\n  epochs: two\n"))
    assert msg == f"{tmp_path / 'config.yaml'}: train.epochs must be an int, got 'two'"


def test_literal_in_method_section(tmp_path):
    msg = error_of(write(tmp_path, "train: {method: toy}\ntoy: {mode: medium}\n"))
    assert msg.endswith("config.yaml: toy.mode must be one of 'hard', 'soft', got 'medium'")


def test_section_not_a_mapping(tmp_path):
    msg = error_of(write(tmp_path, "train: 5\n"))
    assert msg.endswith("config.yaml: section 'train' must be a mapping, got 5")
    msg = error_of(write(tmp_path, "train: []\n", "b.yaml"))
    assert msg.endswith("b.yaml: section 'train' must be a mapping, got []")


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=3", "train lr=3", ""])
def test_malformed_override(bad):
    msg = error_of(None, [bad])
    assert msg.startswith(f"override {bad!r} must look like key=value")


def test_override_value_bad_yaml():
    msg = error_of(None, ["data.columns={prompt: q"])
    assert msg.startswith("override 'data.columns={prompt: q': invalid YAML value at line 1")


def test_override_into_a_scalar():
    msg = error_of(None, ["train.lr=0.1", "train.lr.x=1"])
    assert msg == "override 'train.lr.x=1': 'train.lr' is 0.1, not a mapping"


def test_unknown_method(tmp_path):
    msg = error_of(write(tmp_path, "train: {method: foo}\n"))
    assert msg.endswith("config.yaml: train.method 'foo' is not registered; known: sft, toy, other")
    msg = error_of(None, ["train.method=tyo"])
    assert msg == (
        "override 'train.method=tyo': train.method 'tyo' is not registered; "
        "known: sft, toy, other (did you mean 'toy'?)"
    )


def test_yaml_syntax_error_names_line(tmp_path):
    p = write(tmp_path, "model:\n  lora_r: 8\ntrain: {epochs: 2\ndata: {}\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}: invalid YAML at line ")
    line = int(msg.split("at line ")[1].split(",")[0])
    assert line in (3, 4)
    p2 = write(tmp_path, "train:\n  epochs: 2\n   lr: 0.1\n", "b.yaml")
    assert "b.yaml: invalid YAML at line 3" in error_of(p2)


def test_duplicate_key_is_an_error(tmp_path):
    msg = error_of(write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n"))
    assert "config.yaml: invalid YAML at line 3" in msg and "duplicate key 'lr'" in msg


def test_file_not_found_and_directory(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == f"config file '{missing}' not found"
    assert error_of(tmp_path) == f"config file '{tmp_path}' is not a file"


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_top_level_must_be_mapping(tmp_path, text, kind):
    msg = error_of(write(tmp_path, text))
    assert msg.startswith(f"{tmp_path / 'config.yaml'}: the top level must be a mapping of sections")
    assert f"got {kind}" in msg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.lr=0", "train.lr must be > 0, got 0.0"),
        ("train.lr=-1e-5", "train.lr must be > 0, got -1e-05"),
        ("model.lora_dropout=1", "model.lora_dropout must be in [0, 1), got 1.0"),
        ("model.lora_dropout=-0.1", "model.lora_dropout must be in [0, 1), got -0.1"),
        ("data.max_length=7", "data.max_length must be >= 8, got 7"),
        ("model.lora_r=0", "model.lora_r must be >= 1, got 0"),
        ("train.max_steps=0", "train.max_steps must be >= 1, got 0"),
        ("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0, got -1"),
    ],
)
def test_range_checks(override, expected):
    assert error_of(None, [override]) == f"override {override!r}: {expected}"


def test_range_limits_are_accepted():
    cfg = load_config(
        None,
        ["train.epochs=1", "train.batch_size=1", "model.lora_dropout=0", "data.max_length=8",
         "model.lora_dropout=0.99"],
        REG,
    )
    assert cfg.data.max_length == 8 and cfg.model.lora_dropout == 0.99


def test_release_mask_needs_plain_template(tmp_path):
    p = write(tmp_path, "data: {mask: release}\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}: data.mask 'release' requires data.template 'plain'")
    assert msg.endswith("got template 'chat'")
    # the override that caused it is named too
    p2 = write(tmp_path, "data: {mask: release, template: plain}\n", "b.yaml")
    msg = error_of(p2, ["data.template=chat"])
    assert msg.startswith(f"{p2} with override 'data.template=chat': data.mask 'release'")
    cfg = load_config(p2, [], REG)
    assert (cfg.data.mask, cfg.data.template) == ("release", "plain")


def test_direct_construction_validates_too():
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(FieldError) as info:
        DataConfig(mask="release")
    assert info.value.key == "mask"


def test_method_post_init_value_error_names_section(tmp_path):
    p = write(tmp_path, "train: {method: toy}\ntoy: {k: -1}\n")
    assert error_of(p) == f"{p}: toy: k must be >= 0, got -1"
    msg = error_of(None, ["train.method=toy", "toy.mode=soft", "toy.rho=2"])
    assert msg == "override 'toy.rho=2': toy.rho must be <= 1 in soft mode, got 2.0"


def test_missing_required_key_in_method_config():
    @dataclass
    class Needs:
        path: str = field(metadata={"help": "required path"})

    msg = error_of(None, ["train.method=needs"], {"needs": Needs})
    assert msg == "config: missing required key 'needs.path'"
    cfg = load_config(None, ["train.method=needs", "needs.path=/x"], {"needs": Needs})
    assert cfg.method_args == Needs(path="/x")


def test_registry_name_clash_is_a_programming_error():
    with pytest.raises(ValueError, match="clashes"):
        load_config(None, [], {"train": PlainConfig})
    with pytest.raises(TypeError, match="dataclass"):
        load_config(None, [], {"sft": dict})


# ---- from_dict ----------------------------------------------------------------------------------


def test_from_dict_generic_and_recursive():
    toy = from_dict(ToyConfig, {"k": 2, "window": {"size": 9}}, "test.yaml")
    assert toy == ToyConfig(k=2, window=Window(size=9))
    with pytest.raises(DualSelectError) as info:
        from_dict(ToyConfig, {"window": {"size": "big"}}, "test.yaml")
    assert str(info.value) == "test.yaml: window.size must be an int, got 'big'"
    with pytest.raises(DualSelectError) as info:
        from_dict(ToyConfig, {"window": {"sise": 1}}, "test.yaml", prefix="toy")
    assert str(info.value).startswith("test.yaml: unknown key 'toy.window.sise' (did you mean 'size'?)")
    with pytest.raises(DualSelectError, match="must be a mapping"):
        from_dict(ToyConfig, ["k"], "test.yaml")


# ---- round trip ---------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "model.lora_targets=[q_proj, k_proj]",
            "model.init_adapter=/a/b",
            "data.columns={prompt: q, response: '123'}",
            "data.task=sst2:train",
            "data.template=plain",
            "data.mask=release",
            "train.method=toy",
            "train.lr=1e-4",
            "train.output_dir=runs/x",
            "toy={k: 3, mode: soft, budget: 0.9, window: {size: 2, names: ['yes', '1']}}",
        ],
        REG,
    )
    d = to_dict(cfg)
    assert d["toy"] == {"k": 3, "mode": "soft", "rho": 0.2, "budget": 0.9,
                        "window": {"size": 2, "names": ["yes", "1"]}}
    assert d["train"]["lr"] == 1e-4 and d["model"]["lora_targets"] == ["q_proj", "k_proj"]
    assert yaml.safe_load(dump_yaml(cfg)) == d
    p = tmp_path / "saved.yaml"
    p.write_text(dump_yaml(cfg))
    again = load_config(p, [], REG)
    assert again == cfg
    assert dump_yaml(again) == dump_yaml(cfg)


def test_round_trip_defaults(tmp_path):
    cfg = load_config(None, [], REG)
    assert to_dict(cfg)["sft"] == {}
    p = tmp_path / "saved.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(p, [], REG) == cfg


# ---- describe -----------------------------------------------------------------------------------


def _describe_line(text, key):
    hits = [line for line in text.splitlines() if line.strip().startswith(key + " ")]
    assert len(hits) == 1, f"{key}: {hits}"
    return hits[0]


def test_describe_lists_every_key_with_default():
    text = describe(REG)
    for section, cls in [("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
                         ("toy", ToyConfig), ("other", OtherConfig)]:
        assert f"\n{section}:" in text
        for f in fields(cls):
            if f.name == "window":
                continue
            line = _describe_line(text, f"{section}.{f.name}")
            assert "default=" in line and f.metadata["help"] in line
    assert "default=smollm2-135m-instruct" in _describe_line(text, "model.name_or_path")
    assert "default=[q_proj, v_proj]" in _describe_line(text, "model.lora_targets")
    assert "default=2e-05" in _describe_line(text, "train.lr")
    assert "default=null" in _describe_line(text, "model.init_adapter")
    assert "default={}" in _describe_line(text, "data.columns")
    assert "default=false" in _describe_line(text, "train.quiet")
    assert "default=4" in _describe_line(text, "toy.k")
    line = _describe_line(text, "model.precision")
    assert "auto|fp32|bf16-autocast|bf16" in line
    assert "hard|soft" in _describe_line(text, "toy.mode")
    assert "str|null" in _describe_line(text, "data.task")
    # nested dataclasses are flattened
    assert "default=3" in _describe_line(text, "toy.window.size")
    assert "default=[a]" in _describe_line(text, "toy.window.names")
    # the registered methods are listed, sections in order
    assert "one of: sft, toy, other" in _describe_line(text, "train.method")
    assert text.index("\nmodel:") < text.index("\ndata:") < text.index("\ntrain:") < text.index("\ntoy:")
    assert "sft:" in text and "(no options)" in text


def test_a_method_section_that_does_not_match_train_method_is_an_error(tmp_path):
    from dualselect.methods import method_configs

    with pytest.raises(DualSelectError, match="override 'dualselect.k_task=4'.*section 'dualselect' sets options of "
                                              "method 'dualselect', but train.method is 'sft'"):
        load_config(None, ["train.method=sft", "dualselect.k_task=4"], method_configs())
    path = tmp_path / "run.yaml"
    path.write_text("train: {method: random}\nrandom: {k_task: 2}\nlisa: {rho: 0.5}\n")
    with pytest.raises(DualSelectError, match="section 'lisa'.*train.method is 'random'"):
        load_config(path, [], method_configs())
    cfg = load_config(path, ["train.method=lisa", "random=null"], method_configs())  # an empty section sets nothing
    assert cfg.method_args.rho == 0.5
