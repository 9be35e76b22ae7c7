"""Peak memory of one DualSelect reference refresh: running top-K against holding every gradient.

  topk      DualSelect.refresh(1), the project's code path: scores references a chunk at a time
            and keeps only the K_R best gradients (RunningTopK)
  hold_all  the authors' release: the same N gradients, same engine, all kept in a list, then
            scored and the top K_R averaged

Each variant runs in a fresh subprocess (`--child VARIANT`), one after the other on the same
machine, with the same allocator and the same inputs. In the child: load the model and build the
TrainContext and DualSelect as train.build does, note the RSS (baseline), reset the peak-RSS mark
(Linux /proc/self/clear_refs, so that the model load's own peak does not count), run the refresh,
read ru_maxrss (peak). Prints a Markdown table next to N x P x 4 and K_R x P x 4 bytes.

    python benchmarks/refresh_memory.py --tiny --n 200 --k 20     # tiny random Llama
    python benchmarks/refresh_memory.py --json refresh.json        # embedded SmolLM2-135M

Simulated mode (`--simulate-params P`): no model; a stand-in engine returns gradients of P float32 (cheap,
deterministic per reference id), so the refresh's own memory can be measured at any scale, e.g. Llama-3-8B with
LoRA r=16 on q,v (P = 6.8 M, 26 MiB per gradient). Variants of DualSelect.refresh, one subprocess each:

  hold       dualselect.ref_memory=hold (default): the K_R best gradients so far + one chunk
  recompute  dualselect.ref_memory=recompute: scores only, then the chosen ones again: one chunk

    python benchmarks/refresh_memory.py --simulate-params 6800000 --n 10000 --k 1000 --variants recompute
    python benchmarks/refresh_memory.py --simulate-params 6800000 --n 10000 --k 50 --variants hold
    python benchmarks/refresh_memory.py --simulate-params 1000000 --sweep 250,1000,4000 --k-frac 0.1

`--sweep N1,N2,..` measures every variant at each pool size (K_R = ceil(k_frac * N) with --k-frac, else --k). A
variant whose held gradients alone would exceed the machine's available memory is not run (reported as skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

MIB = 1024 * 1024
VARIANTS = ("topk", "hold_all")
SIM_VARIANTS = ("hold", "recompute")


def rss_mib() -> float | None:
    """Current resident set size (Linux), MiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def reset_peak() -> bool:
    """Reset this process's peak-RSS mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def hold_all(method, k: int):
    """The release's refresh: compute and keep all N reference gradients, then select."""
    import torch

    from dualselect.selection.dualselect import cosines, reference_scores, select_references, weighted_direction

    cfg, refs = method.cfg, method.ctx.reference
    chunks, losses = [], []
    for start in range(0, len(refs), cfg.ref_chunk):
        out = method.per_sample_grads(refs[start:start + cfg.ref_chunk])  # same engine and model mode as refresh()
        chunks.append(out.grads)  # kept: N x P floats in the end
        losses.append(out.losses)
    cos = torch.cat([cosines(g, method.d_t) for g in chunks])
    sel = select_references(reference_scores(torch.cat(losses), cos, cfg.mu_ref, cfg.nu), k, cfg.mode, cfg.tau_ref)
    rows = [row for g in chunks for row in g]
    method.g_r = weighted_direction([rows[i] for i in sel.index], sel.weights)
    return sel.index


