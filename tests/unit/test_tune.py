"""bench.tune: candidates (product, seeded random search under a budget), the objective against hand sums, the
choice, the validation/test row-overlap refusal, and a tiny grid whose cells get the chosen settings."""

import json

import pytest
import yaml

from dualselect import bench, tune
from dualselect.errors import DualSelectError

from test_bench import bench_dir, bench_yaml, tiny_link  # noqa: F401  (fixtures)


def test_candidates_are_the_product_under_the_budget_else_a_seeded_subset():
    space = {"d.rho": [0.1, 0.2], "d.k": [1, 2]}
    assert tune.candidates(space, 4, 0) == [{"d.rho": 0.1, "d.k": 1}, {"d.rho": 0.1, "d.k": 2},
                                            {"d.rho": 0.2, "d.k": 1}, {"d.rho": 0.2, "d.k": 2}]
    picked = tune.candidates(space, 2, 7)
    assert len(picked) == 2 and picked == tune.candidates(space, 2, 7)
    full = tune.candidates(space, 4, 0)
    assert [full.index(p) for p in picked] == sorted(full.index(p) for p in picked)  # kept in written order
    assert {tuple(sorted(p.items())) for s in range(20) for p in tune.candidates(space, 2, s)} == \
        {tuple(sorted(p.items())) for p in full}  # every candidate can be drawn


def _results(**benchmarks):
    return {"benchmarks": [{"name": n, "metrics": {m: {"value": v} for m, v in ms.items()}}
                           for n, ms in benchmarks.items()]}


def test_score_is_the_weighted_sum_of_metric_means_over_benchmarks():
    res = _results(a={"refusal_rate": 0.8}, b={"refusal_rate": 0.6}, c={"over_refusal_rate": 0.3},
                   d={"accuracy": 0.5})
    total, means = tune.score(res, {"refusal_rate": 1.0, "over_refusal_rate": -1.0, "accuracy": 2.0})
    assert means == pytest.approx({"refusal_rate": 0.7, "over_refusal_rate": 0.3, "accuracy": 0.5})
    assert total == pytest.approx(0.7 - 0.3 + 2 * 0.5)
    with pytest.raises(DualSelectError, match="win_rate"):
        tune.score(res, {"win_rate": 1.0})


def test_best_takes_the_highest_and_the_first_on_a_tie():
    scored = [{"objective": 0.5, "n": 0}, {"objective": 0.9, "n": 1}, {"objective": 0.9, "n": 2}]
    assert tune.best(scored)["n"] == 1


@pytest.mark.parametrize("validation, test, clash", [
    (["task:sst2:train[1000:1200]"], ["task:sst2:train[:500]"], False),
    (["task:sst2:train[400:600]"], ["task:sst2:train[:500]"], True),
    (["harmful:advbench[100:200]"], ["harmful:advbench[:100]"], False),
    (["harmful:advbench[50:]"], ["harmful:advbench[:100]"], True),
    (["harmful:advbench[:10]"], ["harmful:advbench"], True),  # no range: every row
    (["task:sst2:dev[:100]"], ["task:sst2:train[:100]"], False),  # another split
])
def test_validation_sharing_test_rows_is_refused(validation, test, clash):
    if clash:
        with pytest.raises(DualSelectError, match="shares rows"):
            tune.check_not_test(validation, test, "cfg")
    else:
        tune.check_not_test(validation, test, "cfg")


def test_bad_tune_sections_are_refused(tiny_link):
    for extra, message in [("space: {}", "at least one method"),
                           ("space: {dualselect: {rho: [1]}}", "config key"),
                           ("space: {dualselect: {dualselect.k_task: [1]}}\n    benchmarks: [a]\n    budget: 0", "budget must"),
                           ("space: {dualselect: {dualselect.k_task: [1]}}", "validation benchmarks")]:
        path = bench_yaml(tiny_link, out="bad", grid="\n    method:\n      dualselect: [train.method=dualselect]"
                                                      "\n    train.seed: [0]")
        text = path.read_text().replace("  grid:", f"  tune:\n    {extra}\n  grid:")
        path.write_text(text)
        with pytest.raises(DualSelectError, match=message):
            bench.load_bench(path)


