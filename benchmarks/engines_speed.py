"""The per-sample gradient engines on real, mixed-length task rows (the demo's sentiment rows with their harmful
pairs), side by side in one process:

  loop                 grads.LoopEngine: one forward/backward per sample
  factored             grads.FactoredEngine: one padded forward/backward per group of similar lengths (CPU)
  factored_one_pad     the factored engine with one padded forward per chunk (by_length=False)

Random batches of `--batch` rows of the demo's task data (seed 0, written on the fly), LoRA r16 on q,v with random
non-zero weights, after one untimed call of each engine; the order of the engines alternates every batch. Prints
the mean seconds per batch, the ratio to the loop engine, the largest gradient difference to the loop engine,
and the machine facts.

    python benchmarks/engines_speed.py --tiny                    # tiny random Llama (seconds)
    python benchmarks/engines_speed.py --json engines.json       # embedded SmolLM2-135M, fp32
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_facts
from grads_speed import load, machine_facts, machine_line

from dualselect import models
from dualselect.data.formatting import encode
from dualselect.data.records import Example
from dualselect.demo_data import write_demo_data
from dualselect.grads import FactoredEngine, LoopEngine, trainable_params
from dualselect.logs import read_jsonl

ENGINES = {"loop": LoopEngine(), "factored": FactoredEngine(8), "factored_one_pad": FactoredEngine(8, by_length=False)}


def run(args) -> dict:
    model, tokenizer, precision, device = load(args.model, args.tiny, args.precision, args.device)
    model = models.add_lora(model, r=16, alpha=32, dropout=0.0)
    torch.manual_seed(1)
    for p in trainable_params(model):
        p.data.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        rows = read_jsonl(write_demo_data(Path(tmp), seed=0, n_task=args.n_task)["task_train"])
    data = [encode(Example(r["id"], r["messages"]), tokenizer, template="chat", max_length=256) for r in rows]
    rng = random.Random(0)
    batches = [rng.sample(data, args.batch) for _ in range(args.batches)]
    autocast = lambda: models.autocast(precision, device)  # noqa: E731
    grads = {name: engine(model, batches[0], device, autocast).grads for name, engine in ENGINES.items()}
    diffs = {name: float((g - grads["loop"]).abs().max()) for name, g in grads.items()}
    seconds = {name: 0.0 for name in ENGINES}
    for i, batch in enumerate(batches):
        for name in (list(ENGINES) if i % 2 == 0 else list(ENGINES)[::-1]):
            t0 = time.perf_counter()
            ENGINES[name](model, batch, device, autocast)
            seconds[name] += time.perf_counter() - t0
    lengths = [len(e.input_ids) for b in batches for e in b]
    results = {name: {"mean_s": s / len(batches), "ratio_to_loop": s / seconds["loop"],
                      "max_abs_diff_to_loop": diffs[name]} for name, s in seconds.items()}
    return {"config": {"model": "tiny" if args.tiny else args.model, "precision": precision, "batch": args.batch,
                       "batches": args.batches, "lengths": [min(lengths), max(lengths)]},
            "machine": {**machine_facts(device), **cpu_facts(device)},
            "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=models.DEFAULT_MODEL, help="model name or path (default: embedded SmolLM2)")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama with the SmolLM2 tokenizer")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16-autocast"))
    p.add_argument("--device", default="auto")
    p.add_argument("--n-task", type=int, default=128, help="demo task rows to draw from (default 128)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path, help="also write the report to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    c = report["config"]
    print(f"model {c['model']}, {c['precision']}, {c['batches']} batches of {c['batch']} demo task rows "
          f"({c['lengths'][0]}-{c['lengths'][1]} tokens)\n")
    print("| engine | mean s per batch | / loop | max abs grad diff to loop |\n|---|---|---|---|")
    for name, r in report["results"].items():
        print(f"| {name} | {r['mean_s']:.3f} | {r['ratio_to_loop']:.2f} | {r['max_abs_diff_to_loop']:.2e} |")
    print(f"\ntorch CPU capability {report['machine']['cpu_capability']}")
    print(machine_line(report["machine"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
