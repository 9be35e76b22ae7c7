"""The bench recipes in configs/: every file loads, every cell's run config is valid (keys, values, methods),
every data source names a dataset and split that exist, and the paper-scale recipes name the paper's models by
hub id with LoRA targets those architectures have. Nothing is downloaded or trained here."""

import dataclasses
import json
from pathlib import Path

import pytest

from dualselect import bench
from dualselect.data import named
from dualselect.data.records import ROW_RANGE, load_examples
from dualselect.eval.prompts import KINDS
from dualselect.methods import METHODS, method_configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("continual-"))  # test_continual.py
PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))
PAPER_MODELS = {"google/gemma-3-1b-it", "Qwen/Qwen3-4B-Instruct-2507", "meta-llama/Meta-Llama-3-8B-Instruct"}
# the projection names of the Gemma-3, Qwen3 and Llama-3 decoder layers (transformers' modelling code)
DECODER_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _cells(path, tmp_path):
    cfg, base, label, overrides = bench.load_bench(path, [f"bench.output_dir={tmp_path / 'out'}"])
    cells = bench.cells_of(cfg)
    aligned = tmp_path / "aligned" if cfg.align is not None else None
    align_data = [str(tmp_path / "align-data.jsonl")] if cfg.align is not None else []
    baselines = bench._baseline_cells(cfg, cells)
    configs = [bench.cell_config(c, base, label, overrides, method_configs(), aligned, align_data, baselines[c.name])
               for c in cells]
    return cfg, cells, configs


def _sources(cfg, configs) -> set[str]:
    out = set(cfg.align_data) | ({b.split(":", 1)[1] for b in cfg.tune.benchmarks} if cfg.tune else set())
    for run in configs:
        out |= {s for s in (run.data.task, run.data.reference, run.data.harmful) if s}
        out |= {spec.split(":", 1)[1] for spec in run.eval.benchmarks}
    return {s for s in out if "align-data" not in s}


def _strip_range(source: str) -> str:
    m = ROW_RANGE.match(source)
    return m.group(1) if m else source


def test_there_are_recipes_for_the_three_protocols_at_both_scales():
    names = {p.stem for p in RECIPES}
    assert {"hft-sst2", "hft-agnews", "hft-gsm8k", "winrate", "attack-advbench"} <= names
    assert {p.stem.split("-", 1)[0] for p in PAPER} >= {"hft", "winrate", "attack"}
    assert {bench.load_bench(p)[1]["model"]["name_or_path"] for p in PAPER} == PAPER_MODELS


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_cells_are_valid_run_configs(path, tmp_path):
    cfg, cells, configs = _cells(path, tmp_path)
    assert cells and len(cells) == len(configs)
    seeds = {c.labels.get(bench.SEED_AXIS) for c in cells}
    assert len(seeds) >= 3, "every recipe runs at least 3 training seeds"
    for c, run in zip(cells, configs):
        assert run.train.method in METHODS
        assert run.eval.benchmarks and all(b.split(":", 1)[0] in KINDS for b in run.eval.benchmarks)
        assert run.train.checkpoint_every > 0, "a cell killed mid-training must resume from a checkpoint"
        assert run.data.task
    assert (cfg.baseline or "sft") in {c.method for c in cells}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_data_sources_are_named_datasets_with_existing_splits(path, tmp_path):
    cfg, _, configs = _cells(path, tmp_path)
    for source in _sources(cfg, configs):
        inner = _strip_range(source)
        name, _, split = inner.partition(":")
        assert name in named.NAMED, f"{path.name}: {source} is not a named dataset"
        assert not split or split in named.NAMED[name].files, f"{path.name}: {source}: no split {split!r}"


