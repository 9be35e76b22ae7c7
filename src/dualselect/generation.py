"""Batched greedy generation in the same prompt template as training.

`generate` returns the completions (strings); `generate(..., details=True)` also says which outputs were
cut off at max_new_tokens and records the decoding settings. `generate_batches` yields batch by batch, for
callers that store results as they come (the evaluation harness).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .data.formatting import generation_prompt
from .data.records import Example


def decoding_settings(*, template: str, max_new_tokens: int, batch_size: int, stop=()) -> dict:
    """What is recorded with every generated output: greedy decoding and its settings. The batch size
    is part of it because left padding can change greedy outputs slightly."""
    return {"strategy": "greedy", "do_sample": False, "max_new_tokens": max_new_tokens, "template": template,
            "batch_size": batch_size, "padding_side": "left", "stop": ["eos_token", *stop]}


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
    """`text` up to the first occurrence of any stop string (which is dropped), and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(hits)].rstrip(), True) if hits else (text, False)


@dataclass
class Generations:
    texts: list[str]
    truncated: list[bool]  # True: the output hit max_new_tokens without an end-of-sequence token
    settings: dict


@torch.no_grad()
def generate_batches(model, tokenizer, prompts: list[str | list[dict]], *, template: str = "chat",
                     max_new_tokens: int = 64, batch_size: int = 8, device="cpu", autocast=contextlib.nullcontext,
                     progress=lambda it, **kw: it, stop=()) -> Iterator[tuple[int, list[str], list[bool]]]:
    """Greedy completions of user prompts, one batch at a time: yields (index of the batch's first prompt,
    texts with special tokens stripped, truncated flags). A prompt is a user message, or a conversation (a
    list of {role, content} messages; a final assistant message is left out) answered as its next turn.
    Generation stops at the end-of-sequence token; `stop` strings also end a completion (cut_at_stop; such a
    completion is not truncated)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    was_training = model.training
    model.eval()
    conversations = [list(p) if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
    texts = [generation_prompt(Example(str(i), c), tokenizer, template) for i, c in enumerate(conversations)]
    add_special = template == "plain"
    eos = tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in progress(range(0, len(texts), batch_size), desc="generate",
                              total=(len(texts) + batch_size - 1) // batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=add_special).to(device)
            with autocast():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            new = ids[:, enc["input_ids"].shape[1]:]
            # a row is cut off when it used the whole budget and never produced the end-of-sequence token
            cut = [new.shape[1] >= max_new_tokens and not bool((row == eos).any()) for row in new]
            outs = [cut_at_stop(t.strip(), stop) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
            yield start, [t for t, _ in outs], [c and not stopped for c, (_, stopped) in zip(cut, outs)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


def generate(model, tokenizer, prompts: list[str | list[dict]], *, template: str = "chat", max_new_tokens: int = 64,
             batch_size: int = 8, device="cpu", autocast=contextlib.nullcontext, progress=lambda it, **kw: it,
             details: bool = False, stop=()):
    """Greedy completions of user prompts (one string each, special tokens stripped).

    details=True returns `Generations` (texts, truncated flags, decoding settings) instead of the list."""
    texts: list[str] = []
    truncated: list[bool] = []
    for _, batch, cut in generate_batches(model, tokenizer, prompts, template=template,
                                          max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                                          autocast=autocast, progress=progress, stop=stop):
        texts += batch
        truncated += cut
    if not details:
        return texts
    return Generations(texts, truncated, decoding_settings(template=template, max_new_tokens=max_new_tokens,
                                                          batch_size=batch_size, stop=stop))
