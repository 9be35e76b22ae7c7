"""Batched greedy generation in the same prompt template as training.

`generate` returns the completions (strings); `generate(..., details=True)` also says which outputs were
cut off at max_new_tokens and records the decoding settings. `generate_batches` yields batch by batch, for
callers that store results as they come (the evaluation harness). `sample_responses` draws K sampled
responses per prompt with their token ids (the feedback-gated method's rollouts), through the same path.
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


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a generation: the model's own generation config (`eos_token_id`, an id or a list,
    e.g. Llama-3-Instruct's <|eot_id|> next to <|end_of_text|>, Gemma-3's <end_of_turn>), then the tokenizer's
    eos token; duplicates dropped, the config's order kept."""
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [config] if isinstance(config, int) else list(config or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def _prompt_texts(tokenizer, prompts: list[str | list[dict]], template: str) -> list[str]:
    conversations = [list(p) if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
    return [generation_prompt(Example(str(i), c), tokenizer, template) for i, c in enumerate(conversations)]


@torch.no_grad()
def _decode_batches(model, tokenizer, texts: list[str], *, template: str, max_new_tokens: int, batch_size: int,
                    device, autocast, progress, desc: str, **generate_kwargs):
    """The one generation path: left-padded batches of prompt texts through `model.generate` in eval mode,
    stopping at any of stop_token_ids. Yields (index of the batch's first prompt, the tokenized batch, the new
    token ids [b * n_returned, new])."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in progress(range(0, len(texts), batch_size), desc=desc,
                              total=(len(texts) + batch_size - 1) // batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=template == "plain").to(device)
            with autocast():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=stop_token_ids(model, tokenizer), **generate_kwargs)
            yield start, enc, ids[:, enc["input_ids"].shape[1]:]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


def _before_stop(rows: torch.Tensor, stops) -> list[list[int]]:
    """Each generated row's ids before its first stop token: the stop token and the padding after it are not
    decoded (a turn-end token the tokenizer does not mark special, e.g. <end_of_turn> in some tokenizers, would
    otherwise stay in the text)."""
    stops = set(stops)
    return [next((row[:i] for i, t in enumerate(row) if t in stops), row) for row in rows.tolist()]


def _cut_flags(new: torch.Tensor, stops: list[int], max_new_tokens: int) -> list[bool]:
    """A row is cut off when it used the whole budget and never produced a stop token."""
    ended = torch.isin(new, torch.tensor(stops, device=new.device)).any(dim=1)
    return [new.shape[1] >= max_new_tokens and not bool(e) for e in ended]


def generate_batches(model, tokenizer, prompts: list[str | list[dict]], *, template: str = "chat",
                     max_new_tokens: int = 64, batch_size: int = 8, device="cpu", autocast=contextlib.nullcontext,
                     progress=lambda it, **kw: it, stop=()) -> Iterator[tuple[int, list[str], list[bool]]]:
    """Greedy completions of user prompts, one batch at a time: yields (index of the batch's first prompt,
    texts with special tokens stripped, truncated flags). A prompt is a user message, or a conversation (a
    list of {role, content} messages; a final assistant message is left out) answered as its next turn.
    Generation stops at the end-of-sequence token; `stop` strings also end a completion (cut_at_stop; such a
    completion is not truncated)."""
    texts = _prompt_texts(tokenizer, prompts, template)
    for start, _, new in _decode_batches(model, tokenizer, texts, template=template, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, device=device, autocast=autocast,
                                         progress=progress, desc="generate", do_sample=False):
        stops = stop_token_ids(model, tokenizer)
        cut = _cut_flags(new, stops, max_new_tokens)
        outs = [cut_at_stop(t.strip(), stop)
                for t in tokenizer.batch_decode(_before_stop(new, stops), skip_special_tokens=True)]
        yield start, [t for t, _ in outs], [c and not stopped for c, (_, stopped) in zip(cut, outs)]


@dataclass
class Sample:
    """One sampled response: its text (special tokens stripped, cut at `stop`), the exact token ids it was
    sampled from (`prompt_ids`, no padding) and sampled (`ids`: up to and including the first stop token,
    nothing after it), and whether it hit max_new_tokens without ending."""
    text: str
    prompt_ids: list[int]
    ids: list[int]
    truncated: bool


def sample_responses(model, tokenizer, prompts: list[str | list[dict]], *, k: int, template: str = "chat",
                     max_new_tokens: int = 24, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8,
                     device="cpu", autocast=contextlib.nullcontext, stop=()) -> list[list[Sample]]:
    """`k` sampled responses to each prompt (ancestral sampling at `temperature`, nucleus `top_p`), through the
    same batching, template and padding as greedy generation; uses torch's global RNG (callers that need a
    reproducible stream wrap the call, e.g. in torch.random.fork_rng). `batch_size` counts prompts."""
    if k < 1:
        raise ValueError("k must be >= 1")
    if not temperature > 0:
        raise ValueError("temperature must be > 0")
    texts = _prompt_texts(tokenizer, prompts, template)
    stops = set(stop_token_ids(model, tokenizer))
    out: list[list[Sample]] = []
    for _, enc, new in _decode_batches(model, tokenizer, texts, template=template, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, device=device, autocast=autocast,
                                       progress=lambda it, **kw: it, desc="sample", do_sample=True,
                                       temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=k):
        cut = _cut_flags(new, sorted(stops), max_new_tokens)
        decoded = tokenizer.batch_decode(_before_stop(new, stops), skip_special_tokens=True)
        for p in range(enc["input_ids"].shape[0]):
            prompt_ids = enc["input_ids"][p][enc["attention_mask"][p].bool()].tolist()
            group = []
            for j in range(p * k, (p + 1) * k):
                row = new[j].tolist()
                end = next((t for t, tok in enumerate(row) if tok in stops), None)
                ids = row if end is None else row[:end + 1]
                text, stopped = cut_at_stop(decoded[j].strip(), stop)
                group.append(Sample(text, prompt_ids, ids, cut[j] and not stopped))
            out.append(group)
    return out


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
