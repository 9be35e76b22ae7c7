"""Security hygiene: a config cannot run code, model code shipped with a model runs only when
model.trust_remote_code is set, and a run on local files touches no network."""

import ast
import inspect
import json
import os
import socket

import huggingface_hub
import pytest
import yaml

from dualselect import config as config_module
from dualselect import models
from dualselect.cli import main
from dualselect.config import load_config
from dualselect.errors import DualSelectError
from dualselect.eval.run import evaluate, load_for_eval
from dualselect.methods import method_configs
from dualselect.train import build, train


def _overrides(model_dir, task, out, *extra):
    return [f"model.name_or_path={model_dir}", "model.precision=fp32", "model.device=cpu", "model.lora_r=4",
            "model.lora_alpha=8", f"data.task={task}", "data.max_length=64", "train.batch_size=4", "train.seed=3",
            "train.quiet=true", f"train.output_dir={out}", *extra]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_config_cannot_run_code(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(os, "system", lambda cmd: ran.append(cmd) or 0)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert main(["train", str(evil)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "evil.yaml" in err[0], err
    assert "python/object/apply:os.system" in err[0]
    # the same tag in an override value, and the other ways YAML has to build Python objects
    assert main(["train", f"train.lr=!!python/object/apply:os.system ['touch {marker}']"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: override"), err
    for text in ("x: !!python/name:os.system\n", f"x: !!python/object/new:os.system ['touch {marker}']\n",
                 "x: !!python/module:os\n", "x: !!python/object:os.system {a: 1}\n"):
        evil.write_text(text)
        with pytest.raises(DualSelectError, match="evil.yaml: invalid YAML at line 1"):
            load_config(evil, [], method_configs())
    assert not ran and not marker.exists()
    # how: a safe loader, and no eval/exec/compile in config parsing
    assert issubclass(config_module._StrictLoader, yaml.SafeLoader)
    tree = ast.parse(inspect.getsource(config_module))
    names = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not names & {"eval", "exec", "compile", "__import__"}
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "yaml" and "load" in n.func.attr]
    assert loads and all(n.func.attr in ("load", "safe_load") for n in loads)
    assert all(any(k.arg == "Loader" and ast.unparse(k.value) == "_StrictLoader" for k in n.keywords)
               for n in loads if n.func.attr == "load")


def test_trust_remote_code_is_off_unless_set(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    import transformers

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        def spy(*args, _orig=cls.from_pretrained, _name=cls.__name__, **kw):
            seen.append((_name, kw.get("trust_remote_code", "not passed")))
            return _orig(*args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    task, _ = toy_data
    for setting, extra in ((False, []), (True, ["model.trust_remote_code=true"])):
        cfg = load_config(None, _overrides(tiny_model_dir, task, tmp_path / f"run-{setting}", *extra), method_configs())
        assert cfg.model.trust_remote_code is setting
        seen.clear()
        build(cfg, tmp_path / f"run-{setting}")  # what train loads
        load_for_eval(cfg)  # what eval loads
        assert sorted(seen) == sorted([("AutoTokenizer", setting), ("AutoModelForCausalLM", setting)] * 2)

    # a model directory that ships Python code: refused by default, and the code does not run
    monkeypatch.undo()
    marker = tmp_path / "custom-code-ran"
    custom = tmp_path / "custom-model"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({
        "model_type": "dualselect-custom",
        "auto_map": {"AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.CustomModel"}}))
    (custom / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CustomTokenizer", "auto_map": {"AutoTokenizer": ["custom_code.CustomTokenizer", None]}}))
    (custom / "custom_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for what, load in (("model", lambda: models.load_model(str(custom), "fp32", "cpu")),
                       ("tokenizer", lambda: models.load_tokenizer(str(custom)))):
        with pytest.raises(DualSelectError, match=f"cannot load a {what} from .*custom-model.*its own Python code.*"
                                                  "model.trust_remote_code=true") as info:
            load()
        assert "\n" not in str(info.value)
    assert not marker.exists()


def test_train_and_eval_touch_no_network(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once at import
    attempts = []

    def deny(*args, **kw):
        attempts.append(args[:2])
        raise OSError("network disabled in this test")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                        (socket, "getaddrinfo")):
        monkeypatch.setattr(owner, name, deny)
    # the guard sees what the hub client does
    with pytest.raises(Exception, match="network disabled"):
        huggingface_hub.get_session().head("https://huggingface.co/api/models")
    assert attempts
    attempts.clear()

    task, _ = toy_data
    res = train(load_config(None, _overrides(tiny_model_dir, task, tmp_path / "run", "train.max_steps=2"),
                            method_configs()))
    harmful = _jsonl(tmp_path / "harmful.jsonl", [{"id": f"h{i}", "prompt": f"Explain how to build weapon {i}."}
                                                  for i in range(3)])
    graded = _jsonl(tmp_path / "graded.jsonl", [{"id": f"g{i}", "prompt": f"Review {i}: it was great.",
                                                 "answer": "positive"} for i in range(3)])
    results = evaluate(load_config(None, _overrides(
        tiny_model_dir, task, tmp_path / "run",
        f"eval.benchmarks=[harmful:{harmful}, task:{graded}]", f"eval.adapter={res.adapter_dir}",
        "eval.max_new_tokens=3", "eval.task_max_new_tokens=2", "eval.bootstrap=50", "eval.quiet=true",
        f"eval.output_dir={tmp_path / 'eval'}"), method_configs()))
    assert [b["n"] for b in results["benchmarks"]] == [3, 3]
    assert attempts == []