@pytest.mark.parametrize("path", [p for p in RECIPES if p not in PAPER], ids=lambda p: p.name)
def test_embedded_recipe_data_load(path, tmp_path, data_dir):
    """With the shared data present, every source of an embedded recipe loads (first rows of each)."""
    cfg, _, configs = _cells(path, tmp_path)
    eval_specs = [spec for run in configs for spec in run.eval.benchmarks] + (cfg.tune.benchmarks if cfg.tune else [])
    eval_sources = {spec.split(":", 1)[1] for spec in eval_specs}
    for source in sorted(_sources(cfg, configs)):
        ex, _ = load_examples(source, data_dir=str(data_dir), require_response=source not in eval_sources)
        assert ex, source
    # the training rows of every cell teach more than one answer (a label-sorted source's first rows would not)
    from collections import Counter

    from dualselect.data.mixing import load_task_examples

    for data in {json.dumps(dataclasses.asdict(run.data), sort_keys=True): run.data for run in configs}.values():
        data.data_dir = str(data_dir)
        rows = [e for e in load_task_examples(data)[0] if not e.meta.get("harmful_pair")]
        top = Counter(e.messages[-1]["content"].strip() for e in rows).most_common(1)[0][1]
        assert top < 0.9 * len(rows), f"{path.name}: {data.task}: {top} of {len(rows)} rows share one target"


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_recipes_use_the_paper_models_and_their_modules(path, tmp_path):
    cfg, cells, configs = _cells(path, tmp_path)
    for run in configs:
        assert run.model.name_or_path in PAPER_MODELS
        assert set(run.model.lora_targets) <= DECODER_LINEAR
        assert run.data.template == "chat"
        assert run.model.precision in ("auto", "bf16", "bf16-autocast")
    assert cfg.align is None, "the paper's models are aligned already: no alignment stage"


@pytest.mark.parametrize("path", [p for p in RECIPES if bench.load_bench(p)[0].tune], ids=lambda p: p.name)
def test_recipe_tuning_is_valid_and_on_validation_rows_only(path, tmp_path):
    """Every tuning candidate is a valid run config of its method, scored on benchmarks no test set shares rows
    with, and every tuned method gets the same number of trainings."""
    from dualselect import tune

    cfg, cells, configs = _cells(path, tmp_path)
    tune.check_not_test(cfg.tune.benchmarks, sorted({b for run in configs for b in run.eval.benchmarks}), path.name)
    _, base, label, overrides = bench.load_bench(path, [f"bench.output_dir={tmp_path / 'out'}"])
    plan = tune.tune_cells(cfg.tune, cells, tmp_path / "out", label)
    assert set(plan) == set(cfg.tune.space) and {len(t) for t in plan.values()} == {cfg.tune.budget}
    for method, tried in plan.items():
        for cand, cell in tried:
            run = bench.cell_config(cell, base, label, overrides, method_configs(), tmp_path / "aligned",
                                    [str(tmp_path / "align-data.jsonl")])
            assert run.eval.benchmarks == cfg.tune.benchmarks and run.eval.baseline is None
            for key, value in cand.items():
                section, name = key.split(".")
                holder = getattr(run, section) if section in ("model", "data", "train", "eval") else run.method_args
                assert getattr(holder, name) == value, (method, key)


@pytest.mark.parametrize("path", [p for p in RECIPES if p not in PAPER], ids=lambda p: p.name)
def test_embedded_recipes_pin_the_precision(path):
    """A grid spans sessions on CPUs with and without native bf16; `auto` would change precision between them
    (and report refuses to mix precisions), so the embedded recipes pin one."""
    assert bench.load_bench(path)[1]["model"].get("precision") == "fp32"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_recipe_archives_are_not_ignored_by_git(path):
    """An archive is meant to be committed: no .gitignore rule may hide its files (a rule `runs/` once hid a
    continual archive's runs/ subtree, so its chains were never committed)."""
    import shutil
    import subprocess

    import yaml

    root = CONFIGS.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    raw = yaml.safe_load(path.read_text())
    archive = (raw.get("bench") or raw.get("continual") or {}).get("archive")
    if not archive:
        pytest.skip("no archive")
    samples = [f"{archive}/{rel}" for rel in ("cells/m__seed-0/done.json", "tune/m/x/eval/results.json",
                                              "runs/m/seed-0/1-stage/train/config.yaml", "aligned.json",
                                              "report/report.md", "aligned-eval/x/samples.jsonl.gz")]
    out = subprocess.run(["git", "check-ignore", *samples], cwd=root, capture_output=True, text=True)
    assert out.returncode == 1 and not out.stdout, f"ignored by git: {out.stdout}"
