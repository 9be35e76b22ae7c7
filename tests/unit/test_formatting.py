import pytest
import torch

from dualselect.data import Encoded, Example, collate, encode, encode_all, generation_prompt, plain_prompt_text
from dualselect.errors import DualSelectError

IGN = -100
PROMPT_IDS = [14917, 42, 1792, 198, 9519, 9531, 42]  # "Human: x\nAssistant:" (measured, SmolLM2)
FULL_IDS = PROMPT_IDS + [2731, 216, 2]  # + " positive" " " "<|im_end|>"


def turn(prompt, response=None, system=None, history=()):
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def supervised(enc):
    """(position, label) of every supervised position; a label is always the input token there."""
    assert all(lab in (IGN, tid) for tid, lab in zip(enc.input_ids, enc.labels))
    return [(i, lab) for i, lab in enumerate(enc.labels) if lab != IGN]


def runs(enc):
    """Contiguous supervised runs of token ids."""
    out, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGN:
            assert lab == tid
            cur.append(tid)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_measured_tokenization(smol_tokenizer):
    assert smol_tokenizer("Human: x\nAssistant: ").input_ids == PROMPT_IDS + [216]
    assert smol_tokenizer("Human: x\nAssistant: positive <|im_end|>").input_ids == FULL_IDS


def test_plain_text():
    ex = Example("a", turn("x", "positive"))
    assert plain_prompt_text(ex) == "Human: x\nAssistant: "
    ex = Example("b", turn("q2", "a2", system="Sys.", history=[("q1", "a1")]))
    assert plain_prompt_text(ex) == "Sys.\n\nHuman: q1\nAssistant: a1\nHuman: q2\nAssistant: "


def test_plain_release_mask_exact(smol_tokenizer):
    enc = encode(Example("a", turn("x", "positive")), smol_tokenizer, template="plain", mask="release")
    assert enc.input_ids == FULL_IDS
    assert enc.labels == [IGN] * 8 + [216, 2]
    assert supervised(enc) == [(8, 216), (9, 2)]
    assert enc.n_supervised == 2 and not enc.truncated


def test_plain_response_mask_exact(smol_tokenizer):
    enc = encode(Example("a", turn("x", "positive")), smol_tokenizer, template="plain", mask="response")
    assert enc.input_ids == FULL_IDS
    assert enc.labels == [IGN] * 7 + [2731, 216, 2]
    assert supervised(enc) == [(7, 2731), (8, 216), (9, 2)]


def test_plain_multiturn_supervises_final_response_only(smol_tokenizer):
    ex = Example("m", turn("q2", "final answer", system="Sys.", history=[("q1", "earlier")]))
    enc = encode(ex, smol_tokenizer, template="plain")
    assert smol_tokenizer.decode(enc.input_ids) == plain_prompt_text(ex) + "final answer <|im_end|>"
    (run,) = runs(enc)
    assert smol_tokenizer.decode(run) == " final answer <|im_end|>"


def test_chat_assistant_only_with_system(smol_tokenizer):
    ex = Example("c", turn("What is 2+2?", "It is 4.", system="Be brief."))
    enc = encode(ex, smol_tokenizer)  # template chat, mask response
    text = smol_tokenizer.decode(enc.input_ids)
    assert text == smol_tokenizer.apply_chat_template(ex.messages, tokenize=False)
    (run,) = runs(enc)
    assert smol_tokenizer.decode(run) == "It is 4.<|im_end|>"
    unsup = smol_tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGN])
    assert "Be brief." in unsup and "What is 2+2?" in unsup and "It is 4." not in unsup
    assert enc.labels[-1] == IGN  # the newline the template puts after <|im_end|>


def test_chat_multiturn(smol_tokenizer):
    ex = Example("mt", turn("and 3+3?", "Six.", history=[("2+2?", "Four.")]))
    enc = encode(ex, smol_tokenizer, template="chat")
    assert [smol_tokenizer.decode(r) for r in runs(enc)] == ["Four.<|im_end|>", "Six.<|im_end|>"]
    # the default system prompt the SmolLM2 template adds is not supervised
    assert "You are a helpful AI assistant" in smol_tokenizer.decode(enc.input_ids)


def test_chat_without_template(smol_tokenizer, monkeypatch):
    monkeypatch.setattr(smol_tokenizer, "chat_template", None)
    with pytest.raises(DualSelectError, match="no chat template: set data.template=plain"):
        encode(Example("a", turn("x", "y")), smol_tokenizer, template="chat")


def test_chat_not_prefix_consistent(smol_tokenizer, monkeypatch):
    tpl = ("{{ messages|length }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}<assistant>{% endif %}")
    monkeypatch.setattr(smol_tokenizer, "chat_template", tpl)
    with pytest.raises(DualSelectError, match="example 'a': the chat template is not prefix-consistent"):
        encode(Example("a", turn("x", "y")), smol_tokenizer, template="chat")


def test_bad_options(smol_tokenizer):
    ex = Example("a", turn("x", "y"))
    with pytest.raises(DualSelectError, match="mask 'release' .* needs template 'plain'"):
        encode(ex, smol_tokenizer, template="chat", mask="release")
    with pytest.raises(DualSelectError, match="unknown template 'alpaca'"):
        encode(ex, smol_tokenizer, template="alpaca")
    with pytest.raises(DualSelectError, match="unknown mask 'all'"):
        encode(ex, smol_tokenizer, template="plain", mask="all")
    with pytest.raises(DualSelectError, match="example 'p' has no final assistant response"):
        encode(Example("p", turn("x")), smol_tokenizer, template="plain")


def test_truncation_and_drop_counts(smol_tokenizer):
    exs = [Example("a", turn("x", "positive")), Example("b", turn("x", "positive " * 20)), Example("c", turn("x", "ok"))]
    # 8 tokens: "Human: x\nAssistant: positive" -> only the response word is left
    out, stats = encode_all(exs, smol_tokenizer, template="plain", mask="response", max_length=8)
    assert [e.id for e in out] == ["a", "b", "c"]
    assert all(e.truncated and len(e.input_ids) == 8 and e.n_supervised == 1 for e in out)
    assert stats == {"n_in": 3, "n_out": 3, "n_truncated": 3, "n_dropped_no_supervised": 0}
    # the release mask supervises nothing in the first 8 positions: all dropped
    out, stats = encode_all(exs, smol_tokenizer, template="plain", mask="release", max_length=8)
    assert out == [] and stats == {"n_in": 3, "n_out": 0, "n_truncated": 0, "n_dropped_no_supervised": 3}
    out, stats = encode_all(exs, smol_tokenizer, template="plain", mask="release", max_length=16)
    assert [e.id for e in out] == ["a", "b", "c"] and [e.truncated for e in out] == [False, True, False]
    assert stats == {"n_in": 3, "n_out": 3, "n_truncated": 1, "n_dropped_no_supervised": 0}


def test_collate_right_padding():
    batch = [Encoded("a", [5, 6, 7], [IGN, 6, 7]), Encoded("b", [1, 2, 3, 4, 9], [IGN, IGN, 3, 4, 9])]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[IGN, 6, 7, IGN, IGN], [IGN, IGN, 3, 4, 9]]
    with pytest.raises(DualSelectError):
        collate([], pad_id=0)


def test_generation_prompt(smol_tokenizer):
    ex = Example("g", turn("hi", "hello"))
    assert generation_prompt(ex, smol_tokenizer, "plain") == "Human: hi\nAssistant: "
    chat = generation_prompt(ex, smol_tokenizer, "chat")
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    full = smol_tokenizer.apply_chat_template(ex.messages, tokenize=False)
    assert full.startswith(chat)