def test_tuning_picks_on_validation_and_the_cells_get_the_choice(tiny_link):
    d = tiny_link
    grid = """
    method:
      sft: [train.method=sft]
      dualselect: [train.method=dualselect]
    train.seed: [0]"""
    path = bench_yaml(d, out="tuned", grid=grid)
    val = [f"harmful:{d}/evharm.jsonl[6:12]", f"task:{d}/evtask.jsonl[6:12]"]
    text = path.read_text().replace(f"'harmful:{d}/evharm.jsonl'", f"'harmful:{d}/evharm.jsonl[:6]'").replace(
        f"'task:{d}/evtask.jsonl'", f"'task:{d}/evtask.jsonl[:6]'")
    section = {"space": {"dualselect": {"dualselect.k_task": [1, 2], "dualselect.k_ref": [1, 2]}},
               "budget": 2, "benchmarks": val, "objective": {"refusal_rate": 1.0, "accuracy": 1.0}}
    text = text.replace("  grid:", "  tune: " + json.dumps(section) + "\n  grid:")
    path.write_text(text)
    result = bench.run_bench(path, quiet=True)
    record = json.loads((d / "tuned" / "tune" / "results.json").read_text())
    tried = record["methods"]["dualselect"]["tried"]
    assert len(tried) == 2 and "sft" not in record["methods"]
    # the choice is the best objective, recomputed here from the candidates' own results
    objectives = []
    for t in tried:
        res = json.loads((bench.Path(t["dir"]) / "eval" / "results.json").read_text())
        names = {b["name"] for b in res["benchmarks"]}
        assert names == set(val)  # scored on validation prompts only
        means = {m: [b["metrics"][m]["value"] for b in res["benchmarks"] if m in b["metrics"]]
                 for m in ("refusal_rate", "accuracy")}
        objectives.append(sum(sum(v) / len(v) for v in means.values()))
        assert t["objective"] == pytest.approx(objectives[-1])
    top = max(range(2), key=lambda i: (objectives[i], -i))
    chosen = record["methods"]["dualselect"]["chosen"]
    assert chosen == tried[top]["candidate"]
    cell = yaml.safe_load((d / "tuned" / "cells" / "dualselect__seed-0" / "cell.yaml").read_text())
    assert cell["dualselect"]["k_task"] == chosen["dualselect.k_task"]
    assert cell["dualselect"]["k_ref"] == chosen["dualselect.k_ref"]
    assert "## Tuning" in result["markdown"] and "dualselect.k_task=" in result["markdown"]
    # resuming trains nothing again, tuning included
    stamps = {t["dir"]: (bench.Path(t["dir"]) / "done.json").stat().st_mtime_ns for t in tried}
    bench.run_bench(path, quiet=True)
    assert stamps == {t["dir"]: (bench.Path(t["dir"]) / "done.json").stat().st_mtime_ns for t in tried}


def test_tuning_on_test_rows_or_an_unknown_method_is_refused(tiny_link):
    d = tiny_link
    grid = "\n    method:\n      dualselect: [train.method=dualselect]\n    train.seed: [0]"
    for space, benchmarks, message in [
            ({"dualselect": {"dualselect.k_task": [1]}}, [f"harmful:{d}/evharm.jsonl[:3]"], "shares rows"),
            ({"dualselct": {"dualselect.k_task": [1]}}, [f"harmful:{d}/other.jsonl"], "not a label"),
            ({"dualselect": {"dualselect.k_task": [1, 2]}}, [f"harmful:{d}/other.jsonl"], "fewer than the budget")]:
        path = bench_yaml(d, out="refused", grid=grid)
        section = {"space": space, "benchmarks": benchmarks}
        path.write_text(path.read_text().replace("  grid:", "  tune: " + json.dumps(section) + "\n  grid:"))
        with pytest.raises(DualSelectError, match=message):
            bench.run_bench(path, quiet=True)
        assert not (d / "refused" / "tune").exists()
