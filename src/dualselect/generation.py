"""Batched greedy generation in the same prompt template as training."""

from __future__ import annotations

import contextlib

import torch

from .data.formatting import generation_prompt
from .data.records import Example


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, template: str = "chat", max_new_tokens: int = 64,
             batch_size: int = 8, device="cpu", autocast=contextlib.nullcontext, progress=lambda it, **kw: it):
    """Greedy completions of user prompts (one string each, special tokens stripped)."""
    was_training = model.training
    model.eval()
    texts = [generation_prompt(Example(str(i), [{"role": "user", "content": p}]), tokenizer, template)
             for i, p in enumerate(prompts)]
    add_special = template == "plain"
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for start in progress(range(0, len(texts), batch_size), desc="generate",
                              total=(len(texts) + batch_size - 1) // batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=add_special).to(device)
            with autocast():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = ids[:, enc["input_ids"].shape[1]:]
            out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
