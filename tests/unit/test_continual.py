"""`dualselect continual`: config validation, the retention pool, the metrics against a hand computation, the
recipes, and a tiny end-to-end run (2 stages x 2 methods x 1 seed, tiny random Llama, generated data) that is
stopped between stages and resumed without recomputing the finished ones."""

import copy
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from dualselect import bench, continual, continual_metrics, continual_pool
from dualselect.cli import main
from dualselect.errors import DualSelectError
from dualselect.eval import report as eval_report
from dualselect.methods import METHODS, method_configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _base(out: Path, model="smollm2-135m-instruct") -> dict:
    return {
        "model": {"name_or_path": str(model), "lora_r": 4, "lora_alpha": 8, "precision": "fp32"},
        "data": {"reference": "{demo_data}/safety/reference.jsonl", "template": "plain", "max_length": 64},
        "train": {"batch_size": 4, "epochs": 1, "lr": 1.0e-3, "checkpoint_every": 1},
        "eval": {"benchmarks": ["harmful:{demo_data}/safety/heldout_harmful.jsonl",
                                "overrefusal:{demo_data}/safety/heldout_benign.jsonl"],
                 "limit": 3, "max_new_tokens": 4, "task_max_new_tokens": 2, "batch_size": 4},
        "dualselect": {"warmup_steps": 1, "k_task": 2, "k_ref": 3},
        "continual": {
            "output_dir": str(out),
            "stages": [{"name": "sentiment", "task": "{demo_data}/sentiment_train.jsonl[:8]",
                        "benchmark": "task:{demo_data}/sentiment_test.jsonl"},
                       {"name": "arithmetic", "task": "{demo_data}/arithmetic_train.jsonl[:8]",
                        "benchmark": "task:{demo_data}/arithmetic_test.jsonl"}],
            "retention": {"per_stage": 4, "quotas": {"safety": 4}, "seed": 0},
            "methods": {"replay": ["train.method=sft", "data.task={replay}"],
                        "dualselect-retention": ["train.method=dualselect", "data.reference={pool}"]},
            "seeds": [0],
            "resamples": 50,
        },
    }


