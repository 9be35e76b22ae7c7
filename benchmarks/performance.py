"""Speed and scale of DualSelect against plain SFT, every ratio measured side by side in one process.

  steps     one optimiser step as the training loop runs it (zero_grad, method.step, clip, AdamW step), refresh
            excluded: sft, and dualselect with each per-sample gradient engine (loop, factored), on the same
            batches of the demo's task rows, in fp32 and, where it differs, in the precision `auto` picks here
  refresh   DualSelect.refresh over the reference pool, with each engine: references scored per second, against
            SFT's training samples per second (batch / its median step time, same precision)
  epochs    whole runs through train() (the real loop: warm-up, refreshes, logs, checkpoints), per setting:
            sft, dualselect with the whole reference pool, dualselect with a capped refresh subset
            (dualselect.ref_sample), sft again (the two sft runs show the drift of the machine)

Steps: each arm has its own AdamW (a DualSelect arm first makes 2 warm-up steps and one refresh, untimed, so that
d_T and g_R are real) and steps once, untimed, on each of `--batches` batches (a batch shape met for the first time
costs more under bf16 autocast, whichever arm meets it); then `--repeats` rounds cycle over those batches, every
arm stepping on the round's batch, the order of the arms reversed every other round. The ratio to sft is the median
over rounds of (arm / sft on the same batch). Refreshes: `--refresh-repeats` rounds, order alternated. Settings of
the epochs part: `demo` (dualselect demo's task stage: 128 task rows with 25 % harmful pairs, 64 references, 2
epochs, W 5, K_R 16, factored engine) and `protocol` (1,000 task rows, 400 references, 1 epoch, W 10, K_R 40, as the
hft configs; its sizes are flags). Prints Markdown tables and the speed targets; --json writes it all.

    python benchmarks/performance.py --tiny                                # tiny random Llama, tiny sizes (20 s)
    python benchmarks/performance.py --parts steps refresh --json p.json   # embedded SmolLM2-135M (about 7 min)
    python benchmarks/performance.py --parts epochs --settings protocol    # about 35 minutes at one thread here
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_facts, run_and_print, tiny_model_dir
from grads_speed import machine_facts, machine_line, timed

from dualselect import models
from dualselect.config import load_config
from dualselect.demo_data import write_demo_data
from dualselect.grads import FactoredEngine, LoopEngine
from dualselect.logs import read_jsonl
from dualselect.methods import METHODS, method_configs
from dualselect.schedule import batch_plan
from dualselect.train import build, train

ENGINES = {"loop": LoopEngine, "factored": FactoredEngine}
# name -> data sizes and DualSelect options of the epochs part; TINY: the same shapes at test size
SETTINGS = {
    "demo": {"n_task": 128, "n_reference": 64, "epochs": 2, "warmup": 5, "k_ref": 16, "ref_sample": 32},
    "protocol": {"n_task": 1000, "n_reference": 400, "epochs": 1, "warmup": 10, "k_ref": 40, "ref_sample": 100},
}
TINY = {
    "demo": {"n_task": 16, "n_reference": 8, "epochs": 1, "warmup": 1, "k_ref": 2, "ref_sample": 4},
    "protocol": {"n_task": 24, "n_reference": 12, "epochs": 1, "warmup": 1, "k_ref": 2, "ref_sample": 4},
}
TARGETS = {"step": 1.15, "refresh": 0.9}  # dualselect step / sft step <=; references/s / sft samples/s >=


def demo_data(work: Path, s: dict) -> dict:
    return write_demo_data(work, seed=0, n_task=s["n_task"], harmful_fraction=0.25, n_reference=s["n_reference"])


def overrides(model_dir, data: dict, s: dict, precision: str, method: str) -> list[str]:
    """The demo's task-stage recipe (LoRA r16 on q,v, dropout 0.05, batch 8, lr 2e-4; DualSelect: k_T 4, rho 0.2,
    the factored engine) on `data`."""
    ds = [f"dualselect.warmup_steps={s['warmup']}", "dualselect.k_task=4", f"dualselect.k_ref={s['k_ref']}",
          "dualselect.rho=0.2", "train.grad_engine=factored"]
    return [f"model.name_or_path={model_dir}", f"model.precision={precision}", f"data.task={data['task_train']}",
            f"data.reference={data['reference']}", "train.batch_size=8", "train.lr=2e-4", "train.quiet=true",
            f"train.epochs={s['epochs']}", f"train.method={method}", *(ds if method == "dualselect" else [])]


def loadavg() -> list[float]:
    """The machine's load average over 1, 5 and 15 minutes (1.0: one busy core; this one, alone)."""
    return [round(x, 2) for x in os.getloadavg()]


