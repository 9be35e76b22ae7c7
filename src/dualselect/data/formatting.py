"""Examples -> token ids and labels (-100 where no loss is taken).

Two templates:

- ``chat``: the tokenizer's own chat template. Loss on every assistant turn as the template renders
  it (content + end-of-turn marker, e.g. ``hello<|im_end|>``; whitespace the template puts after
  the marker is not supervised). System and user turns and the generation prompts are masked. The text is
  tokenized in two pieces, split where the final response starts, so its first ids are exactly those of
  ``generation_prompt`` tokenized alone (what the model is prompted with).
- ``plain`` (the paper's format): ``"Human: {prompt}\\nAssistant: " + response + " " + eos``,
  tokenized whole with the tokenizer's default special tokens. A system message is put first as
  ``content + "\\n\\n"``; earlier turns as ``"Human: {u}\\nAssistant: {a}\\n"``. Only the final
  response (and the " " + eos after it) is supervised.

Two masks for ``plain``:

- ``response`` (default): every token whose character span ends after the prompt text is
  supervised, so the first response word (which merges with the space before it) gets loss.
- ``release``: the authors' release, for parity only: the first ``len(tokenizer(prompt_text))``
  positions are masked. With byte-level BPE tokenizers the prompt alone ends in a lone space token
  that merges into the first response word in the whole text, so the first response token gets no
  loss (for a one-word SST-2 label only " " and eos are supervised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DualSelectError
from .records import Example

IGNORE_INDEX = -100
TEMPLATES = ("chat", "plain")
MASKS = ("response", "release")


@dataclass
class Encoded:
    id: str
    input_ids: list[int]
    labels: list[int]  # token id where supervised, IGNORE_INDEX elsewhere
    truncated: bool = False

    @property
    def n_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def plain_prompt_text(example: Example) -> str:
    """The plain template up to the final response: "Human: {prompt}\\nAssistant: " for one turn.

    Also the generation prompt for prompt-only examples (eval sets).
    """
    messages = example.messages
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    parts = []
    expected = "user"
    for i, m in enumerate(messages):
        if m["role"] == "system" and i == 0:
            parts.append(m["content"] + "\n\n")
            continue
        if m["role"] != expected:
            raise DualSelectError(f"example '{example.id}': the plain template needs turns alternating user/assistant "
                                  f"(an optional system message first); message {i + 1} is {m['role']}")
        parts.append(f"Human: {m['content']}\nAssistant: " if expected == "user" else f"{m['content']}\n")
        expected = "assistant" if expected == "user" else "user"
    if expected != "assistant":
        raise DualSelectError(f"example '{example.id}': the plain template needs a user message before the response")
    return "".join(parts)


def _with_offsets(tokenizer, text: str, **kwargs) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, return_offsets_mapping=True, **kwargs)
    except (NotImplementedError, ValueError, TypeError) as e:
        raise DualSelectError(f"this tokenizer gives no offset mappings ({e}); the response mask and the chat "
                              "template need a fast tokenizer") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _render(tokenizer, example: Example, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja errors (e.g. "roles must alternate") and the like
        raise DualSelectError(f"example '{example.id}': the tokenizer's chat template failed: "
                              f"{type(e).__name__}: {e}") from None


def _chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DualSelectError("the tokenizer has no chat template: set data.template=plain (the paper's "
                             "Human/Assistant format) or use a chat model whose tokenizer has one")


def _encode_chat(example: Example, tokenizer) -> tuple[list[int], list[int]]:
    _chat_template(tokenizer)
    msgs = example.messages
    full = _render(tokenizer, example, msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, example, msgs[:i], True)
        upto = _render(tokenizer, example, msgs[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DualSelectError(
                f"example '{example.id}': the chat template is not prefix-consistent (rendering the conversation "
                f"up to assistant turn {i + 1} is not a prefix of the whole), so its assistant tokens cannot be "
                "located; use template='plain' or a tokenizer whose template renders earlier turns unchanged")
        spans.append((len(before), max(len(before), len(upto.rstrip()))))
    # tokenized in two pieces, split where the final response starts: the prompt's ids are then exactly those the
    # model is given at generation (tokenized whole, a trailing "\n\n" or " " can merge with the response's first
    # characters, e.g. with a byte-level BPE, and the model would train on a prompt it never sees)
    cut = spans[-1][0] if spans else len(full)
    ids, offsets = _with_offsets(tokenizer, full[:cut], add_special_tokens=False)
    rest_ids, rest_offsets = _with_offsets(tokenizer, full[cut:], add_special_tokens=False)
    ids, offsets = ids + rest_ids, offsets + [(s + cut, e + cut) for s, e in rest_offsets]
    labels = [tid if any(s < end and e > start for start, end in spans) else IGNORE_INDEX
              for tid, (s, e) in zip(ids, offsets)]
    return ids, labels


def _encode_plain(example: Example, tokenizer, mask: str) -> tuple[list[int], list[int]]:
    if tokenizer.eos_token is None:
        raise DualSelectError("the plain template needs the tokenizer's eos_token, and this tokenizer has none")
    prompt_text = plain_prompt_text(example)
    text = prompt_text + example.response + " " + tokenizer.eos_token
    if mask == "release":
        ids = list(tokenizer(text)["input_ids"])
        n_prompt = len(tokenizer(prompt_text)["input_ids"])
        return ids, [IGNORE_INDEX] * min(n_prompt, len(ids)) + ids[n_prompt:]
    ids, offsets = _with_offsets(tokenizer, text)
    cut = len(prompt_text)
    return ids, [tid if e > cut else IGNORE_INDEX for tid, (_, e) in zip(ids, offsets)]


def encode(example: Example, tokenizer, *, template: str = "chat", mask: str = "response",
           max_length: int = 256) -> Encoded:
    """Token ids and labels of one training example (its last message must be the assistant's)."""
    if template not in TEMPLATES:
        raise DualSelectError(f"unknown template '{template}' (templates: {', '.join(TEMPLATES)})")
    if mask not in MASKS:
        raise DualSelectError(f"unknown mask '{mask}' (masks: {', '.join(MASKS)})")
    if mask == "release" and template != "plain":
        raise DualSelectError("mask 'release' reproduces the authors' release and needs template 'plain'")
    if max_length < 1:
        raise DualSelectError(f"max_length must be >= 1, got {max_length}")
    if not example.messages or example.messages[-1]["role"] != "assistant":
        raise DualSelectError(f"example '{example.id}' has no final assistant response to train on")
    if template == "chat":
        ids, labels = _encode_chat(example, tokenizer)
    else:
        ids, labels = _encode_plain(example, tokenizer, mask)
    truncated = len(ids) > max_length
    return Encoded(example.id, ids[:max_length], labels[:max_length], truncated)


def encode_all(examples: list[Example], tokenizer, *, template: str = "chat", mask: str = "response",
               max_length: int = 256) -> tuple[list[Encoded], dict]:
    """Encode every example; drop those left with no supervised token (e.g. cut off by truncation).

    stats: n_in, n_out, n_truncated (kept examples that were cut at max_length),
    n_dropped_no_supervised.
    """
    out, dropped = [], 0
    for ex in examples:
        enc = encode(ex, tokenizer, template=template, mask=mask, max_length=max_length)
        if enc.n_supervised == 0:
            dropped += 1
        else:
            out.append(enc)
    stats = {"n_in": len(examples), "n_out": len(out), "n_truncated": sum(e.truncated for e in out),
             "n_dropped_no_supervised": dropped}
    return out, stats


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (pad_id), attention_mask (0 on pads), labels (-100 on pads)."""
    if not batch:
        raise DualSelectError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def generation_prompt(example: Example, tokenizer, template: str = "chat") -> str:
    """The text to generate a response from, in the same template as training (final assistant
    message, if any, left out). Tokenize chat prompts with add_special_tokens=False."""
    messages = example.messages
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if template == "plain":
        return plain_prompt_text(Example(example.id, messages, example.meta))
    if template != "chat":
        raise DualSelectError(f"unknown template '{template}' (templates: {', '.join(TEMPLATES)})")
    _chat_template(tokenizer)
    return _render(tokenizer, example, messages, True)
