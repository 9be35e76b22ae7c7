"""More training seeds for the demo's task stage, compared over seeds with `dualselect report`.

`dualselect demo` trains SFT and DualSelect once (train.seed = its --seed). This script trains both again
with other training seeds (LoRA initialisation, shuffling, dropout) on the same data and the same aligned
model, evaluates each run exactly as the demo does, and writes the report over all seeds (means with
intervals over seeds and prompts, paired sign-flip tests of DualSelect against SFT) and its plot.

    dualselect demo                                        # first: data, aligned model, seed-0 runs
    python benchmarks/demo_seeds.py --demo runs/demo --seeds 1 2

The demo's own two runs are evaluated again too (so that every evaluation comes from this version of the
code). About 9 minutes per added seed on a 2-core CPU. Outputs: <demo>/seeds/{sft,dualselect}-s<seed>/ (runs
and their eval/), <demo>/seeds/report/ (report.md, report.json, safety_utility.png).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import yaml

from dualselect.demo import evaluate_model, settings_of, train_task
from dualselect.demo_data import demo_files
from dualselect.errors import DualSelectError
from dualselect.eval import report
from dualselect.logs import read_jsonl

METHODS = ("sft", "dualselect")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default="runs/demo", help="a finished `dualselect demo` output dir")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="training seeds to add")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    demo = Path(args.demo)
    data = demo_files(demo / "data")
    missing = [str(p) for p in [*data.values(), *(demo / m / "adapter" / "adapter_config.json" for m in METHODS),
                                demo / "eval" / "aligned" / "results.json", demo / "sft" / "config.yaml"] if not p.is_file()]
    if missing:
        raise SystemExit(f"error: {demo} is not a finished demo (missing {', '.join(missing[:3])}); "
                         "run `dualselect demo` first")
    aligned = json.loads((demo / "eval" / "aligned" / "results.json").read_text())["model"]["name_or_path"]
    demo_seed = yaml.safe_load((demo / "sft" / "config.yaml").read_text())["train"]["seed"]
    if demo_seed in args.seeds:
        raise SystemExit(f"error: seed {demo_seed} is the demo's own; choose other seeds")

    settings = settings_of(demo)  # the settings the demo ran with
    flags = {r["id"]: r.get("flag", "task") for r in read_jsonl(data["task_train"])}
    runs = {m: [] for m in METHODS}
    out = demo / "seeds"
    for method in METHODS:  # the demo's own runs, evaluated again by this version of the code
        runs[method].append(evaluate_model(data, demo, aligned, demo / method / "adapter",
                                           out / f"{method}-s{demo_seed}" / "eval", settings, args.quiet))
    for seed in args.seeds:
        for method in METHODS:
            t0 = time.perf_counter()
            run_dir = out / f"{method}-s{seed}"
            summary = train_task(method, data, Path(aligned), run_dir, settings, seed, args.quiet, flags)
            runs[method].append(evaluate_model(data, demo, aligned, run_dir / "adapter", run_dir / "eval", settings,
                                               args.quiet))
            sel = summary.get("selection")
            extra = (f"; harmful share of kept {sel['unsafe_share_of_kept']:.1%} (of batches "
                     f"{sel['unsafe_share_of_batches']:.1%})" if sel else "")
            print(f"{method} seed {seed}: {summary['steps']} steps, {time.perf_counter() - t0:.0f} s with eval{extra}")
    try:
        rep = report.compare(runs, baseline="sft")
    except DualSelectError as e:
        raise SystemExit(f"error: {e}") from None
    written = report.write_report(rep, out / "report")
    print(report.markdown(written["report"]))
    print(f"report: {written['markdown']}\nplot:   {written['plot']}")


if __name__ == "__main__":
    main()
