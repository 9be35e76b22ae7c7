"""Every training method on the demo's task, one seed, evaluated as the demo evaluates, compared with
`dualselect report`, and each method's wall time per step relative to SFT (all trained in this one process).

    dualselect demo                                              # first: data, aligned model
    python benchmarks/demo_methods.py --demo runs/demo           # all methods (resumable)
    python benchmarks/demo_methods.py --demo runs/demo --methods sft random dsir

Each method trains on the demo's aligned model and its task data (20 % harmful -> compliance pairs) with the
demo's task settings (epochs, lr, batch size, precision) and the method's own defaults, except where the
table below says otherwise; then `dualselect eval` on the demo's held-out harmful and benign prompts and its
task test set. Resumable: a method whose adapter and evaluation exist is skipped (its timing read back from
its run), so an interrupted comparison continues where it stopped; a method killed mid-training starts again.

  dualselect              the demo's DualSelect settings (warm-up W, k_T, K_R, rho of demo_settings.json)
  dualselect-loss-only    the same with nu=0 (scores by loss only: a loss filter)
  dualselect-cosine-only  the same with mu_task=mu_ref=0 (scores by gradient cosine only)
  random                  the same warm-up W and k_T as the demo's DualSelect
  lisa                    alignment data = the demo's alignment-stage data (harmful -> refusal, benign -> own answer)
  toss                    its safety-degraded reference trains on the alignment-stage harmful prompts with
                          compliance answers (a harmful set apart from the task's own harmful rows, whose labels
                          no method is given)
  feedback-gated          its defaults; prompt labels from its prompt classifier (the task data has no label
                          column: no method is told which task rows are harmful)
  *-from-base             the method on the demo's *unaligned* base model instead of the aligned one (the
                          feedback-gated paper's claim of robustness to unsafe initialisations), evaluated on it

Outputs: <demo>/methods/<name>/ (run dir, eval/), <demo>/methods/report/ (report.md, report.json, plot) and
<demo>/methods/timing.md (median seconds per optimiser step, / sft, steps, the whole run's seconds, task
samples trained on).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
from pathlib import Path

from dualselect.demo import evaluate_model, settings_of, train_task
from dualselect.demo_data import compliance_for, demo_files
from dualselect.errors import DualSelectError
from dualselect.eval import report
from dualselect.logs import read_jsonl, write_atomic, write_jsonl

# name -> (train.method, extra overrides); "{align}" and "{harmful}" are filled with file paths
METHODS = {
    "sft": ("sft", []),
    "dualselect": ("dualselect", []),
    "dualselect-loss-only": ("dualselect", ["dualselect.nu=0"]),
    "dualselect-cosine-only": ("dualselect", ["dualselect.mu_task=0", "dualselect.mu_ref=0"]),
    "random": ("random", ["{random_warmup}", "{random_k}"]),
    "dsir": ("dsir", []),
    "safeinstr": ("safeinstr", []),
    "seal": ("seal", []),
    "lisa": ("lisa", ["data.reference={align}"]),
    "safegrad": ("safegrad", []),
    "toss": ("toss", ["data.reference={harmful}", "toss.harmful_data=reference"]),
    "feedback-gated": ("feedback-gated", []),
    "sft-from-base": ("sft", []),
    "feedback-gated-from-base": ("feedback-gated", []),
}


def harmful_pairs(demo: Path) -> Path:
    """The alignment-stage harmful prompts with compliance answers: TOSS's harmful reference set."""
    rows = read_jsonl(demo_files(demo / "data")["align_harmful"])
    out = [{"id": f"harm-{r['id']}", "messages": [r["messages"][0], {"role": "assistant", "content":
                                                                     compliance_for(r["messages"][0]["content"])}]}
           for r in rows]
    return write_jsonl(demo / "methods" / "toss_harmful.jsonl", out)


def timing(run_dir: Path) -> dict:
    """Median seconds per optimiser step (metrics.jsonl) and the whole run's seconds (train.log's last `done:`
    line: also what runs outside the steps, e.g. SEAL's selector stage)."""
    steps = read_jsonl(run_dir / "metrics.jsonl")
    info = json.loads((run_dir / "run_info.json").read_text())
    done = re.findall(r"done: \d+ steps in ([\d.]+) s", (run_dir / "train.log").read_text())
    return {"median_step_s": statistics.median(s["seconds"] for s in steps), "steps": len(steps),
            "run_s": float(done[-1]) if done else None, "trained_samples": info["budget"]["trained_samples"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default="runs/demo", help="a finished `dualselect demo` output dir")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    demo = Path(args.demo)
    data = demo_files(demo / "data")
    results_file = demo / "eval" / "aligned" / "results.json"
    if not results_file.is_file() or not (demo / "sft" / "config.yaml").is_file():
        raise SystemExit(f"error: {demo} is not a finished demo; run `dualselect demo` first")
    import yaml

    aligned = Path(json.loads(results_file.read_text())["model"]["name_or_path"])
    base = json.loads((demo / "eval" / "base" / "results.json").read_text())["model"]["name_or_path"]
    seed = yaml.safe_load((demo / "sft" / "config.yaml").read_text())["train"]["seed"]
    settings = settings_of(demo)
    flags = {r["id"]: r.get("flag", "task") for r in read_jsonl(data["task_train"])}
    ds = dict(o.split("=", 1) for o in settings.dualselect)
    fill = {"align": str(demo / "data" / "align_train.jsonl"), "harmful": str(harmful_pairs(demo)),
            "random_warmup": f"random.warmup_steps={ds['dualselect.warmup_steps']}",
            "random_k": f"random.k_task={ds['dualselect.k_task']}"}
    out = demo / "methods"
    evals, times = {}, {}
    for name in args.methods:
        method, extra = METHODS[name]
        run_dir = out / name
        eval_dir = run_dir / "eval"
        start = base if name.endswith("-from-base") else aligned
        if not ((run_dir / "adapter" / "adapter_config.json").is_file() and (eval_dir / "results.json").is_file()):
            summary = train_task(method, data, start, run_dir, settings, seed, args.quiet, flags,
                                 [e.format(**fill) for e in extra])
            evaluate_model(data, demo, start, run_dir / "adapter", eval_dir, settings, args.quiet)
            sel = summary.get("selection")
            print(f"{name}: {summary['steps']} steps, {summary['seconds']} s" +
                  (f"; harmful share of kept {sel['unsafe_share_of_kept']:.1%}" if sel else ""), flush=True)
        evals[name] = [eval_dir]
        times[name] = timing(run_dir)
    if "sft" not in evals:
        raise SystemExit("error: the comparison needs sft (the baseline)")
    evals.update({"base (no training)": [demo / "eval" / "base"], "aligned (no training)": [demo / "eval" / "aligned"]})
    try:
        rep = report.compare(evals, baseline="sft")
    except DualSelectError as e:
        raise SystemExit(f"error: {e}") from None
    written = report.write_report(rep, out / "report")
    base = times["sft"]["median_step_s"]
    lines = ["| method | median s / step | / sft | steps | whole run s | task samples trained on |",
             "|---|---|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t['median_step_s']:.2f} | {t['median_step_s'] / base:.2f} | {t['steps']} | "
                     f"{t['run_s']:.0f} | {t['trained_samples']} |")
    write_atomic(out / "timing.md", "\n".join(lines) + "\n")
    print(report.markdown(written["report"]))
    print("\n".join(lines))
    print(f"report: {written['markdown']}\ntiming: {out / 'timing.md'}")


if __name__ == "__main__":
    main()
