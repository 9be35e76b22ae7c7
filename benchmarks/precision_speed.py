"""fp32 against bf16 autocast on this machine, side by side, for the three kinds of work a run does:

  sft_step     one SFT step: padded batched forward (grads.batch_losses) + backward of the mean loss
  grads        per-sample LoRA gradients of a batch (grads.LoopEngine, what DualSelect scores with)
  generate     greedy generation of a batch of prompts (generation.generate)

Both precisions run in this one process on the same model weights and inputs; every repeat runs each
(work, precision) pair once, the order reversed every other repeat, after one untimed warm-up call each.
Prints the median seconds of each, the bf16 / fp32 ratio, what `model.precision=auto` chose here and why,
and the machine facts (incl. the CPU's bf16 flags).

    python benchmarks/precision_speed.py --tiny             # tiny random Llama (seconds)
    python benchmarks/precision_speed.py --json prec.json   # embedded SmolLM2-135M
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import cpu_facts, run_and_print
from grads_speed import load, machine_facts, machine_line, random_samples

from dualselect import models
from dualselect.generation import generate
from dualselect.grads import LoopEngine, batch_losses, trainable_params

PRECISIONS = ("fp32", "bf16-autocast")


def run(args) -> dict:
    model, tokenizer, _, device = load(args.model, args.tiny, "fp32", args.device)
    model = models.add_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    torch.manual_seed(1)
    for p in trainable_params(model):
        p.data.normal_(0, 0.02)
    batch = random_samples(args.batch, args.prompt_len, args.response_len, model.config.vocab_size)
    prompts = [f"Write one sentence about the number {i}." for i in range(args.batch)]
    pad = tokenizer.pad_token_id

    def sft_step(ac):
        model.train()
        losses, _ = batch_losses(model, batch, pad, device, ac)
        losses.mean().backward()
        model.zero_grad(set_to_none=True)

    def grads(ac):
        model.train()
        LoopEngine()(model, batch, device, ac)

    def gen(ac):
        generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch, device=device,
                 autocast=ac)

    work = {"sft_step": sft_step, "grads": grads, "generate": gen}
    contexts = {p: (lambda p=p: models.autocast(p, device)) for p in PRECISIONS}
    pairs = [(w, p) for w in work for p in PRECISIONS]
    for w, p in pairs:  # warm-up
        work[w](contexts[p])
    times = {pair: [] for pair in pairs}
    for r in range(args.repeats):
        for w, p in (pairs if r % 2 == 0 else pairs[::-1]):
            t = time.perf_counter()
            work[w](contexts[p])
            times[(w, p)].append(time.perf_counter() - t)
    results = {}
    for w in work:
        med = {p: statistics.median(times[(w, p)]) for p in PRECISIONS}
        results[w] = {"median_s": med, "times_s": {p: times[(w, p)] for p in PRECISIONS},
                      "bf16_over_fp32": med["bf16-autocast"] / med["fp32"]}
    choice = models.choose_precision("auto", device)
    return {
        "config": {"model": "tiny" if args.tiny else args.model, "batch": args.batch, "prompt_len": args.prompt_len,
                   "response_len": args.response_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                   "lora_r": args.lora_r},
        "machine": {**machine_facts(device), **cpu_facts(device)},
        "auto": {"precision": choice.precision, "reason": choice.reason},
        "results": results,
    }


def markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    lines = [f"model {c['model']}, batch {c['batch']}, prompt {c['prompt_len']} + response {c['response_len']} tokens, "
             f"generate {c['new_tokens']} new tokens, LoRA r={c['lora_r']} on q,v, {c['repeats']} repeats", "",
             "| work | fp32 median s | bf16-autocast median s | bf16 / fp32 |", "|---|---|---|---|"]
    for w, r in report["results"].items():
        lines.append(f"| {w} | {r['median_s']['fp32']:.3f} | {r['median_s']['bf16-autocast']:.3f} | "
                     f"{r['bf16_over_fp32']:.2f} |")
    lines += ["", f"precision auto here: {report['auto']['precision']} ({report['auto']['reason']})",
              f"torch CPU capability {m['cpu_capability']}; native bf16 flags: {', '.join(m['native_bf16_flags']) or 'none'}",
              machine_line(m)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="model name or path (default: embedded SmolLM2)")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama with the SmolLM2 tokenizer")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the report to this file")
    run_and_print(ap.parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