def child(args) -> dict:
    """One variant, in this (fresh) process."""
    import tempfile
    from pathlib import Path

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from grads_speed import load, machine_facts, random_samples

    from dualselect import models
    from dualselect.grads import get_engine, trainable_params
    from dualselect.logs import JsonlLog
    from dualselect.methods.context import TrainContext
    from dualselect.methods.dualselect import DualSelect, DualSelectConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, precision, device = load(args.model, args.tiny, args.precision)
    torch.manual_seed(0)  # the same LoRA initialisation in both variants
    model = models.add_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05,
                            target_modules=args.lora_targets.split(","))
    model.train()
    response_len = max(1, args.ref_len // 4)
    refs = random_samples(args.n, args.ref_len - response_len, response_len, model.config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = TrainContext(model=model, params=trainable_params(model), task=[], reference=refs,
                           engine=get_engine("loop"), device=device, pad_id=tokenizer.pad_token_id, batch_size=8,
                           epochs=1, seed=0, autocast=lambda: models.autocast(precision, device),
                           selection_log=JsonlLog(Path(tmp) / "selection.jsonl"))
        method = DualSelect(DualSelectConfig(k_ref=args.k), ctx)
        n_params = sum(p.numel() for p in ctx.params)
        method.d_t = torch.randn(n_params, generator=torch.Generator().manual_seed(0)).to(device)
        torch.manual_seed(0)  # same LoRA-dropout masks in both variants

        baseline, load_peak = rss_mib(), peak_mib()
        was_reset = reset_peak()
        t = time.perf_counter()
        if args.child == "topk":
            method.refresh(1)
            with open(Path(tmp) / "selection.jsonl") as fh:
                selected = json.loads(fh.readline())["index"]
        else:
            selected = hold_all(method, args.k)
        wall = time.perf_counter() - t
        peak = peak_mib()
    return {"variant": args.child, "n_trainable_params": n_params, "precision": precision,
            "baseline_rss_mib": baseline, "load_peak_rss_mib": load_peak, "peak_reset": was_reset,
            "peak_rss_mib": peak, "increase_mib": peak - (baseline if baseline is not None else load_peak),
            "wall_s": wall, "selected": selected, "g_r_norm": float(method.g_r.norm()),
            "machine": machine_facts(device)}


class SimulatedEngine:
    """The engine call signature without a model: reference r<i> gets the gradient a_i u + b_i w (u, w: two fixed
    random vectors of P elements; (a_i, b_i) and the loss seeded by i), written into the output in place, so that
    the refresh's own allocations are what is measured (u and w are part of the baseline)."""

    def __init__(self, p: int):
        import torch

        g = torch.Generator().manual_seed(0)
        self.u, self.w = torch.randn(p, generator=g), torch.randn(p, generator=g)

    def __call__(self, model, batch, device, autocast=None):
        import random

        import torch

        from dualselect.grads import PerSampleGrads

        grads = torch.empty(len(batch), self.u.numel(), dtype=torch.float32, device=device)
        losses = torch.empty(len(batch), dtype=torch.float32)
        for row, enc in enumerate(batch):
            rng = random.Random(enc.id)
            torch.mul(self.u, rng.uniform(-1, 1), out=grads[row]).add_(self.w, alpha=rng.uniform(-1, 1))
            losses[row] = rng.uniform(0.5, 3.0)
        return PerSampleGrads(losses, torch.ones(len(batch), dtype=torch.int64), grads)


class _NoModel:
    training = True

    def train(self, mode: bool = True):
        self.training = mode
        return self


def simulate_child(args) -> dict:
    """One simulated variant, in this (fresh) process: DualSelect.refresh(1) on N stand-in references."""
    import tempfile
    from pathlib import Path

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from grads_speed import machine_facts

    from dualselect.data.formatting import Encoded
    from dualselect.logs import JsonlLog
    from dualselect.methods.context import TrainContext
    from dualselect.methods.dualselect import DualSelect, DualSelectConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    p = args.simulate_params
    refs = [Encoded(id=f"r{i}", input_ids=[0], labels=[0]) for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = TrainContext(model=_NoModel(), params=[torch.empty(p, device="meta")], task=[], reference=refs,
                           engine=SimulatedEngine(p), device=torch.device("cpu"), pad_id=0, batch_size=8, epochs=1,
                           seed=0, selection_log=JsonlLog(Path(tmp) / "selection.jsonl"))
        method = DualSelect(DualSelectConfig(k_ref=args.k, ref_chunk=args.chunk, ref_memory=args.child), ctx)
        method.d_t = torch.randn(p, generator=torch.Generator().manual_seed(1))
        baseline, load_peak = rss_mib(), peak_mib()
        was_reset = reset_peak()
        t = time.perf_counter()
        method.refresh(1)
        wall = time.perf_counter() - t
        peak = peak_mib()
        with open(Path(tmp) / "selection.jsonl") as fh:
            selected = json.loads(fh.readline())["index"]
    return {"variant": args.child, "n": args.n, "k": args.k, "chunk": args.chunk, "n_trainable_params": p,
            "baseline_rss_mib": baseline, "load_peak_rss_mib": load_peak, "peak_reset": was_reset,
            "peak_rss_mib": peak, "increase_mib": peak - (baseline if baseline is not None else load_peak),
            "wall_s": wall, "selected": selected, "g_r_norm": float(method.g_r.norm()),
            "machine": machine_facts(torch.device("cpu"))}


def held_mib(variant: str, n: int, k: int, chunk: int, p: int) -> float:
    """Gradients a simulated variant holds at its peak, by design: K_R + one chunk (hold) or one chunk (recompute)."""
    return ((min(k, n) if variant == "hold" else 0) + min(chunk, n)) * p * 4 / MIB


def available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def simulate(args) -> dict:
    """Every variant (and every pool size of --sweep), each in a subprocess; a variant that cannot fit is skipped."""
    pools = [int(x) for x in args.sweep.split(",")] if args.sweep else [args.n]
    rows, avail = [], available_mib()
    for n in pools:
        k = max(1, math.ceil(args.k_frac * n)) if args.k_frac else args.k
        for variant in args.variants.split(","):
            held = held_mib(variant, n, k, args.chunk, args.simulate_params)
            row = {"variant": variant, "n": n, "k": k, "chunk": args.chunk, "held_grads_mib": held}
            if avail is not None and held > 0.8 * avail:
                row["skipped"] = f"would hold {held:.0f} MiB of gradients, {avail:.0f} MiB available"
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--simulate-params",
                       str(args.simulate_params), "--n", str(n), "--k", str(k), "--chunk", str(args.chunk)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr)
                    raise SystemExit(f"{variant} (N={n}) subprocess failed (exit {proc.returncode})")
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)
    done = [r for r in rows if "skipped" not in r]
    same = {}
    for n in pools:  # hold and recompute choose the same references (the stand-in gradients are deterministic)
        picks = [r["selected"] for r in done if r["n"] == n]
        if len(picks) > 1 and len({r["k"] for r in done if r["n"] == n}) == 1:
            same[n] = all(x == picks[0] for x in picks)
    return {"config": {"simulate_params": args.simulate_params, "pools": pools, "k": args.k, "k_frac": args.k_frac,
                       "chunk": args.chunk, "variants": args.variants.split(",")},
            "machine": done[0]["machine"] if done else None, "available_mib": avail, "runs": rows,
            "same_selection": same}


def simulate_markdown(report: dict) -> str:
    from grads_speed import machine_line  # this script's folder is on sys.path

    c = report["config"]
    p = c["simulate_params"]
    lines = [f"simulated refresh (no model): P={p} ({p * 4 / MIB:.1f} MiB per gradient), ref_chunk={c['chunk']}", "",
             "| variant | N | K_R | gradients held MiB (design) | baseline RSS MiB | peak RSS MiB | increase MiB | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | {r['n']} | {r['k']} | {r['held_grads_mib']:.0f} | skipped: "
                         f"{r['skipped']} | | | |")
        else:
            lines.append(f"| {r['variant']} | {r['n']} | {r['k']} | {r['held_grads_mib']:.0f} | "
                         f"{r['baseline_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['increase_mib']:.0f} | "
                         f"{r['wall_s']:.1f} |")
    if report["same_selection"]:
        lines += ["", f"same references chosen by every variant, per N: {report['same_selection']}"]
    if report["machine"]:
        lines.append(machine_line(report["machine"]))
    return "\n".join(lines)


def run_variant(variant: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--model", args.model,
           "--precision", args.precision, "--n", str(args.n), "--k", str(args.k), "--ref-len", str(args.ref_len),
           "--lora-r", str(args.lora_r), "--lora-targets", args.lora_targets]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{variant} subprocess failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    from grads_speed import machine_line  # this script's folder is on sys.path

    c, m = report["config"], report["machine"]
    lines = [f"model {c['model']}, {c['precision']}, N={c['n']} references of {c['ref_len']} tokens, K_R={c['k']}, "
             f"LoRA r={c['lora_r']} on {c['lora_targets']}, P={report['n_trainable_params']}",
             f"N x P x 4 = {report['all_grads_mib']:.1f} MiB, K_R x P x 4 = {report['topk_grads_mib']:.1f} MiB", "",
             "| variant | baseline RSS MiB | peak RSS MiB | increase MiB | gradients held MiB | wall s |",
             "|---|---|---|---|---|---|"]
    for name, r in report["variants"].items():
        held = report["topk_grads_mib"] if name == "topk" else report["all_grads_mib"]
        lines.append(f"| {name} | {r['baseline_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['increase_mib']:.1f} | "
                     f"{held:.1f} | {r['wall_s']:.2f} |")
    lines += ["", f"same references selected by both: {report['same_selection']}; peak mark reset before the "
              f"refresh: {all(r['peak_reset'] for r in report['variants'].values())}",
              machine_line(m)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model name or path (default: embedded SmolLM2)")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama with the SmolLM2 tokenizer")
    ap.add_argument("--precision", default="auto", help="as model.precision (default auto)")
    ap.add_argument("--n", type=int, default=1000, help="references scored")
    ap.add_argument("--k", type=int, default=100, help="K_R, references kept")
    ap.add_argument("--ref-len", type=int, default=48, help="tokens per reference (the last quarter supervised)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the report to this file")
    ap.add_argument("--chunk", type=int, default=8, help="dualselect.ref_chunk (simulated mode)")
    ap.add_argument("--simulate-params", type=int, help="simulated mode: no model, gradients of this many parameters")
    ap.add_argument("--variants", default=",".join(SIM_VARIANTS), help="simulated mode: comma-separated, of hold, "
                                                                        "recompute")
    ap.add_argument("--sweep", help="simulated mode: comma-separated pool sizes N (instead of --n)")
    ap.add_argument("--k-frac", type=float, help="simulated mode: K_R = ceil(K_FRAC * N) (instead of --k)")
    ap.add_argument("--child", choices=VARIANTS + SIM_VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(simulate_child(args) if args.simulate_params else child(args)))
        return
    if args.simulate_params:
        if set(args.variants.split(",")) - set(SIM_VARIANTS):
            ap.error(f"--variants: expected some of {', '.join(SIM_VARIANTS)}")
        report = simulate(args)
        print(simulate_markdown(report))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=2)
        return

    variants = {v: run_variant(v, args) for v in VARIANTS}
    n_params = variants["topk"]["n_trainable_params"]
    report = {
        "config": {"model": "tiny" if args.tiny else args.model, "precision": variants["topk"]["precision"],
                   "n": args.n, "k": args.k, "ref_len": args.ref_len, "lora_r": args.lora_r,
                   "lora_targets": args.lora_targets},
        "machine": variants["topk"]["machine"],
        "n_trainable_params": n_params,
        "all_grads_mib": args.n * n_params * 4 / MIB,
        "topk_grads_mib": min(args.k, args.n) * n_params * 4 / MIB,
        "same_selection": variants["topk"]["selected"] == variants["hold_all"]["selected"],
        "variants": variants,
    }
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
