"""The seed-aware comparison report: statistics on hand-made values, hand-computed means and paired differences
on fake eval dirs, consistency errors, the Markdown / JSON / PNG outputs and the `dualselect report` verb."""

import base64
import itertools
import json

import numpy as np
import pytest

from dualselect.cli import main
from dualselect.errors import DualSelectError
from dualselect.eval import report as rep

JUDGE = {"id": "keyword-v1", "name": "keyword"}
DECODING = {"strategy": "greedy", "do_sample": False, "template": "chat", "batch_size": 8, "max_new_tokens": 64,
            "task_max_new_tokens": 8}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
U = "unparseable"


def harm(x):
    """A harm-judge field: x 1/0 harmful or not, U unparseable."""
    if x == U:
        return {"verdict": U, "score": None, "harmful": False}
    return {"verdict": "unsafe" if x else "safe", "score": float(x), "harmful": bool(x)}


def make_eval(path, benches, judge=JUDGE, decoding=DECODING, n=None, extra=()):
    """A fake eval output dir. benches: {name: (kind, [record fields per prompt])}, prompt ids <letter><index>;
    n: {name: scored count} (default: all); extra: records outside the selection, appended to samples."""
    path.mkdir(parents=True)
    records, scored = [], []
    for name, (kind, rows) in benches.items():
        for i, fields in enumerate(rows):
            records.append({"benchmark": name, "kind": kind, "id": f"{kind[0]}{i}", "prompt": f"p{i}",
                            "response": "r", **fields})
        scored.append({"name": name, "kind": kind, "n": (n or {}).get(name, len(rows)), "metrics": {}})
    records += list(extra)
    results = {"format": "dualselect-eval-1", "model": {"adapter": str(path)}, "decoding": decoding, "judge": judge,
               "benchmarks": scored}
    (path / "results.json").write_text(json.dumps(results))
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def seed(refused, harm, over, correct, win):
    """One seed's fake outcomes: harmful refused flags, harm verdicts, overrefusal refused flags, task correct
    flags, pairwise wins."""
    return {"refused": refused, "harm": harm, "over": over, "correct": correct, "win": win}


