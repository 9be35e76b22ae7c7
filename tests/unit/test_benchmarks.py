"""The benchmark scripts run end to end on the tiny random model (tiny sizes, one torch thread)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script, args, tmp_path, timeout=120):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--tiny", "--threads", "1", "--json", str(out),
                           *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| " in proc.stdout  # the Markdown table
    return json.loads(out.read_text())


def test_grads_speed_methods_agree(tmp_path):
    report = _run("grads_speed", ["--precision", "fp32", "--batch", "2", "--prompt-len", "12", "--response-len", "4",
                                  "--repeats", "1"], tmp_path)
    assert set(report["results"]) == {"engine", "naive_full_logits", "batched_retain_graph"}
    for r in report["results"].values():
        assert r["median_s"] > 0 and r["min_s"] > 0 and r["ratio_to_engine"] > 0
    assert report["results"]["engine"]["ratio_to_engine"] == 1.0
    assert set(report["max_abs_diff_to_engine"]) == {"naive_full_logits", "batched_retain_graph"}
    assert max(report["max_abs_diff_to_engine"].values()) < 1e-4
    assert report["max_abs_grad"] > 1e-3  # the gradients compared are not all zero
    for key in ("cpu_count", "torch_threads", "torch", "ld_preload", "allocator", "platform"):
        assert key in report["machine"]
    assert report["machine"]["torch_threads"] == 1


def test_refresh_memory_topk_below_hold_all(tmp_path):
    # LoRA r=256 on every projection of the tiny model: P = 524,288, 2 MiB per gradient, so holding
    # 48 of them (96 MiB) stands out from the refresh's working memory.
    report = _run("refresh_memory", ["--n", "48", "--k", "4", "--ref-len", "16", "--lora-r", "256", "--lora-targets",
                                     "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"], tmp_path)
    p = report["n_trainable_params"]
    assert p == 524288
    assert report["all_grads_mib"] == 48 * p * 4 / 2**20
    assert report["topk_grads_mib"] == 4 * p * 4 / 2**20
    topk, hold = report["variants"]["topk"], report["variants"]["hold_all"]
    for r in (topk, hold):
        for key in ("baseline_rss_mib", "peak_rss_mib", "increase_mib", "wall_s", "peak_reset"):
            assert key in r
        assert r["peak_rss_mib"] >= r["baseline_rss_mib"]
    assert report["same_selection"] and len(topk["selected"]) == 4
    assert topk["increase_mib"] < hold["increase_mib"]


def test_precision_speed_reports_both_precisions_and_the_auto_choice(tmp_path):
    from dualselect import models

    report = _run("precision_speed", ["--batch", "2", "--prompt-len", "8", "--response-len", "4", "--new-tokens", "2",
                                      "--repeats", "1"], tmp_path)
    assert set(report["results"]) == {"sft_step", "grads", "generate"}
    for r in report["results"].values():
        assert all(r["median_s"][p] > 0 for p in ("fp32", "bf16-autocast"))
        assert r["bf16_over_fp32"] == r["median_s"]["bf16-autocast"] / r["median_s"]["fp32"]
    # the script reports the same decision the library makes on this machine
    native = bool(models.NATIVE_BF16_FLAGS & models.cpu_flags())
    assert bool(report["machine"]["native_bf16_flags"]) == native
    assert report["auto"]["precision"] in ("fp32", "bf16-autocast")
    if not native:
        assert report["auto"]["precision"] == "fp32"


def test_methods_speed_times_every_method_against_sft(tmp_path):
    from dualselect.methods import METHODS

    report = _run("methods_speed", ["--steps", "2", "--n-task", "16", "--n-reference", "16", "--batch", "4"], tmp_path,
                  timeout=600)
    results = report["results"]
    assert set(results) == set(METHODS) | {"sft_again"}  # every registered method, and sft twice
    for name, r in results.items():
        assert r["steps"] == 2 and r["median_step_s"] > 0 and r["setup_s"] >= 0, name
        assert r["ratio_to_sft"] > 0
    mean_sft = (results["sft"]["median_step_s"] + results["sft_again"]["median_step_s"]) / 2
    assert results["dualselect"]["ratio_to_sft"] == results["dualselect"]["median_step_s"] / mean_sft
    # what each step trained on: sft the whole batch; random keeps 4 of 4 in its 2 warm-up steps
    assert results["sft"]["trained_samples_per_step"] == 4
    assert results["random"]["trained_samples_per_step"] == 4


def test_engines_speed_on_demo_rows(tmp_path):
    report = _run("engines_speed", ["--n-task", "24", "--batch", "4", "--batches", "2"], tmp_path)
    assert set(report["results"]) == {"loop", "factored", "factored_one_pad"}
    assert report["results"]["loop"]["ratio_to_loop"] == 1.0
    lo, hi = report["config"]["lengths"]
    assert hi > lo  # mixed lengths, the case the length groups are for
    for r in report["results"].values():
        assert r["mean_s"] > 0 and r["max_abs_diff_to_loop"] < 1e-4  # the same gradients


def test_performance_reports_every_ratio_and_target(tmp_path):
    report = _run("performance", ["--repeats", "2", "--batches", "2", "--refresh-repeats", "1",
                                  "--settings", "demo", "protocol", "--protocol-n-task", "20"], tmp_path, timeout=300)
    precisions = report["precisions"]
    assert precisions[0] == "fp32" and len(precisions) == len(set(precisions)) <= 2
    for prec in precisions:
        steps = report["steps"][prec]
        assert set(steps) == {"sft", "dualselect-loop", "dualselect-factored"}
        assert steps["sft"]["ratio_to_sft"] == 1.0
        for r in steps.values():
            assert len(r["times_s"]) == 2 and r["min_s"] <= r["median_s"] and r["ratio_to_sft"] > 0
        loop, sft = steps["dualselect-loop"]["times_s"], steps["sft"]["times_s"]
        assert steps["dualselect-loop"]["ratio_to_sft"] == (loop[0] / sft[0] + loop[1] / sft[1]) / 2  # paired
        ref = report["refresh"][prec]
        assert set(ref["engines"]) == {"loop", "factored"}
        assert ref["sft_samples_per_s"] == 8 / steps["sft"]["median_s"]
        for r in ref["engines"].values():
            assert r["refs_per_s"] == report["n_reference"] / r["median_s"]
            assert r["ratio_to_sft_samples_per_s"] == r["refs_per_s"] / ref["sft_samples_per_s"]
    assert set(report["epochs"]) == {"demo", "protocol"}
    assert report["epochs"]["protocol"]["setting"]["n_task"] == 20  # the size flag
    for setting in report["epochs"].values():
        runs = setting["runs"]
        assert set(runs) == {"sft", "dualselect", "dualselect_capped", "sft_again"}
        # sft trains every batch; dualselect adds its warm-up steps and refreshes the references
        assert runs["dualselect"]["steps"] == runs["sft"]["steps"] + setting["setting"]["warmup"]
        assert runs["dualselect"]["warmup_s"] > 0 and runs["sft"]["warmup_s"] == 0
        for r in runs.values():
            assert r["seconds"] > 0 and r["ratio_to_sft"] > 0
    names = [t["target"] for t in report["targets"]]
    assert len(names) == 4 * len(precisions)  # two step ratios and two refresh ratios per precision
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    assert report["machine"]["torch_threads"] == 1 and len(report["machine"]["load_before"]) == 3