def median_min(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


# -- steps and refresh ------------------------------------------------------------------------------------------
def loop_step(arm: dict, planned) -> float:
    """One step as train._train runs it; its seconds."""
    def step():
        arm["opt"].zero_grad(set_to_none=True)
        arm["method"].step(planned)
        torch.nn.utils.clip_grad_norm_(arm["params"], 1.0)
        arm["opt"].step()
    return timed(step, device=arm["device"])[1]


def step_and_refresh(args, model_dir, work: Path) -> dict:
    s = (TINY if args.tiny else SETTINGS)["demo"]
    data = demo_data(work / "data", s)
    cfg = load_config(None, overrides(model_dir, data, s, "fp32", "dualselect"), method_configs())
    (work / "steps").mkdir()
    ctx = build(cfg, work / "steps").ctx
    dev = ctx.device
    precisions = list(dict.fromkeys(models.resolve_precision(p, dev) for p in args.precisions))
    # the timed steps cycle over a few full batches that every arm has stepped on before (untimed): a batch shape
    # met for the first time costs more (bf16 kernels are set up per shape), whichever arm meets it first
    plan = [p for p in batch_plan(len(ctx.task), 8, 1, 0) if len(p.ids) == 8][:args.batches]
    arms = {}
    for prec in precisions:
        autocast = lambda prec=prec: models.autocast(prec, dev)
        variants = {"sft": None, **{f"dualselect-{e}": e for e in ENGINES}}
        for name, engine in variants.items():
            c = dataclasses.replace(ctx, autocast=autocast, engine=ENGINES[engine]() if engine else ctx.engine)
            method = (METHODS["sft"](method_configs()["sft"](), c) if engine is None
                      else METHODS["dualselect"](cfg.method_args, c))
            arm = {"method": method, "params": c.params, "device": dev,
                   "opt": torch.optim.AdamW(c.params, lr=2e-4, weight_decay=0.0)}
            if engine:  # untimed: its warm-up steps (d_T), one refresh (g_R)
                for planned in plan[:2]:
                    loop_step(arm, dataclasses.replace(planned, phase="warmup", epoch=0))
                method.refresh(1)
            for planned in plan:
                loop_step(arm, planned)
            arms[(prec, name)] = arm
    times = {key: [] for key in arms}
    for r in range(args.repeats):
        for key in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            times[key].append(loop_step(arms[key], plan[r % len(plan)]))
    ref_times = {key: [] for key in arms if key[1] != "sft"}
    for r in range(args.refresh_repeats):
        for key in (list(ref_times) if r % 2 == 0 else list(ref_times)[::-1]):
            ref_times[key].append(timed(arms[key]["method"].refresh, 1, device=dev)[1])
    n_refs, tokens = len(ctx.reference), lambda xs: sum(len(e.input_ids) for e in xs)
    ref_tokens = tokens(ctx.reference)
    step_tokens = statistics.mean(tokens(ctx.task[i] for i in b.ids) for b in plan)
    steps, refresh = {}, {}
    for prec in precisions:
        sft = times[(prec, "sft")]
        # per repeat every arm stepped on the same batch: the median of those paired ratios (robust to a stall of
        # the machine during one repeat), and the ratio of the medians
        steps[prec] = {name: {**median_min(times[(prec, name)]),
                              "ratio_to_sft": statistics.median(t / b for t, b in zip(times[(prec, name)], sft)),
                              "ratio_of_medians": statistics.median(times[(prec, name)]) / statistics.median(sft)}
                       for name in ("sft", *(f"dualselect-{e}" for e in ENGINES))}
        samples, toks = 8 / statistics.median(sft), step_tokens / statistics.median(sft)  # sft's rates per second
        refresh[prec] = {"sft_samples_per_s": samples, "sft_tokens_per_s": toks, "engines": {}}
        for engine in ENGINES:
            t = median_min(ref_times[(prec, f"dualselect-{engine}")])
            rate = n_refs / t["median_s"]
            refresh[prec]["engines"][engine] = {
                **t, "refs_per_s": rate, "ratio_to_sft_samples_per_s": rate / samples,
                "tokens_per_s": ref_tokens / t["median_s"], "ratio_to_sft_tokens_per_s": ref_tokens / t["median_s"] / toks}
    return {"precisions": precisions, "n_task": len(ctx.task), "n_reference": n_refs, "batch": 8,
            "step_mean_tokens": step_tokens / 8, "reference_mean_tokens": ref_tokens / n_refs,
            "steps": steps, "refresh": refresh}


# -- whole runs ----------------------------------------------------------------------------------------------------
def whole_run(model_dir, data, s, precision, method: str, extra: list[str], out: Path) -> dict:
    cfg = load_config(None, [*overrides(model_dir, data, s, precision, method), f"train.output_dir={out}", *extra],
                      method_configs())
    load_before = loadavg()
    res = train(cfg)
    rows = read_jsonl(res.run_dir / "metrics.jsonl")
    warm = [r["seconds"] for r in rows if r["phase"] == "warmup"]
    by_epoch = {}
    for r in rows:
        if r["phase"] != "warmup":
            by_epoch.setdefault(r["epoch"], []).append(r["seconds"])
    return {"steps": len(rows), "seconds": sum(r["seconds"] for r in rows), "warmup_s": sum(warm),
            "load_before": load_before, "load_after": loadavg(),
            "epoch_s": {e: sum(v) for e, v in by_epoch.items()},
            # an epoch's first step holds its refresh: that step minus the epoch's median step
            "refresh_s": {e: v[0] - statistics.median(v[1:] or v) for e, v in by_epoch.items()},
            "median_step_s": statistics.median(v for e in by_epoch.values() for v in e[1:]), "precision": json.loads(
                (res.run_dir / "run_info.json").read_text())["machine"]["precision"]}


def epochs(args, model_dir, work: Path, setting: str) -> dict:
    s = dict((TINY if args.tiny else SETTINGS)[setting])
    if setting == "protocol":
        s.update({k: v for k, v in (("n_task", args.protocol_n_task), ("n_reference", args.protocol_n_reference),
                                    ("ref_sample", args.protocol_ref_sample)) if v is not None})
    data = demo_data(work / setting / "data", s)
    arms = {"sft": ("sft", []), "dualselect": ("dualselect", []),
            "dualselect_capped": ("dualselect", [f"dualselect.ref_sample={s['ref_sample']}"]), "sft_again": ("sft", [])}
    runs = {}
    for name, (method, extra) in arms.items():
        runs[name] = whole_run(model_dir, data, s, args.epoch_precision, method, extra, work / setting / name)
    base = statistics.mean([runs["sft"]["seconds"], runs["sft_again"]["seconds"]])
    for r in runs.values():
        r["ratio_to_sft"] = r["seconds"] / base
    return {"setting": s, "runs": runs}


# -- report --------------------------------------------------------------------------------------------------------
def targets(report: dict) -> list[dict]:
    out = []
    for prec, arms in report.get("steps", {}).items():
        for name, r in arms.items():
            if name != "sft":
                out.append({"target": f"{name} step / sft step ({prec})", "value": r["ratio_to_sft"],
                            "goal": f"<= {TARGETS['step']}", "met": r["ratio_to_sft"] <= TARGETS["step"]})
    for prec, ref in report.get("refresh", {}).items():
        for eng, r in ref["engines"].items():
            v = r["ratio_to_sft_samples_per_s"]
            out.append({"target": f"refresh refs/s ({eng}) / sft samples/s ({prec})", "value": v,
                        "goal": f">= {TARGETS['refresh']}", "met": v >= TARGETS["refresh"]})
    return out


def markdown(report: dict) -> str:
    c, lines = report["config"], []
    if "steps" in report:
        lines += [f"## steps: model {c['model']}, batches of {report['batch']} demo task rows (mean "
                  f"{report['step_mean_tokens']:.0f} tokens), {c['repeats']} repeats over {c['batches']} batches", "",
                  "| precision | arm | median s | min s | / sft (median of paired ratios) | / sft (medians) |",
                  "|---|---|---|---|---|---|"]
        for prec, arms in report["steps"].items():
            for name, r in arms.items():
                lines.append(f"| {prec} | {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['ratio_to_sft']:.2f} | "
                             f"{r['ratio_of_medians']:.2f} |")
        lines += ["", f"## refresh: {report['n_reference']} references (mean {report['reference_mean_tokens']:.0f} "
                      f"tokens), {c['refresh_repeats']} repeats", "",
                  "| precision | engine | median s | min s | refs / s | sft samples / s | ratio | tokens/s ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for prec, ref in report["refresh"].items():
            for eng, r in ref["engines"].items():
                lines.append(f"| {prec} | {eng} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['refs_per_s']:.2f} | "
                             f"{ref['sft_samples_per_s']:.2f} | {r['ratio_to_sft_samples_per_s']:.2f} | "
                             f"{r['ratio_to_sft_tokens_per_s']:.2f} |")
    for setting, e in report.get("epochs", {}).items():
        s = e["setting"]
        lines += ["", f"## epochs, {setting}: {s['n_task']} task rows, {s['n_reference']} references, {s['epochs']} "
                      f"epoch(s), W {s['warmup']}, K_R {s['k_ref']}, capped: ref_sample {s['ref_sample']}, "
                      f"{c['epoch_precision']}", "",
                  "| run | steps | total s | / sft | warm-up s | refresh s (per epoch) | median step s | load before, after |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in e["runs"].items():
            ref = ", ".join(f"{v:.1f}" for v in r["refresh_s"].values()) if name.startswith("dual") else "-"
            lines.append(f"| {name} | {r['steps']} | {r['seconds']:.1f} | {r['ratio_to_sft']:.2f} | "
                         f"{r['warmup_s']:.1f} | {ref} | {r['median_step_s']:.2f} | "
                         f"{r['load_before'][0]}, {r['load_after'][0]} |")
    if report["targets"]:
        lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']:.2f} | {t['goal']} | {'yes' if t['met'] else 'no'} |"
                  for t in report["targets"]]
    m = report["machine"]
    lines += ["", f"torch CPU capability {m['cpu_capability']}; native bf16 flags: "
                  f"{', '.join(m['native_bf16_flags']) or 'none'}; load average (1, 5, 15 min) before "
                  f"{m['load_before']}, after {m['load_after']}", machine_line(m)]
    return "\n".join(lines)


def run(args) -> dict:
    device = models.pick_device()
    report = {"config": {"model": "tiny" if args.tiny else args.model, "repeats": args.repeats, "batches": args.batches,
                         "refresh_repeats": args.refresh_repeats, "epoch_precision": args.epoch_precision,
                         "parts": args.parts},
              "machine": {**machine_facts(device), **cpu_facts(device), "load_before": loadavg()}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="performance-") as tmp:
        work = Path(tmp)
        model_dir = tiny_model_dir(work / "tiny") if args.tiny else args.model
        if "steps" in args.parts or "refresh" in args.parts:
            report.update(step_and_refresh(args, model_dir, work))
        if "epochs" in args.parts:
            report["epochs"] = {name: epochs(args, model_dir, work, name) for name in args.settings}
    report["machine"]["load_after"] = loadavg()
    report["wall_s"] = time.perf_counter() - t0
    report["targets"] = targets(report)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="model name or path (default: embedded SmolLM2)")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama with the SmolLM2 tokenizer, tiny sizes")
    ap.add_argument("--parts", nargs="+", default=["steps", "refresh", "epochs"], choices=["steps", "refresh", "epochs"],
                    help="steps and refresh run together")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "auto"], help="of the steps and refresh parts")
    ap.add_argument("--repeats", type=int, default=6, help="timed steps per arm")
    ap.add_argument("--batches", type=int, default=3, help="distinct batches the timed steps cycle over")
    ap.add_argument("--refresh-repeats", type=int, default=3)
    ap.add_argument("--settings", nargs="+", default=["demo"], choices=list(SETTINGS), help="of the epochs part")
    ap.add_argument("--epoch-precision", default="auto", help="model.precision of the epochs part (the demo's: auto)")
    ap.add_argument("--protocol-n-task", type=int, help="task rows of the protocol setting (default 1000)")
    ap.add_argument("--protocol-n-reference", type=int, help="references of the protocol setting (default 400)")
    ap.add_argument("--protocol-ref-sample", type=int, help="capped refresh subset of the protocol (default 100)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the report to this file")
    run_and_print(ap.parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
