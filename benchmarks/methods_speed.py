"""Wall time per optimiser step of every training method, relative to plain SFT, side by side in one process.

Each method trains `--steps` steps (train.max_steps) through the normal `train()` on the same model, data
and batch size (the demo's generated data: task rows with 20 % harmful pairs, the refusal reference pool),
one after another in this process, with `sft` run first and again last (its two medians show how much the
machine drifted during the run). A step's seconds come from the run's metrics.jsonl (they include what the
loop does around the method: clipping, AdamW, a refresh at an epoch start). The first step is reported apart
(TOSS trains its reference models there); what runs before the first step (model load, SEAL's selector
stage inside plan()) is the "setup" column.

    python benchmarks/methods_speed.py --tiny                      # tiny random Llama (about a minute)
    python benchmarks/methods_speed.py --json methods_speed.json   # embedded SmolLM2-135M (about 10 minutes)

TOSS needs a harmful set for its safety-degraded reference; here it is given the ids of the task's harmful
rows (fine for timing; a comparison of safety must not hand it these labels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


from common import run_and_print, tiny_model_dir
from grads_speed import machine_facts, machine_line

from dualselect import models
from dualselect.config import load_config
from dualselect.demo_data import write_demo_data
from dualselect.logs import read_jsonl
from dualselect.methods import method_configs
from dualselect.train import train

# name shown -> (train.method, method options). Small method-stage sizes so the whole table runs in minutes.
METHODS = {
    "sft": ("sft", []),
    "dualselect": ("dualselect", ["dualselect.warmup_steps=2", "dualselect.k_task=4", "dualselect.k_ref=16"]),
    "random": ("random", ["random.warmup_steps=2", "random.k_task=4"]),
    "dsir": ("dsir", []),
    "safeinstr": ("safeinstr", []),
    "seal": ("seal", ["seal.selector_epochs=1"]),
    "lisa": ("lisa", ["lisa.align_steps=2", "lisa.task_steps=4"]),
    "safegrad": ("safegrad", []),
    "toss": ("toss", ["toss.harmful_data=task_ids"]),
    "feedback-gated": ("feedback-gated", []),
    "sft_again": ("sft", []),
}


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="methods-speed-"))
    data = write_demo_data(work / "data", seed=0, n_task=args.n_task, n_align_harmful=8, n_reference=args.n_reference)
    unsafe = [r["id"] for r in read_jsonl(data["task_train"]) if r.get("flag") == "unsafe"]
    harmful_ids = work / "harmful_ids.txt"
    harmful_ids.write_text("\n".join(unsafe) + "\n")
    model_dir = tiny_model_dir(work / "tiny") if args.tiny else args.model
    results = {}
    for name, (method, extra) in METHODS.items():
        if name == "toss":
            extra = [*extra, f"toss.harmful_ids={harmful_ids}"]
        cfg = load_config(None, [
            f"model.name_or_path={model_dir}", f"model.precision={args.precision}", f"data.task={data['task_train']}",
            f"data.reference={data['reference']}", f"train.method={method}", f"train.batch_size={args.batch}",
            f"train.max_steps={args.steps}", "train.lr=2e-4", "train.quiet=true", f"train.output_dir={work / name}",
            *extra], method_configs())
        t0 = time.perf_counter()
        res = train(cfg)
        wall = time.perf_counter() - t0
        steps = read_jsonl(res.run_dir / "metrics.jsonl")
        secs = [s["seconds"] for s in steps]
        info = json.loads((res.run_dir / "run_info.json").read_text())
        results[name] = {"method": method, "options": extra, "steps": len(steps), "median_step_s": statistics.median(
            secs[1:] or secs), "first_step_s": secs[0], "setup_s": wall - sum(secs), "wall_s": wall,
            "trained_samples_per_step": info["budget"]["trained_samples"] / len(steps),
            "precision": info["machine"]["precision"]}
    base = statistics.mean([results["sft"]["median_step_s"], results["sft_again"]["median_step_s"]])
    for r in results.values():
        r["ratio_to_sft"] = r["median_step_s"] / base
    return {"config": {"model": "tiny" if args.tiny else args.model, "precision": results["sft"]["precision"],
                       "n_task": args.n_task, "n_reference": args.n_reference, "batch": args.batch,
                       "steps": args.steps},
            "machine": machine_facts(models.pick_device()), "results": results}


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"model {c['model']}, {c['precision']}, batch {c['batch']}, {c['steps']} steps per method, demo data "
             f"({c['n_task']} task rows, {c['n_reference']} references)", "",
             "| method | median s / step | / sft | first step s | setup s | task samples / step |",
             "|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['median_step_s']:.2f} | {r['ratio_to_sft']:.2f} | {r['first_step_s']:.2f} | "
                     f"{r['setup_s']:.1f} | {r['trained_samples_per_step']:.1f} |")
    lines += ["", "/ sft: median step time over the mean of the two sft medians (sft ran first and last); setup: "
                  "model load, data, plan() (SEAL's selector stage), final save", machine_line(report["machine"])]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="model name or path (default: embedded SmolLM2)")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama with the SmolLM2 tokenizer")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--n-task", type=int, default=64)
    ap.add_argument("--n-reference", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the report to this file")
    run_and_print(ap.parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