def _write(tmp_path: Path, cfg: dict, name="c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _prepared(path: Path, overrides=()):
    cc, base, label, ovr = continual.load_continual(path, list(overrides))
    reg = method_configs()
    data = continual.prepare_data(cc, base, label, ovr, reg)
    return cc, base, label, ovr, reg, data


# ------------------------------------------------------------------------------------------ validation

def _edit(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    node, keys = cfg, path.split("/")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is KeyError:
        del node[keys[-1]]
    elif isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value
    return cfg


@pytest.mark.parametrize("where, value, message", [
    ("continual/stages", [{"name": "a", "task": "x.jsonl", "benchmark": "task:y.jsonl"}], "needs at least 2"),
    ("continual/stages/1/name", "sentiment", "two stages have the name 'sentiment'"),
    ("continual/stages/1/name", "safety", "reserved for the safety pool"),
    ("continual/stages/1/name", "a b", "must be a plain name"),
    ("continual/stages/1/benchmark", "harmful:advbench", "must be task:SOURCE"),
    ("continual/stages/1/task", KeyError, "task is missing"),
    ("continual/stages/1/overrides", ["eval.limit=5"], "eval settings are shared"),
    ("continual/stages/1/overrides", ["train.seed=4"], "continual.seeds sets it"),
    ("continual/stages/1/overrides", ["data.reference=x.jsonl"], "the safety pool is shared"),
    ("continual/retention/quotas", {"gsm8k": 3}, "retention.quotas.gsm8k: not a stage"),
    ("continual/retention/quotas", {"arithmetic": 3}, "the last stage is never retained"),
    ("continual/retention/quotas", {"sentiment": 3, "safety": 4}, "retention.per_stage is set, but every earlier"),
    ("continual/retention/per_stage", None, "stage 'sentiment' has no quota and retention.per_stage is not set"),
    ("continual/retention/per_stage", -1, "per_stage must be >= 0"),
    ("continual/methods", {"sft": ["train.method=sft"]}, "no method uses {pool} or {replay}"),
    ("continual/methods", {"r": ["data.task={replay}"]}, "quotas.safety is set, but no method uses {pool}"),
    ("continual/demo_seed", 3, None),
    ("continual/methods", {}, "name at least one"),
    ("continual/methods/replay", ["data.reference=refs.jsonl"], "data.reference only to {pool}"),
    ("continual/methods/replay", ["data.task={pool}"], "data.task only to {replay}"),
    ("continual/methods/replay", ["train.method={pool}"], "unknown placeholder"),
    ("continual/methods/replay", ["eval.limit=2"], "eval settings are shared by every method"),
    ("continual/methods/replay", ["model.init_adapter=x"], "starts from the adapter of stage t - 1"),
    ("continual/methods/replay", ["data.task_limit=3"], "the stages define the training data"),
    ("continual/seeds", [1, 1], "distinct ints"),
    ("continual/align_data", ["x.jsonl"], "align_data is set but align is not"),
    ("data/task", "x.jsonl", "each stage names its own task data"),
])
def test_bad_configs_get_one_line_errors(tmp_path, where, value, message):
    cfg = _edit(_base(tmp_path / "out"), where, value)
    if message is None:  # a setting that is applied here (demo_seed with {demo_data}) is refused without a use
        continual.load_continual(_write(tmp_path, cfg))
        assert (tmp_path / "out" / "demo-data" / "seed-3" / "done").exists()
        cfg = json.loads(json.dumps(cfg).replace("{demo_data}", str(tmp_path / "d")))
        message = "demo_seed is set, but no source uses {demo_data}"
    elif where.startswith("continual/methods") and value == {"sft": ["train.method=sft"]}:
        del cfg["continual"]["retention"]["per_stage"], cfg["continual"]["retention"]["quotas"]
        cfg["continual"]["retention"]["seed"] = 0  # the section alone, however it is set
    path = _write(tmp_path, cfg)
    with pytest.raises(DualSelectError, match=message) as e:
        continual.load_continual(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(path))


def test_no_continual_section_and_unknown_method_are_refused(tmp_path):
    cfg = _base(tmp_path / "out")
    path = _write(tmp_path, {k: v for k, v in cfg.items() if k != "continual"}, "plain.yaml")
    with pytest.raises(DualSelectError, match="no continual section"):
        continual.load_continual(path)
    cfg = _edit(cfg, "continual/methods/replay", ["train.method=nosuch", "data.task={replay}"])
    args = _prepared(_write(tmp_path, cfg))
    with pytest.raises(DualSelectError, match=r"method replay, seed 0, stage sentiment.*'nosuch' is not registered"):
        continual.plan(*args)


def test_quota_larger_than_the_data_is_refused(tmp_path):
    cfg = _edit(_base(tmp_path / "out"), "continual/retention/per_stage", 9)  # 8 sentiment rows
    with pytest.raises(DualSelectError, match=r"9 rows of stage 'sentiment' asked, but its training data has 8"):
        _prepared(_write(tmp_path, cfg))
    cfg = _edit(_base(tmp_path / "out"), "continual/retention/quotas", {"safety": 1000})
    with pytest.raises(DualSelectError, match="1000 rows asked, but the safety pool .* has 100"):
        _prepared(_write(tmp_path, cfg))


def test_a_method_section_no_method_trains_is_refused(tmp_path):
    cfg = _base(tmp_path / "out")
    cfg["safegrad"] = {"ref_batch_size": 2}
    with pytest.raises(DualSelectError, match="section 'safegrad' .* no method of continual.methods trains it"):
        continual.plan(*_prepared(_write(tmp_path, cfg)))


# ------------------------------------------------------------------------------------------ the retention pool

def _stage(name, n, harmful=()):
    return [{"id": f"{name}-{i}", "messages": [], **({"harmful_pair": True} if i in harmful else {})}
            for i in range(n)]


def test_pool_composition_sizes_sources_and_seeding():
    rows = {"a": _stage("a", 10, harmful={0, 1}), "b": _stage("b", 12), "c": _stage("c", 9)}
    safety = _stage("s", 6)
    names = ["a", "b", "c"]
    pools = [continual_pool.pool_rows(safety, rows, names, t, 3, {"b": 5, "safety": 4}, seed=7) for t in range(3)]
    assert [len(p) for p in pools] == [4, 4 + 3, 4 + 3 + 5]
    assert [continual_pool.counts_by_source([r["id"] for r in p]) for p in pools] == [
        {"safety": 4}, {"safety": 4, "a": 3}, {"safety": 4, "a": 3, "b": 5}]
    for t, pool in enumerate(pools):
        assert all(r["id"] == f"{r['retention_source']}/{r['id'].split('/', 1)[1]}" for r in pool)
        assert {r["retention_source"] for r in pool} <= {"safety", *names[:t]}  # nothing of this or a later stage
        assert len({r["id"] for r in pool}) == len(pool)
    assert not any(r.get("harmful_pair") for p in pools for r in p)  # harmful pairs are never retained
    # the sample of a source is the same at every later stage, and seeded
    a1 = [r["id"] for r in pools[1] if r["retention_source"] == "a"]
    assert a1 == [r["id"] for r in pools[2] if r["retention_source"] == "a"]
    assert pools == [continual_pool.pool_rows(safety, rows, names, t, 3, {"b": 5, "safety": 4}, seed=7)
                     for t in range(3)]
    others = [[r["id"] for r in continual_pool.pool_rows(safety, rows, names, 2, 3, {"b": 5, "safety": 4}, seed=s)]
              for s in range(8, 12)]
    assert any(o != [r["id"] for r in pools[2]] for o in others)
    # without a safety quota: the whole safety pool, in order
    assert [r["id"] for r in continual_pool.pool_rows(safety, rows, names, 0, 3, {}, 0)] == \
        [f"safety/s-{i}" for i in range(6)]


def test_pool_and_replay_files_of_a_config(tmp_path):
    *_, data = _prepared(_write(tmp_path, _base(tmp_path / "out")))
    pool2 = [json.loads(x) for x in data.pools[1].read_text().splitlines()]
    assert continual_pool.counts_by_source([r["id"] for r in pool2]) == {"safety": 4, "sentiment": 4}
    stage1 = {r["id"] for r in map(json.loads, data.files[0].read_text().splitlines())}
    stage2 = {r["id"] for r in map(json.loads, data.files[1].read_text().splitlines())}
    assert {r["id"].split("/", 1)[1] for r in pool2 if r["retention_source"] == "sentiment"} <= stage1
    assert not {r["id"].split("/", 1)[1] for r in pool2} & stage2  # no row of the stage itself
    replay2 = [json.loads(x) for x in data.replays[1].read_text().splitlines()]
    assert len(replay2) == 8 + 4 and {r["id"] for r in replay2[:8]} == stage2
    assert [r["id"] for r in replay2[8:]] == [r["id"] for r in pool2 if r["retention_source"] == "sentiment"]
    assert data.replays[0] == data.files[0] and data.pools[0] is not None


# ------------------------------------------------------------------------------------------ metrics

def test_metrics_against_a_hand_computation():
    a = [[0.8], [0.6, 0.9], [0.5, 0.7, 0.95]]
    continual_metrics.check_matrix(a)
    assert continual_metrics.average_accuracy(a) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert continual_metrics.forgetting(a) == pytest.approx([0.5 - 0.8, 0.7 - 0.9])
    assert continual_metrics.backward_transfer(a) == pytest.approx(-0.25)
    arrays = [[np.array(v) for v in row] for row in ([[0.8, 0.6]], [[0.6, 0.4], [0.9, 1.0]])]
    assert continual_metrics.backward_transfer(arrays) == pytest.approx(np.array([-0.2, -0.2]))
    with pytest.raises(ValueError, match="row 1 has 1 values, expected 2"):
        continual_metrics.check_matrix([[0.5], [0.5]])
    with pytest.raises(ValueError, match="at least 2 stages"):
        continual_metrics.backward_transfer([[0.5]])


def test_one_key_interval_is_the_report_bootstrap():
    per_seed = [[1, 0, 1, 1], [0, 0, 1], [1, 1, 1, 0, 1]]
    ours = continual_metrics.two_level_ci([{"k": v} for v in per_seed], ["k"], lambda m: m["k"], 300, seed=5)
    assert ours == eval_report.two_level_bootstrap_ci(per_seed, 300, 5)


def test_summary_of_a_method_by_hand():
    names, tasks = ["a", "b"], ["task:a", "task:b"]
    seeds = [{(0, "task:a"): [1, 1, 0, 0], (1, "task:a"): [1, 0, 0, 0], (1, "task:b"): [1, 1, 1, 0],
              (0, "harmful:h"): [1, 1], (1, "harmful:h"): [0, 1]},
             {(0, "task:a"): [1, 1, 1, 0], (1, "task:a"): [0, 0, 0, 0], (1, "task:b"): [1, 1, 1, 1],
              (0, "harmful:h"): [1, 0], (1, "harmful:h"): [0, 0]}]
    s = continual_metrics.summarize_method(names, tasks, {"harmful:h": "harmful"}, seeds, 200, 0, "m")
    assert s["accuracy"][0][0]["value"] == pytest.approx((0.5 + 0.75) / 2)
    assert s["accuracy"][1][1]["value"] == pytest.approx((0.75 + 1.0) / 2)
    assert s["average_accuracy"]["value"] == pytest.approx(((0.25 + 0.75) / 2 + (0 + 1.0) / 2) / 2)
    assert s["bwt"]["value"] == pytest.approx(((0.25 - 0.5) + (0.0 - 0.75)) / 2)
    assert s["bwt"]["per_seed"] == pytest.approx([-0.25, -0.75])
    assert s["forgetting"][0]["value"] == pytest.approx(s["bwt"]["value"])  # one earlier task
    lo, hi = s["bwt"]["ci95"]
    assert lo <= s["bwt"]["value"] <= hi
    assert [c["value"] for c in s["safety"]["harmful:h"]["per_stage"]] == pytest.approx([0.75, 0.25])
    assert s["safety"]["harmful:h"]["metric"] == "refusal_rate"


# ------------------------------------------------------------------------------------------ recipes

def test_answer_shares_targets_and_chosen_references_by_target(tmp_path):
    """The most frequent answer of a label task (a collapse shows as a share near 1), and the retained references
    of each refresh counted by target, on hand-built files."""
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "results.json").write_text(json.dumps({"benchmarks": [
        {"name": "task:s", "kind": "task", "n": 4}, {"name": "task:m", "kind": "task", "n": 2}]}))
    preds = ["negative", "negative", "positive", "negative"]
    rows = [{"benchmark": "task:s", "id": f"s{i}", "grader": "label", "pred": p, "correct": i < 2}
            for i, p in enumerate(preds)]
    rows += [{"benchmark": "task:m", "id": f"m{i}", "grader": "number", "pred": "7", "correct": True} for i in range(2)]
    (ev / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert continual_metrics.answer_shares(ev, ["task:s", "task:m", "task:absent"]) == {
        "task:s": {"answer": "negative", "share": 0.75}}

    def row(i, target):
        return {"id": i, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": target}]}
    pool = tmp_path / "pool.jsonl"
    lines = [row("safety/a", "I can't help."), row("sst2/x1", "negative"), row("sst2/x2", " positive "),
             *(row(f"gsm/g{i}", f"answer {i}") for i in range(11))]  # 11 distinct targets: not a label task
    pool.write_text("".join(json.dumps(r) + "\n" for r in lines))
    targets = continual_metrics.label_targets(pool)
    assert targets == {"sst2/x1": "negative", "sst2/x2": "positive"} and continual_metrics.label_targets(None) == {}
    train = tmp_path / "train"
    train.mkdir()
    events = [{"kind": "refresh", "ids": ["safety/a", "sst2/x1", "sst2/x1", "gsm/g1"]}, {"kind": "step", "ids": []},
              {"kind": "refresh", "ids": ["sst2/x2"]}]
    (train / "selection.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert continual_metrics.reference_targets(train, targets) == [{"sst2: negative": 2}, {"sst2: positive": 1}]
    assert continual._mean_counts([{"a": 2}, {"a": 1, "b": 3}], 3) == {"a": 1.0, "b": 1.0}


def test_the_recipes_load_and_every_stage_run_is_valid(tmp_path):
    for name in ("continual-sst2-agnews-gsm8k.yaml", "continual-demo.yaml"):
        cc, base, label, ovr = continual.load_continual(CONFIGS / name, [f"continual.output_dir={tmp_path / name}"])
        assert len(cc.stages) >= 3 and len(cc.seeds) >= 3
        assert {"sft", "replay", "agem", "dualselect-safety", "dualselect-retention"} <= set(cc.methods)
        n = len(cc.stages)
        fake = continual.StageData([tmp_path / f"s{k}.jsonl" for k in range(n)], tmp_path / "safety.jsonl",
                                   [tmp_path / f"p{k}.jsonl" for k in range(n)],
                                   [tmp_path / f"r{k}.jsonl" for k in range(n)], [])
        cells = continual.plan(cc, base, label, ovr, method_configs(), fake)
        assert len(cells) == n * len(cc.methods) * len(cc.seeds)
        for cell, cfg in cells:
            k = [s.name for s in cc.stages].index(cell.labels["stage"])
            assert cfg.train.method in METHODS and cfg.train.checkpoint_every > 0
            assert cfg.model.precision == "fp32"
            assert cfg.eval.benchmarks[:k + 1] == [s.benchmark for s in cc.stages[:k + 1]]
            assert (cfg.model.init_adapter is not None) == (k > 0)
            if cell.method in ("agem", "dualselect-retention"):
                assert cfg.data.reference == str(tmp_path / f"p{k}.jsonl")
            if cell.method in ("replay", "dualselect-replay"):
                assert cfg.data.task == str(tmp_path / f"r{k}.jsonl")
        assert cc.retention.per_stage and cc.retention.quotas.get("safety")
        # a selection (--only) plans its own cells, and a changed config of another method's started cell (which
        # another process may be running) does not block it; the whole plan still refuses it
        other = next(c for c, _ in cells if c.method == "replay")
        (other.path / "cell.yaml").parent.mkdir(parents=True)
        (other.path / "cell.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.123}}))
        mine = continual.plan(cc, base, label, ovr, method_configs(), fake, methods=["sft", "agem"], seeds=[1])
        assert [(c.method, c.labels[bench.SEED_AXIS]) for c, _ in mine] == [("sft", "1")] * n + [("agem", "1")] * n
        with pytest.raises(DualSelectError, match="started with another config"):
            continual.plan(cc, base, label, ovr, method_configs(), fake)


def test_the_shared_data_recipe_writes_its_pools(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("DUALSELECT_DATA_DIR", str(data_dir))
    *_, data = _prepared(CONFIGS / "continual-sst2-agnews-gsm8k.yaml", [f"continual.output_dir={tmp_path}"])
    assert [f["n_train"] for f in data.facts] == [300, 300, 300]
    assert [f["pool"]["by_source"] for f in data.facts] == [
        {"safety": 200}, {"safety": 200, "sst2": 40}, {"safety": 200, "sst2": 40, "ag_news": 40}]
    assert [sum(f["replay"]["by_source"].values()) for f in data.facts] == [0, 40, 80]
    # ag_news:dev is sorted by label: the stage takes 300 rows in a fixed random order, all four labels
    from collections import Counter

    rows = [json.loads(line) for line in Path(data.facts[1]["file"]).read_text().splitlines()]
    labels = Counter(r["messages"][-1]["content"] for r in rows)
    assert set(labels) == {"World", "Sports", "Business", "Sci/Tech"} and max(labels.values()) < 0.4 * 300


# ------------------------------------------------------------------------------------------ end to end

def test_two_stages_two_methods_stop_between_stages_and_resume(tmp_path, tiny_model_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    path = _write(tmp_path, _base(out, tiny_model_dir))
    real = bench.run_cell
    ran = []

    def stop_after_two(cell, cfg, *a):
        if len(ran) == 2:
            raise KeyboardInterrupt
        ran.append(cell.path)
        return real(cell, cfg, *a)

    monkeypatch.setattr(bench, "run_cell", stop_after_two)
    assert main(["continual", str(path), "--quiet"]) == 130
    runs = out / "runs"
    first = [runs / "replay" / "seed-0" / "1-sentiment", runs / "replay" / "seed-0" / "2-arithmetic"]
    assert ran == first and all((p / "done.json").exists() for p in first)
    assert not (runs / "dualselect-retention").exists() and not (out / "continual.json").exists()
    stamps = {p: (p / "done.json").stat().st_mtime_ns for p in first}
    stage2 = yaml.safe_load((first[1] / "cell.yaml").read_text())
    assert stage2["model"]["init_adapter"] == str(first[0] / "train" / "adapter")

    ran.clear()
    monkeypatch.setattr(bench, "run_cell", lambda cell, cfg, *a: (ran.append(cell.path), real(cell, cfg, *a))[1])
    assert main(["continual", str(path), "--quiet"]) == 0
    assert ran == [runs / "dualselect-retention" / "seed-0" / "1-sentiment",
                   runs / "dualselect-retention" / "seed-0" / "2-arithmetic"]
    assert {p: (p / "done.json").stat().st_mtime_ns for p in first} == stamps  # finished stages not recomputed

    result = json.loads((out / "continual.json").read_text())
    assert set(result["methods"]) == {"replay", "dualselect-retention"}
    for info in result["methods"].values():
        acc = info["accuracy"]
        assert [len(row) for row in acc] == [1, 2]
        assert all(0 <= c["value"] <= 1 for row in acc for c in row)
        assert info["bwt"]["value"] == pytest.approx(acc[1][0]["value"] - acc[0][0]["value"])
        assert [len(v["per_stage"]) for v in info["safety"].values()] == [2, 2]
    # the refresh logs say where the chosen references came from: stage 2's pool holds safety and sentiment rows
    refs = result["methods"]["dualselect-retention"]["references"]
    assert [r["stage"] for r in refs] == ["sentiment", "arithmetic"]
    assert set(refs[0]["mean_by_source"]) == {"safety"}
    assert set(refs[1]["mean_by_source"]) <= {"safety", "sentiment"} and sum(refs[1]["mean_by_source"].values()) == 3
    assert result["methods"]["replay"]["references"] == []
    # the retained references of stage 2 by target: as many as the sentiment references it chose
    assert sum(refs[1]["mean_by_target"].values()) == refs[1]["mean_by_source"].get("sentiment", 0)
    assert all(k.startswith("sentiment: ") for k in refs[1]["mean_by_target"])
    # the most frequent answer of each label task after each stage, from the samples
    for m in ("replay", "dualselect-retention"):
        answers = result["methods"][m]["answers"]
        assert [a["stage"] for a in answers] == ["sentiment", "arithmetic"]  # arithmetic is not label-graded
        for a, stage in zip(answers, ["1-sentiment", "2-arithmetic"]):
            recs = [json.loads(line) for line in (runs / m / "seed-0" / stage / "eval" / "samples.jsonl")
                    .read_text().splitlines()]
            preds = [r["pred"] for r in recs if r["benchmark"] == a["benchmark"]]
            assert "sentiment" in a["benchmark"] and len(preds) == 3  # eval.limit
            top = max(set(preds), key=preds.count)
            assert a["per_seed"][0]["share"] == pytest.approx(preds.count(top) / len(preds))
    report = out / "report"
    for name in ("report.md", "report.html", "accuracy_matrix.png", "forgetting.png", "safety_per_stage.png"):
        assert (report / name).stat().st_size > 0
    text = (report / "report.md").read_text()
    assert "## Accuracy matrix" in text and "BWT" in text and "## References chosen per source" in text
    assert "## Most frequent answer" in text and "retained rows by target" in text
    a = result["methods"]["replay"]["answers"][0]  # one seed: its share is the mean, written with its answer
    assert f"{100 * a['mean_share']:.1f} ({a['per_seed'][0]['answer']} {100 * a['per_seed'][0]['share']:.1f})" in text

    ran.clear()  # a third run recomputes nothing and writes the same numbers
    assert main(["continual", str(path), "--quiet"]) == 0
    assert ran == [] and json.loads((out / "continual.json").read_text()) == result
    # a changed setting of a finished stage is refused, naming the continual section's key
    assert main(["continual", str(path), "--quiet", "train.lr=0.5"]) == 2
    assert "started with another config" in (err := capsys.readouterr().err) and "continual.output_dir" in err


def test_paired_differences_take_the_seed_as_the_unit():
    def summary(avg, bwt, refusal):
        est = lambda v: {"value": sum(v) / len(v), "ci95": None, "per_seed": v}
        return {"average_accuracy": est(avg), "bwt": est(bwt),
                "safety": {"harmful:h": {"per_stage": [est([0.0] * len(refusal)), est(refusal)]}}}
    m = summary([0.5, 0.7, 0.9], [-0.1, -0.1, -0.1], [0.8, 0.9, 1.0])
    b = summary([0.4, 0.5, 0.6], [-0.2, -0.2, -0.2], [0.8, 0.9, 1.0])
    c = continual_metrics.compare_methods(m, b, "m", "b", {"harmful:h": "harmful"})
    assert (c["method"], c["baseline"]) == ("m", "b")
    avg = c["metrics"]["average accuracy"]
    # per-seed differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3); df 2: p = 1 - t / sqrt(2 + t^2)
    t = 0.2 / (0.1 / 3 ** 0.5)
    assert avg["test"] == "paired t over seeds" and avg["df"] == 2
    assert avg["mean_difference"] == pytest.approx(0.2)
    assert avg["p_value"] == pytest.approx(1 - t / (2 + t * t) ** 0.5, rel=1e-4)
    # t quantile 0.975, df 2 = 4.302653
    assert avg["ci95"] == pytest.approx((0.2 - 4.302653 * 0.1 / 3 ** 0.5, 0.2 + 4.302653 * 0.1 / 3 ** 0.5), rel=1e-4)
    bwt = c["metrics"]["BWT"]  # the same difference for every seed: no t interval, the exact sign-flip p = 2 / 8
    assert bwt["ci95"] is None and bwt["p_value"] == pytest.approx(0.25)
    assert bwt["mean_difference"] == pytest.approx(0.1)
    refusal = c["metrics"]["harmful:h refusal (last stage)"]
    assert refusal["mean_difference"] == 0.0 and refusal["p_value"] == 1.0


def test_compare_pairs_are_checked_and_default_to_the_first_method(tmp_path):
    cfg = _base(tmp_path / "out")
    cc = continual.load_continual(_write(tmp_path, cfg))[0]
    assert cc.pairs() == [("dualselect-retention", "replay")]
    cfg["continual"]["compare"] = [["replay", "nope"]]
    with pytest.raises(DualSelectError, match="'nope' is not a method"):
        continual.load_continual(_write(tmp_path, cfg))


def test_finished_chains_are_archived_and_restored_without_recomputing(tmp_path, tiny_model_dir, monkeypatch,
                                                                     capsys):
    out, archive = tmp_path / "out", tmp_path / "archive"
    cfg = _base(out, tiny_model_dir)
    cfg["continual"]["methods"] = {"replay": cfg["continual"]["methods"]["replay"]}
    cfg["continual"]["retention"] = {"per_stage": 4, "seed": 0}
    del cfg["dualselect"]
    cfg["continual"]["seeds"] = [0, 1]
    cfg["continual"]["archive"] = str(archive)
    path = _write(tmp_path, cfg)
    real, ran = bench.run_cell, []

    def stop_in_second_chain(cell, cfg, *a):
        if len(ran) == 3:
            raise KeyboardInterrupt
        ran.append(cell.path)
        return real(cell, cfg, *a)

    monkeypatch.setattr(bench, "run_cell", stop_in_second_chain)
    assert main(["continual", str(path), "--quiet"]) == 130
    arch = archive / "runs" / "replay"
    assert sorted(p.parent.relative_to(arch).as_posix() for p in arch.rglob("done.json")) == \
        ["seed-0/1-sentiment", "seed-0/2-arithmetic"]  # seed 1's chain stopped after its first stage: not archived
    assert not list(archive.rglob("adapter*")) and not list(archive.rglob("*.safetensors"))
    monkeypatch.setattr(bench, "run_cell", real)
    assert main(["continual", str(path), "--quiet"]) == 0
    result = json.loads((out / "continual.json").read_text())
    assert len(list(arch.rglob("done.json"))) == 4
    assert json.loads((archive / "continual.json").read_text()) == result  # results and report go with the chains
    assert (archive / "report" / "report.md").read_text() == (out / "report" / "report.md").read_text()
    prompts = [json.loads(line)["prompt"] for line in
               (out / "runs/replay/seed-0/2-arithmetic/eval/samples.jsonl").read_text().splitlines()]
    blob = b"".join(gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
                    for p in archive.rglob("*") if p.is_file() and p.suffix != ".png")
    assert prompts and not any(p.encode() in blob for p in prompts)  # ids and verdicts, no prompt text

    shutil.rmtree(out)  # another machine: only the archive is left

    def no_training(cell, cfg, *a):
        raise AssertionError(f"recomputed {cell.path}")
    monkeypatch.setattr(bench, "run_cell", no_training)
    assert main(["continual", str(path), "--quiet"]) == 0
    again = json.loads((out / "continual.json").read_text())
    assert again["methods"] == result["methods"] and again["comparisons"] == result["comparisons"]

    # a stage deleted after a restored one: the restored stage has no adapter to start it from, said in one line
    for root in (out, archive):
        shutil.rmtree(root / "runs/replay/seed-0/2-arithmetic")
    capsys.readouterr()
    assert main(["continual", str(path), "--quiet"]) == 2
    assert "its previous stage has no adapter" in capsys.readouterr().err
    for root in (out, archive):  # as it says: the previous stage deleted too, the chain is trained again
        shutil.rmtree(root / "runs/replay/seed-0/1-sentiment")
    monkeypatch.setattr(bench, "run_cell", lambda cell, cfg, *a: (ran.append(cell.path), real(cell, cfg, *a))[1])
    ran.clear()
    assert main(["continual", str(path), "--quiet"]) == 0
    assert [p.name for p in ran] == ["1-sentiment", "2-arithmetic"]


def test_only_runs_and_reports_the_chosen_methods(tmp_path, tiny_model_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    path = _write(tmp_path, _base(out, tiny_model_dir))
    ran, real = [], bench.run_cell
    monkeypatch.setattr(bench, "run_cell", lambda cell, cfg, *a: (ran.append(cell.path), real(cell, cfg, *a))[1])
    assert main(["continual", str(path), "--quiet", "--only", "method=replay", "--only", "seed=0"]) == 0
    assert [p.relative_to(out / "runs").as_posix() for p in ran] == ["replay/seed-0/1-sentiment",
                                                                     "replay/seed-0/2-arithmetic"]
    result = json.loads((out / "continual.json").read_text())
    assert list(result["methods"]) == ["replay"] and result["comparisons"] == []  # its pair needs the other method
    for bad, message in ((["--only", "method=nope"], "--only method=nope: not a method of the config"),
                         (["--only", "stage=sentiment"], "the axes are method and seed"),
                         (["--only", "seed"], "expected AXIS=LABEL")):
        capsys.readouterr()
        assert main(["continual", str(path), "--quiet", *bad]) == 2
        assert message in capsys.readouterr().err


def test_the_start_model_is_evaluated_once_on_every_benchmark_and_reported(tmp_path, tiny_model_dir, monkeypatch):
    """With an alignment stage, --align-only and a run of every chain evaluate the aligned model the chains start
    from (not a run of some chains: two of them may run at once); the report's start-model row holds its
    figures, counted here by hand from its verdicts, and names the chains that started from it."""
    monkeypatch.setenv("DUALSELECT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    cfg = _base(out, tiny_model_dir)
    cfg["continual"]["align"] = ["data.task={demo_data}/sentiment_train.jsonl[8:16]", "train.epochs=1"]
    cfg["continual"]["methods"] = {"replay": cfg["continual"]["methods"]["replay"]}
    cfg["continual"]["retention"]["quotas"] = {}
    del cfg["dualselect"]
    path = _write(tmp_path, cfg)
    ran, real = [], bench.run_cell
    monkeypatch.setattr(bench, "run_cell", lambda cell, *a: (ran.append(cell.path), real(cell, *a))[1])
    assert main(["continual", str(path), "--quiet", "--only", "method=replay"]) == 0
    assert len(ran) == 2 and not (out / "aligned-eval").exists()  # a run of some chains: not here
    assert main(["continual", str(path), "--align-only"]) == 0
    [start] = list((out / "aligned-eval").iterdir())
    sha = bench.aligned_sha(Path(json.loads((start / "results.json").read_text())["model"]["name_or_path"]))
    assert start.name == sha[:12] and len(ran) == 2
    samples = [json.loads(line) for line in (start / "samples.jsonl").read_text().splitlines()]
    names = [b["name"] for b in json.loads((start / "results.json").read_text())["benchmarks"]]
    assert [n.split(":")[0] + ":" + Path(n).name for n in names] == [  # every stage's benchmark, the safety ones
        "task:sentiment_test.jsonl", "task:arithmetic_test.jsonl", "harmful:heldout_harmful.jsonl",
        "overrefusal:heldout_benign.jsonl"]
    stamp = (start / "results.json").stat().st_mtime_ns
    assert main(["continual", str(path), "--quiet"]) == 0  # every chain: found done, the start row reused
    assert len(ran) == 2 and (start / "results.json").stat().st_mtime_ns == stamp
    result = json.loads((out / "continual.json").read_text())
    [row] = result["start"]
    assert row["aligned_sha256"] == sha[:12] and row["chains"] == ["replay s0"]
    for name in names:
        recs = [r for r in samples if r["benchmark"] == name]
        key = {"task": "correct", "harmful": "refused", "overrefusal": "refused"}[recs[0]["kind"]]
        assert len(recs) == 3 and row["values"][name]["value"] == pytest.approx(sum(r[key] for r in recs) / 3)
    text = (out / "report" / "report.md").read_text()
    assert "## Start model" in text and f"| {sha[:12]} |" in text and "| replay s0 |" in text


def test_status_counts_stage_runs_and_runs_nothing(tmp_path, capsys):
    cfg = _base(tmp_path / "out")
    cfg["continual"]["seeds"] = [0, 1]
    cfg["continual"]["archive"] = str(tmp_path / "arch")
    path = _write(tmp_path, cfg)
    cc = continual.load_continual(path)[0]
    for root, method, seed, k, secs in ((tmp_path / "out", "replay", 0, 0, 60), (tmp_path / "out", "replay", 0, 1, 120),
                                        (tmp_path / "arch", "replay", 1, 0, 30), (tmp_path / "arch", "replay", 1, 1, 30)):
        d = root / continual.cell_of(cc, method, seed, k).path.relative_to(tmp_path / "out")
        d.mkdir(parents=True)
        (d / "done.json").write_text(json.dumps({"train_seconds": secs, "eval_seconds": 0}))
    started = continual.cell_of(cc, "dualselect-retention", 0, 0).path
    started.mkdir(parents=True)
    (started / "cell.yaml").write_text("{}")
    st = continual.continual_status(path)
    rep, ds = st["methods"]["replay"]["stages"], st["methods"]["dualselect-retention"]["stages"]
    assert (rep["done"], rep["archived"], rep["todo"]) == (2, 2, 0)
    assert (ds["done"], ds["started"], ds["todo"]) == (0, 1, 3)
    # dualselect-retention has no finished stage: every finished one's mean, (60 + 120 + 30 + 30) / 4 = 60 s, x 4
    assert st["seconds_left"] == pytest.approx(4 * 60)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert main(["continual", str(path), "--status", "--only", "method=replay"]) == 0
    assert "| replay | 4/4 (2 archived) | 0.0 |" in capsys.readouterr().out


def test_align_only_without_an_alignment_stage_says_so(tmp_path, capsys):
    path = _write(tmp_path, _base(tmp_path / "out"))
    assert main(["continual", str(path), "--align-only"]) == 0
    assert "no alignment stage" in capsys.readouterr().out and not (tmp_path / "out" / "runs").exists()
    assert main(["continual", str(path), "--align-only", "--only", "method=replay"]) == 2
    assert "takes no --only" in capsys.readouterr().err


def test_the_report_says_which_aligned_model_each_chain_started_from():
    from dualselect.continual_report import start_models_note

    a, b = "a" * 64, "b" * 64
    result = {"seeds": [0, 1], "methods": {"sft": {"aligned_sha256": [a, b]}, "replay": {"aligned_sha256": [a, a]},
                                           "agem": {}}}  # agem: archived before the record existed
    note = start_models_note(result)
    assert note.startswith("start models: the chains started from 3 aligned models")
    assert "aaaaaaaaaaaa: sft s0, replay s0, replay s1; bbbbbbbbbbbb: sft s1; not recorded: agem s0, agem s1" in note
    del result["methods"]["agem"]
    result["methods"]["sft"]["aligned_sha256"] = [a, a]
    assert start_models_note(result) is None  # one start model: nothing to say


def test_chosen_references_per_source_print_to_one_decimal():
    from dualselect.continual_report import markdown

    cell = {"value": 0.5, "ci95": [0.4, 0.6]}
    stage = {"n_train": 2, "task": "t", "n_harmful_pairs": 0, "benchmark": "task:t"}
    result = {"stages": [{"name": "a", **stage}, {"name": "b", **stage}], "seeds": [0, 1, 2], "safety_benchmarks": {},
              "method_overrides": {}, "retention": {"per_stage": 1, "quotas": {}, "seed": 0},
              "task_benchmarks": ["task:a", "task:b"],
              "methods": {"dualselect-retention": {
                  "average_accuracy": cell, "bwt": cell, "safety": {}, "accuracy": [[cell], [cell, cell]],
                  "forgetting": [cell],
                  "references": [{"stage": "b", "refresh": 1, "mean_by_source": {"safety": 113 / 3, "a": 7 / 3},
                                  "mean_by_target": {"a: negative": 7 / 3}}]}}}
    text = markdown(result)
    assert "| dualselect-retention | b | 1 | 2.3 | 37.7 | a: negative 2.3 |" in text, text
