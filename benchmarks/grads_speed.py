"""Per-sample LoRA gradients: the project's engine against two naive ways, side by side.

  engine               grads.LoopEngine: one forward/backward per sample, logits only at the
                       supervised positions (logits_to_keep)
  naive_full_logits    one forward per sample with logits at every position, per_sample_nll,
                       then autograd.grad
  batched_retain_graph one padded batched forward, then autograd.grad per sample (retain_graph)

All three run in this one process on the same inputs; the order alternates between repeats.
Prints a Markdown table (median and min seconds, ratio to the engine), the largest gradient
difference to the engine, and the machine facts.

    python benchmarks/grads_speed.py --tiny                 # tiny random Llama (seconds)
    python benchmarks/grads_speed.py --json grads.json      # embedded SmolLM2-135M
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from common import run_and_print

from dualselect import models
from dualselect.data.formatting import Encoded
from dualselect.grads import LoopEngine, batch_losses, flatten, per_sample_nll, trainable_params
from dualselect.runinfo import allocator


def machine_facts(device: torch.device) -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "ld_preload": os.environ.get("LD_PRELOAD", ""), "allocator": allocator(),
            "device": str(device)}


def machine_line(m: dict) -> str:
    return (f"machine: {m['platform']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
            f"torch {m['torch']}, device {m['device']}, allocator {m['allocator']} (LD_PRELOAD={m['ld_preload'] or '-'})")


def load(model_name: str, tiny: bool, precision: str, device: str = "auto"):
    """(model, tokenizer, resolved precision, device): the tiny random Llama or a real model."""
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL if tiny else model_name)
    if tiny:
        dev = models.pick_device(device)
        return (models.tiny_llama(len(tokenizer), seed=0).to(dev), tokenizer,
                models.resolve_precision(precision, dev), dev)
    model, prec, dev = models.load_model(model_name, precision, device)
    return model, tokenizer, prec, dev


def random_samples(n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> list[Encoded]:
    """Random token ids (above the special tokens), labels masked (-100) on the prompt part."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(100, vocab, (prompt_len + response_len,), generator=g).tolist()
        out.append(Encoded(id=f"s{i}", input_ids=ids, labels=[-100] * prompt_len + ids[prompt_len:]))
    return out


def engine_grads(model, batch, device, autocast, pad_id):
    return LoopEngine()(model, batch, device, autocast).grads


def naive_full_logits(model, batch, device, autocast, pad_id):
    params = trainable_params(model)
    rows = []
    for enc in batch:
        ids = torch.tensor([enc.input_ids], device=device)
        labels = torch.tensor([enc.labels], device=device)
        with autocast():
            logits = model(input_ids=ids).logits  # every position projected onto the vocabulary
        loss, _ = per_sample_nll(logits, labels)
        rows.append(flatten(torch.autograd.grad(loss[0], params, allow_unused=True), params))
    return torch.stack(rows)


def batched_retain_graph(model, batch, device, autocast, pad_id):
    params = trainable_params(model)
    losses, _ = batch_losses(model, batch, pad_id, device, autocast)
    rows = [flatten(torch.autograd.grad(losses[i], params, retain_graph=i < len(batch) - 1, allow_unused=True),
                    params) for i in range(len(batch))]
    return torch.stack(rows)


METHODS = {"engine": engine_grads, "naive_full_logits": naive_full_logits,
           "batched_retain_graph": batched_retain_graph}


def timed(fn, *args, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def run(args) -> dict:
    model, tokenizer, precision, device = load(args.model, args.tiny, args.precision, args.device)
    model = models.add_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    torch.manual_seed(1)
    for p in trainable_params(model):  # LoRA B starts at 0 (zero A gradients): perturb so every block counts
        p.data.normal_(0, 0.02)
    model.eval()  # dropout off: the three methods must give the same gradients
    autocast = lambda: models.autocast(precision, device)  # noqa: E731
    batch = random_samples(args.batch, args.prompt_len, args.response_len, model.config.vocab_size)
    call = (model, batch, device, autocast, tokenizer.pad_token_id)

    # One untimed call each: warms up the allocator and gives the gradients to compare.
    grads = {name: fn(*call) for name, fn in METHODS.items()}
    ref = grads["engine"]
    diffs = {name: float((g - ref).abs().max()) for name, g in grads.items() if name != "engine"}

    times = {name: [] for name in METHODS}
    names = list(METHODS)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            _, sec = timed(METHODS[name], *call, device=device)
            times[name].append(sec)
    engine_median = statistics.median(times["engine"])
    results = {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t,
                      "ratio_to_engine": statistics.median(t) / engine_median} for name, t in times.items()}
    return {
        "config": {"model": "tiny" if args.tiny else args.model, "precision": precision, "batch": args.batch,
                   "prompt_len": args.prompt_len, "response_len": args.response_len, "repeats": args.repeats,
                   "lora_r": args.lora_r, "n_trainable_params": sum(p.numel() for p in trainable_params(model))},
        "machine": machine_facts(device),
        "results": results,
        "max_abs_diff_to_engine": diffs,
        "max_abs_grad": float(ref.abs().max()),
    }


def markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    lines = [f"model {c['model']}, {c['precision']}, batch {c['batch']}, prompt {c['prompt_len']} + response "
             f"{c['response_len']} tokens, LoRA r={c['lora_r']} (P={c['n_trainable_params']}), {c['repeats']} repeats",
             "", "| method | median s | min s | median / engine | max abs diff to engine |", "|---|---|---|---|---|"]
    for name, r in report["results"].items():
        diff = report["max_abs_diff_to_engine"].get(name)
        lines.append(f"| {name} | {r['median_s']:.4f} | {r['min_s']:.4f} | {r['ratio_to_engine']:.2f} | "
                     f"{'-' if diff is None else f'{diff:.2e}'} |")
    lines += ["", f"largest |gradient| {report['max_abs_grad']:.3e}",
              machine_line(m)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="model name or path (default: embedded SmolLM2)")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama with the SmolLM2 tokenizer")
    ap.add_argument("--precision", default="bf16-autocast", choices=["fp32", "bf16-autocast"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the report to this file")
    run_and_print(ap.parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