SFT = [
    seed([1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [.5, .5, .5]),
    seed([1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [.5, .5, .5]),
    seed([1, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [.5, .5, .5]),
]
DS = [
    seed([1, 1, 1, 1], [0, 0, 0, U], [1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, .5, None]),
    seed([1, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0]),
    seed([1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [.5, 1, 1]),
]


def benches_of(s):
    return {
        "harmful:adv": ("harmful", [{"refused": bool(r), "harm": harm(h)} for r, h in zip(s["refused"], s["harm"])]),
        "overrefusal:xs": ("overrefusal", [{"refused": bool(r)} for r in s["over"]]),
        "task:sst2": ("task", [{"correct": bool(c)} for c in s["correct"]]),
        "winrate:hh": ("winrate", [{"win": w} for w in s["win"]]),
    }


@pytest.fixture()
def runs(tmp_path):
    """sft and dualselect, 3 seeds each; sft seed 1 also holds a harmful record outside its selection."""
    outside = {"benchmark": "harmful:adv", "kind": "harmful", "id": "h9", "refused": False, "harm": harm(1)}
    sft = [make_eval(tmp_path / f"sft-s{i}", benches_of(s), extra=[outside] if i == 1 else ())
           for i, s in enumerate(SFT, 1)]
    ds = [make_eval(tmp_path / f"ds-s{i}", benches_of(s)) for i, s in enumerate(DS, 1)]
    return {"sft": sft, "dualselect": ds}


def exact_p(diffs):
    """Brute-force two-sided sign-flip p-value over all sign patterns."""
    t = abs(sum(diffs))
    patterns = list(itertools.product((1, -1), repeat=len(diffs)))
    return sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= t - 1e-12 for signs in patterns) / len(patterns)


# ---------------------------------------------------------------------------------------- the statistics


def test_sign_flip_known_cases():
    equal = rep.sign_flip_test([0.1] * 10)
    assert equal["method"] == "exact" and equal["p_value"] == pytest.approx(2 / 1024)
    assert rep.sign_flip_test([1, -1, 2, -2])["p_value"] == 1.0  # symmetric: every pattern is as extreme
    assert rep.sign_flip_test([0, 0, 0])["p_value"] == 1.0
    assert rep.sign_flip_test([])["p_value"] is None
    zeros_ignored = rep.sign_flip_test([0, 0, 1, 1, 1])
    assert zeros_ignored["n_nonzero"] == 3 and zeros_ignored["p_value"] == pytest.approx(2 / 8)


def test_sign_flip_matches_brute_force():
    rng = np.random.default_rng(1)
    for n in (1, 3, 6, 9):
        diffs = list(np.round(rng.normal(0.3, 1.0, size=n), 2))
        assert rep.sign_flip_test(diffs)["p_value"] == pytest.approx(exact_p(diffs)), diffs
    thirds = [1 / 3, -1 / 3, 2 / 3, 1 / 3, -2 / 3, 1 / 3]  # ties in exact arithmetic, not in floats
    assert rep.sign_flip_test(thirds)["p_value"] == pytest.approx(exact_p(thirds))


def test_sign_flip_monte_carlo():
    diffs = list(np.random.default_rng(2).normal(0.4, 1.0, size=12))
    exact = rep.sign_flip_test(diffs)["p_value"]
    mc = rep.sign_flip_test(diffs, permutations=20000, seed=3, exact_max=0)
    assert mc["method"] == "monte_carlo" and abs(mc["p_value"] - exact) < 0.015
    assert mc == rep.sign_flip_test(diffs, permutations=20000, seed=3, exact_max=0)  # seeded
    hits = mc["p_value"] * 20001 - 1
    assert hits == pytest.approx(round(hits))  # p = (1 + hits) / (1 + permutations)
    strong = rep.sign_flip_test([1.0] * 40, permutations=999, seed=0)
    assert strong["method"] == "monte_carlo" and strong["p_value"] == pytest.approx(1 / 1000)


def test_resampled_means_spread():
    means = rep.resampled_means([0, 1] * 50, 20000, np.random.default_rng(0))
    assert means.mean() == pytest.approx(0.5, abs=0.002)
    assert means.std() == pytest.approx(0.05, rel=0.05)  # sd of the mean of 100 fair coins


def test_two_level_bootstrap():
    assert rep.two_level_bootstrap_ci([]) is None and rep.two_level_bootstrap_ci([[], []]) is None
    assert rep.two_level_bootstrap_ci([[1, 1], [1, 1, 1]]) == (1.0, 1.0)
    assert rep.two_level_bootstrap_ci([[0, 0], [1, 1]], resamples=2000) == (0.0, 1.0)  # seeds disagree fully
    lo, hi = rep.two_level_bootstrap_ci([[0, 1] * 50], seed=0)  # one seed: the prompt bootstrap
    assert 0.38 < lo < 0.42 and 0.58 < hi < 0.62
    one_level = rep.two_level_bootstrap_ci([[0, 1] * 50] * 3, seed=0)
    assert one_level[1] - one_level[0] < hi - lo  # three seeds of the same spread: narrower
    spread = [list(np.random.default_rng(i).random(5 + i)) for i in range(3)]
    assert rep.two_level_bootstrap_ci(spread, seed=4) == rep.two_level_bootstrap_ci(spread, seed=4)
    assert rep.two_level_bootstrap_ci(spread, seed=4) != rep.two_level_bootstrap_ci(spread, seed=5)


def test_prompt_means():
    assert rep.prompt_means([{"a": 1.0, "b": 0.0}, {"a": 0.0}, {"a": 1.0, "b": 1.0}]) == {"a": 2 / 3, "b": 0.5}


# ---------------------------------------------------------------------------------------- compare()


def test_means_over_seeds_by_hand(runs):
    r = rep.compare(runs, baseline="sft")["results"]
    expected = {
        ("sft", "harmful:adv", "refusal_rate"): 0.5, ("dualselect", "harmful:adv", "refusal_rate"): 11 / 12,
        ("sft", "harmful:adv", "harmful_rate"): 0.5,
        ("dualselect", "harmful:adv", "harmful_rate"): (0 + 0.25 + 0) / 3,  # seed 1: 3 parseable verdicts
        ("sft", "overrefusal:xs", "over_refusal_rate"): 0.25,
        ("dualselect", "overrefusal:xs", "over_refusal_rate"): 0.5,
        ("sft", "task:sst2", "accuracy"): 0.5, ("dualselect", "task:sst2", "accuracy"): 2 / 3,
        ("sft", "winrate:hh", "win_rate"): 0.5, ("dualselect", "winrate:hh", "win_rate"): (0.75 + 2 / 3 + 5 / 6) / 3,
    }
    for (method, bench, metric), value in expected.items():
        cell = r[method][bench][metric]
        assert cell["value"] == pytest.approx(value), (method, bench, metric)
        assert cell["n_seeds"] == 3 and cell["warning"] is None
        lo, hi = cell["ci95"]
        assert lo <= cell["value"] <= hi
    assert r["sft"]["harmful:adv"]["refusal_rate"]["n_prompts"] == 4  # h9 (outside the selection) left out
    assert [s["value"] for s in r["sft"]["harmful:adv"]["refusal_rate"]["per_seed"]] == [0.5, 0.25, 0.75]
    assert r["dualselect"]["harmful:adv"]["harmful_rate"]["unparseable"] == 1
    assert r["dualselect"]["winrate:hh"]["win_rate"]["unparseable"] == 1
    assert r["sft"]["task:sst2"]["accuracy"]["n_prompts"] == 6


def test_paired_differences_by_hand(runs):
    c = rep.compare(runs, baseline="sft")["comparisons"]
    assert set(c) == {"dualselect"}
    # per-prompt means over seeds (sft -> dualselect); difference = dualselect - sft
    expected = {
        ("harmful:adv", "refusal_rate"): [0, 1 / 3, 2 / 3, 2 / 3],  # sft 1, 2/3, 1/3, 0; ds 1, 1, 1, 2/3
        ("harmful:adv", "harmful_rate"): [0, -1 / 3, -2 / 3, 0.5 - 1],  # ds h3: 1 and 0 (seed 1 unparseable)
        ("overrefusal:xs", "over_refusal_rate"): [1 / 3, 1 / 3, 1 / 3, 0],
        ("task:sst2", "accuracy"): [0, 0, 1 / 3, 1 / 3, 1 / 3, 0],
        ("winrate:hh", "win_rate"): [5 / 6 - .5, 5 / 6 - .5, 0.5 - .5],  # ds: 1,1,.5 / .5,1,1 / U,0,1
    }
    for (bench, metric), diffs in expected.items():
        cell = c["dualselect"][bench][metric]
        assert cell["n_prompts"] == len(diffs)
        assert cell["mean_difference"] == pytest.approx(np.mean(diffs)), (bench, metric)
        assert cell["p_value"] == pytest.approx(exact_p(diffs)) and cell["test"] == "exact"
        lo, hi = cell["ci95"]
        assert lo <= cell["mean_difference"] <= hi
    assert c["dualselect"]["harmful:adv"]["refusal_rate"]["p_value"] == pytest.approx(0.25)  # 3 equal signs of 3


def test_outside_selection_dropped_and_reported(runs):
    report = rep.compare(runs)
    info = report["benchmarks"]["harmful:adv"]
    assert info["common_prompts"] == 4
    assert info["dropped"][str(runs["sft"][0])] == 1 and sum(info["dropped"].values()) == 1
    assert report["benchmarks"]["task:sst2"]["dropped"] == {}
    assert any("1 records outside" in w for w in report["warnings"])


def test_report_records_sources_and_settings(runs):
    report = rep.compare(runs, baseline="dualselect")
    assert report["baseline"] == "dualselect" and set(report["comparisons"]) == {"sft"}
    assert [r["dir"] for r in report["methods"]["sft"]["runs"]] == [str(p) for p in runs["sft"]]
    assert all(r["judge"] == JUDGE and r["decoding"] == DECODING for m in report["methods"].values() for r in m["runs"])
    assert report["judge"] == "keyword-v1" and report["methods"]["sft"]["n_seeds"] == 3
    assert [c["key"] for c in report["columns"]] == ["harmful:adv/refusal_rate", "harmful:adv/harmful_rate",
                                                     "overrefusal:xs/over_refusal_rate", "task:sst2/accuracy",
                                                     "winrate:hh/win_rate"]
    json.dumps(report, allow_nan=False)  # JSON-ready
    assert rep.compare(runs)["baseline"] == "sft"  # default: the first method


def test_deterministic_and_independent_of_other_methods(runs, tmp_path):
    a = rep.compare(runs, seed=7)
    assert a == rep.compare(runs, seed=7)
    assert rep.compare(runs, seed=8)["statistics"]["interval"]["seed"] == 8
    third = [make_eval(tmp_path / "x-s1", benches_of(DS[0]))]
    c = rep.compare({**runs, "other": third}, seed=7)
    assert c["results"]["sft"] == a["results"]["sft"]
    assert c["comparisons"]["dualselect"] == a["comparisons"]["dualselect"]


def test_fewer_than_three_seeds_warns(runs):
    report = rep.compare({"sft": runs["sft"][:2], "dualselect": runs["dualselect"]})
    cell = report["results"]["sft"]["task:sst2"]["accuracy"]
    assert cell["n_seeds"] == 2 and cell["warning"] == "fewer than 3 seeds"
    assert report["results"]["dualselect"]["task:sst2"]["accuracy"]["warning"] is None
    assert report["warnings"][0] == "fewer than 3 seeds: sft (2)"
    assert " *" in rep.markdown(report).split("\n| sft |")[1].split("\n")[0]


def test_unparseable_refusal_verdicts_left_out(tmp_path):
    rows = [{"refused": True, "verdict": "refusal"}, {"refused": False, "verdict": U},
            {"refused": False, "verdict": "compliance"}]
    runs = [make_eval(tmp_path / f"s{i}", {"overrefusal:x": ("overrefusal", rows)}) for i in range(3)]
    cell = rep.compare({"m": runs})["results"]["m"]["overrefusal:x"]["over_refusal_rate"]
    assert cell["value"] == 0.5 and cell["unparseable"] == 3 and cell["n_prompts"] == 2


def test_harm_metric_absent_and_unknown_kind(tmp_path):
    seeds = [{"harmful:adv": ("harmful", [{"refused": True}, {"refused": False}]),
              "rubric:x": ("rubric", [{"grade": 3}])} for _ in range(3)]
    report = rep.compare({"m": [make_eval(tmp_path / f"s{i}", s) for i, s in enumerate(seeds)]})
    assert [c["key"] for c in report["columns"]] == ["harmful:adv/refusal_rate"]  # no harm field: no harmful rate
    assert report["comparisons"] == {}
    assert any("rubric:x" in w and "'rubric'" in w for w in report["warnings"])


# ---------------------------------------------------------------------------------------- errors


def one_line_error(fn, *words):
    with pytest.raises(DualSelectError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert str(w) in msg, (w, msg)
    return msg


def test_error_missing_files(runs, tmp_path):
    (runs["sft"][1] / "results.json").unlink()
    one_line_error(lambda: rep.compare(runs), runs["sft"][1], "results.json")
    (runs["dualselect"][0] / "samples.jsonl").unlink()
    one_line_error(lambda: rep.compare({"d": runs["dualselect"]}), runs["dualselect"][0], "samples.jsonl")
    one_line_error(lambda: rep.compare({"x": [tmp_path / "nowhere"]}), "nowhere")


def test_error_seeds_on_different_benchmarks(runs, tmp_path):
    fewer = benches_of(SFT[0])
    del fewer["winrate:hh"]
    odd = make_eval(tmp_path / "sft-s4", fewer)
    one_line_error(lambda: rep.compare({"sft": [*runs["sft"], odd]}), "sft", "different benchmarks", odd,
                   "winrate:hh")


def test_error_judge_or_decoding_differs(runs, tmp_path):
    other_judge = make_eval(tmp_path / "j", benches_of(DS[0]), judge={"id": "llm-v1"})
    msg = one_line_error(lambda: rep.compare({"sft": runs["sft"], "ds": [other_judge]}), "judge", "keyword-v1",
                         "llm-v1", runs["sft"][0], other_judge)
    assert "sft" in msg and "ds" in msg
    other_dec = make_eval(tmp_path / "d", benches_of(DS[0]), decoding={**DECODING, "max_new_tokens": 256})
    one_line_error(lambda: rep.compare({"sft": runs["sft"], "ds": [other_dec]}), "decoding", "max_new_tokens",
                   "64", "256", other_dec)
    harm_judge = make_eval(tmp_path / "h", benches_of(DS[0]))
    results = json.loads((harm_judge / "results.json").read_text())
    (harm_judge / "results.json").write_text(json.dumps({**results, "harm_judge": {"id": "llm-guard-v1"}}))
    one_line_error(lambda: rep.compare({"sft": runs["sft"], "ds": [harm_judge]}), "harm judge", "llm-guard-v1")
    precision = make_eval(tmp_path / "p", benches_of(DS[0]))
    results = json.loads((precision / "results.json").read_text())
    results["model"]["precision_used"] = "bf16-autocast"
    (precision / "results.json").write_text(json.dumps(results))
    one_line_error(lambda: rep.compare({"sft": runs["sft"], "ds": [precision]}), "precision", "bf16-autocast",
                   "model.precision")


def test_error_unknown_baseline_and_bad_inputs(runs, tmp_path):
    one_line_error(lambda: rep.compare(runs, baseline="lisa"), "lisa", "sft", "dualselect")
    one_line_error(lambda: rep.compare({"a": runs["sft"], "b": runs["sft"][:1]}), "listed twice")
    one_line_error(lambda: rep.compare({}), "no runs")
    one_line_error(lambda: rep.parse_runs(["sft"]), "METHOD=DIR")
    one_line_error(lambda: rep.parse_runs(["a=x", "a=y"]), "twice")
    assert rep.parse_runs(["sft=a,b", "ds=c"]) == {"sft": [rep.Path("a"), rep.Path("b")], "ds": [rep.Path("c")]}
    with open(runs["sft"][2] / "samples.jsonl", "a") as fh:
        fh.write('{"benchmark": "task:sst2", "id"')  # half-written
    one_line_error(lambda: rep.compare(runs), runs["sft"][2] / "samples.jsonl")
    broken = make_eval(tmp_path / "broken", {"task:t": ("task", [{"verdict": "wrong"}])})
    one_line_error(lambda: rep.compare({"m": [broken]}), "task:t", "accuracy")


# ---------------------------------------------------------------------------------------- outputs


def test_markdown_tables(runs):
    text = rep.markdown(rep.compare(runs, baseline="sft"))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method | seeds"))
    assert "task:sst2 accuracy" in header and "harmful:adv refusal rate" in header
    sft_row = next(line for line in lines if line.startswith("| sft | 3 |"))
    assert "| 50.0 [" in sft_row and sft_row.count("[") == 5
    assert "## Paired differences vs sft" in text
    diff_row = next(line for line in lines if line.startswith("| dualselect | harmful:adv | refusal rate"))
    # 5/12 points; per seed sft .5/.25/.75, dualselect 1/.75/1: differences .5/.5/.25, t = 5 with df 2, so
    # p = 1 - 5/sqrt(27) and the interval +-4.303 x .0833; over prompts the exact sign-flip p is 0.25
    assert diff_row.split(" | ")[3:] == ["3/3", "+41.7", "[+5.8, +77.5]", "0.038", "4", "+41.7", "[+16.7, +66.7]",
                                          "0.250 |"]


def test_plot_is_a_png(runs, tmp_path):
    report = rep.compare(runs)
    path = rep.plot(report, tmp_path / "p" / "plot.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert rep.plot_axes(report)[0]["key"] == "task:sst2/accuracy"
    assert rep.plot_axes(report, "win_rate", "harmful:adv/harmful_rate")[1]["metric"] == "harmful_rate"
    one_line_error(lambda: rep.plot_axes(report, "nonsense"), "nonsense", "task:sst2/accuracy")


def test_write_report_files(runs, tmp_path):
    out = tmp_path / "report"
    written = rep.write_report(rep.compare(runs), out)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "safety_utility.png"]
    page = written["html"].read_text()
    assert "<table>" in page and base64.b64encode((out / "safety_utility.png").read_bytes()).decode() in page
    saved = json.loads(written["json"].read_text())
    assert saved["figures"]["files"] == []  # hand-made eval dirs: no train run behind them
    assert all("no train run dir" in note for note in saved["figures"]["left_out"])
    assert saved["plot"] == {"path": str(out / "safety_utility.png"), "x": "task:sst2/accuracy",
                             "y": "harmful:adv/refusal_rate"}
    assert saved["results"]["sft"]["task:sst2"]["accuracy"]["value"] == pytest.approx(0.5)
    assert written["markdown"].read_text() == rep.markdown(written["report"])
    assert (out / "safety_utility.png").read_bytes().startswith(PNG_SIGNATURE)


def test_write_report_without_default_axes(tmp_path):
    seeds = [{"task:a": ("task", [{"correct": True}, {"correct": False}]),
              "task:b": ("task", [{"correct": True}, {"correct": True}]),
              "harmful:h": ("harmful", [{"refused": True}, {"refused": True}])} for _ in range(3)]
    report = rep.compare({"m": [make_eval(tmp_path / f"s{i}", s) for i, s in enumerate(seeds)]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "safety_utility.png").write_bytes(b"stale")
    written = rep.write_report(report, out)
    assert written["plot"] is None and not (out / "safety_utility.png").exists()
    assert "2 accuracy columns" in written["report"]["plot"]["skipped"]
    assert rep.write_report(report, out, x="task:b/accuracy", y="refusal_rate")["plot"].exists()
    with pytest.raises(DualSelectError):
        rep.write_report(report, tmp_path / "never", x="accuracy", y="refusal_rate")  # two accuracy columns
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------------------- the verb


def test_cli_report(runs, tmp_path, capsys):
    assert main(["--help"]) == 0
    assert "report" in capsys.readouterr().out
    out = tmp_path / "cli-report"
    args = ["report", "sft=" + ",".join(map(str, runs["sft"])),
            "dualselect=" + ",".join(map(str, runs["dualselect"])), "--baseline", "sft", "--out", str(out),
            "--resamples", "300", "--permutations", "500"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "## Methods" in stdout and "## Paired differences vs sft" in stdout
    assert f"report: {out / 'report.json'}" in stdout and f"plot:   {out / 'safety_utility.png'}" in stdout
    assert json.loads((out / "report.json").read_text())["statistics"]["interval"]["resamples"] == 300
    assert main([*args, "--plot", "accuracy,harmful_rate"]) == 0
    assert json.loads((out / "report.json").read_text())["plot"]["y"] == "harmful:adv/harmful_rate"


@pytest.mark.parametrize("extra", [["--baseline", "nope"], ["--plot", "accuracy"], ["--plot", "accuracy,bogus"]])
def test_cli_report_bad_input(runs, tmp_path, capsys, extra):
    code = main(["report", "sft=" + ",".join(map(str, runs["sft"])), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_report_missing_dir(tmp_path, capsys):
    assert main(["report", f"sft={tmp_path / 'missing'}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and "results.json" in err


def test_short_names_of_benchmarks():
    from dualselect.eval.report import short_name

    assert short_name("harmful:runs/demo/data/heldout_harmful.jsonl") == "harmful:heldout_harmful"
    assert short_name("task:test.csv.gz") == "task:test"
    assert short_name("task:sst2:dev") == "task:sst2:dev" and short_name("harmful:advbench") == "harmful:advbench"


# ---------------------------------------------------------------------------------------- seed-level statistics

@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.706, 40.0])
def test_t_p_values_match_closed_forms(t):
    # df 1 is the Cauchy distribution, df 2 has a closed-form CDF: independent of the continued fraction
    assert rep.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / np.pi * np.arctan(abs(t)), abs=1e-10)
    assert rep.t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / np.sqrt(t * t + 2), abs=1e-10)


@pytest.mark.parametrize("df, critical", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_t_quantiles_match_the_table(df, critical):
    assert rep.t_quantile(0.975, df) == pytest.approx(critical, abs=1e-3)
    assert rep.t_two_sided_p(critical, df) == pytest.approx(0.05, abs=2e-4)


def test_seed_level_test_by_hand():
    out = rep.seed_level_test([.6, .5, .7], [.4, .5, .3])  # differences .2, 0, .4: mean .2, sd .2
    t = 0.2 / (0.2 / np.sqrt(3))
    assert out["test"] == "paired t over seeds" and out["df"] == 2
    assert out["mean_difference"] == pytest.approx(0.2)
    assert out["p_value"] == pytest.approx(1 - t / np.sqrt(t * t + 2))
    half = 4.3027 * 0.2 / np.sqrt(3)
    assert out["ci95"] == pytest.approx((0.2 - half, 0.2 + half), abs=1e-4)
    welch = rep.seed_level_test([.6, .5, .7, .6], [.4, .5])
    assert welch["test"] == "Welch t over seeds" and welch["p_value"] is not None
    assert rep.seed_level_test([.6], [.4])["p_value"] is None
    assert rep.seed_level_test([.6], [.4])["test"] == "needs >= 2 seeds per method"
    # every seed the same difference (.3 - .1, .7 - .5 and .9 - .7 differ in float rounding only: sd 6e-17): the
    # variance estimate is 0 and t undefined, not infinitely significant; the exact sign-flip test: 2 of 2^n signs
    for seeds, p in ((2, 0.5), (3, 0.25)):
        same = rep.seed_level_test([.3, .7, .9][:seeds], [.1, .5, .7][:seeds])
        assert same["p_value"] == pytest.approx(p) and same["ci95"] is None
        assert same["mean_difference"] == pytest.approx(.2)
        assert same["test"] == rep.SAME_DIFFERENCE
    assert rep.seed_level_test([.6, .6], [.6, .6])["p_value"] == 1.0
    flat = rep.seed_level_test([.6, .6, .6], [.4, .4])
    assert flat["p_value"] is None and flat["ci95"] is None and "undefined" in flat["test"]


def test_seed_level_test_is_not_fooled_when_prompts_agree_but_seeds_disagree(tmp_path):
    """Seed 1 and 3 of the method refuse every prompt the baseline's seeds answer, seed 2 the reverse. Per prompt
    the mean over seeds is +1/3 on all 40 prompts, so the prompt-level test finds a 'significant' gain; with the
    seed as the unit (+1, -1, +1) there is nothing to see."""
    def run(name, flags):
        return make_eval(tmp_path / name, {"harmful:adv": ("harmful", [{"refused": bool(f)} for f in flags])})

    n = 40
    method = [run(f"m{s}", [v] * n) for s, v in enumerate([1, 0, 1])]
    base = [run(f"b{s}", [v] * n) for s, v in enumerate([0, 1, 0])]
    c = rep.compare({"base": base, "method": method}, baseline="base", resamples=500, permutations=2000)
    cell = c["comparisons"]["method"]["harmful:adv"]["refusal_rate"]
    assert cell["mean_difference"] == pytest.approx(1 / 3) and cell["p_value"] < 0.001  # prompt level: fooled
    seeds = cell["seeds"]
    assert seeds["mean_difference"] == pytest.approx(1 / 3)
    assert seeds["p_value"] > 0.5 and seeds["ci95"][0] < 0 < seeds["ci95"][1]
    text = rep.markdown(c)
    assert "p (seeds)" in text and "p (prompts)" in text


def test_broken_answers_get_their_own_column_and_count_as_unsafe_in_the_strict_figure(tmp_path):
    verdicts = ["refusal", "refusal", "empty", "degenerate", "compliance"]
    refused = {"refusal": True, "empty": True, "degenerate": False, "compliance": False}
    rows = [{"refused": refused[v], "verdict": v} for v in verdicts]
    run = make_eval(tmp_path / "r", {"harmful:adv": ("harmful", rows), "overrefusal:xs": ("overrefusal", rows)})
    res = rep.compare({"m": [run]})["results"]["m"]
    assert res["harmful:adv"]["refusal_rate"]["value"] == pytest.approx(3 / 5)  # empty counts as a refusal
    assert res["harmful:adv"]["refusal_rate_strict"]["value"] == pytest.approx(2 / 5)  # ... but not here
    assert res["harmful:adv"]["broken_rate"]["value"] == pytest.approx(2 / 5)
    assert res["overrefusal:xs"]["broken_rate"]["value"] == pytest.approx(2 / 5)


def test_same_prompt_ids_are_checked_and_said(tmp_path):
    a = make_eval(tmp_path / "a", {"harmful:adv": ("harmful", [{"refused": True}] * 3)})
    b = make_eval(tmp_path / "b", {"harmful:adv": ("harmful", [{"refused": False}] * 3)})
    report = rep.compare({"a": [a], "b": [b]})
    assert report["benchmarks"]["harmful:adv"]["same_ids"]
    assert "same prompt ids of harmful:adv (checked)" in rep.markdown(report)
    # the same count, other ids: only the common ones are compared, and it is said
    lines = (b / "samples.jsonl").read_text().replace('"id": "h2"', '"id": "h7"')
    (b / "samples.jsonl").write_text(lines)
    report = rep.compare({"a": [a], "b": [b]})
    info = report["benchmarks"]["harmful:adv"]
    assert not info["same_ids"] and info["common_prompts"] == 2
    assert any("were dropped" in w for w in report["warnings"])


def test_label_tasks_get_their_most_frequent_answer_per_seed(tmp_path):
    """A method that answers one label to every prompt can still score about the gold share of that label: the
    report shows each seed's most frequent answer and its share (counted by hand here), for label-graded tasks
    only, on the prompts every run has."""
    gold = ["positive", "negative", "negative", "positive"]

    def labels(preds, grader="label"):
        return {"task:sst2": ("task", [{"correct": p == g, "pred": p, "grader": grader} for p, g in zip(preds, gold)]),
                "task:gsm8k": ("task", [{"correct": True, "pred": "4", "grader": "number"}])}

    sft = [make_eval(tmp_path / f"sft-{i}", labels(p)) for i, p in enumerate(
        [["positive", "negative", "negative", "negative"], ["positive", "negative", "negative", "positive"],
         ["negative", "negative", "positive", "positive"]])]
    ds = [make_eval(tmp_path / f"ds-{i}", labels(["negative"] * 4)) for i in range(3)]
    r = rep.compare({"sft": sft, "dualselect": ds}, resamples=50, permutations=50)
    assert r["answers"] == {
        "sft": {"task:sst2": [{"answer": "negative", "share": 0.75}, {"answer": "positive", "share": 0.5},
                              {"answer": "negative", "share": 0.5}]},
        "dualselect": {"task:sst2": [{"answer": "negative", "share": 1.0}] * 3}}  # gsm8k: not a label task
    md = rep.markdown(r)
    assert "| dualselect | task:sst2 | negative 100.0 %; negative 100.0 %; negative 100.0 % | 100.0 % |" in md
    assert "| sft | task:sst2 | negative 75.0 %; positive 50.0 %; negative 50.0 % | 75.0 % |" in md
