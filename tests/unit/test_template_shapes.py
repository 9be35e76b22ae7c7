"""Chat formatting, label masks, generation prompts and stopping with tokenizers of other families' shapes.

Each shape is built here from a copy of the SmolLM2 tokenizer (no download): the family's special tokens are
added, bos/eos/pad set as the family does, and a chat template written for these tests in that family's style:

- ``llama2``: Llama-2/Mistral ``<s>[INST] ... [/INST] answer </s>``; the template writes the BOS and the
  tokenizer also adds one by itself (no double BOS allowed).
- ``llama3``: ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>``; the turn
  ends with ``<|eot_id|>``, the tokenizer's eos is ``<|end_of_text|>``, the generation config lists both.
- ``gemma``: ``<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n``; no system role (a system
  message is folded into the first user turn); stops at ``<end_of_turn>`` and ``<eos>``.
- ``qwen``: ChatML with a default system prompt injected when none is given.

Every expectation is a literal written by hand (the exact rendered prompt, the exact supervised text), and the
encoded ids are compared with the tokenization of those literals: prompt ids + response ids + trailing ids.
The rule checked (encode's docstring): with the chat template every assistant turn is supervised as the
template renders it (content + end-of-turn marker), nothing else; with the plain template only the final
response (+ " " + eos).
"""

import copy
from dataclasses import dataclass

import pytest
import torch
from tokenizers import processors

from dualselect.data import Example, encode, encode_all, generation_prompt
from dualselect.generation import _cut_flags, generate, sample_responses, stop_token_ids
from dualselect.models import tiny_llama

from test_formatting import runs as id_runs  # contiguous supervised runs of token ids

IGN = -100

LLAMA2 = """{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
  {%- set sys = '<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set sys = '' -%}{%- set turns = messages -%}{%- endif -%}
{%- for m in turns -%}
  {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{- raise_exception('roles must alternate') -}}{%- endif -%}
  {%- if m['role'] == 'user' -%}{{- '[INST] ' + (sys if loop.first else '') + m['content'] | trim + ' [/INST]' -}}
  {%- else -%}{{- ' ' + m['content'] | trim + ' ' + eos_token -}}{%- endif -%}
{%- endfor -%}"""

LLAMA3 = """{{- bos_token -}}
{%- for m in messages -%}
  {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"""

GEMMA = """{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
  {%- set lead = messages[0]['content'] | trim + '\\n\\n' -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set lead = '' -%}{%- set turns = messages -%}{%- endif -%}
{%- for m in turns -%}
  {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{- raise_exception('roles must alternate') -}}{%- endif -%}
  {%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
  {{- '<start_of_turn>' + role + '\\n' + (lead if loop.first else '') + m['content'] | trim + '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"""

QWEN = """{%- if messages[0]['role'] != 'system' -%}
  {{- '<|im_start|>system\\nYou are Qwerty, a careful assistant.<|im_end|>\\n' -}}
{%- endif -%}
{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""

SINGLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
          {"role": "assistant", "content": "It is 4."}]
MULTI = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Four."},
         {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]


@dataclass
class Shape:
    name: str
    template: str
    new_tokens: list  # special tokens the family adds (SmolLM2 has <|im_start|>, <|im_end|>, <|endoftext|>)
    bos: str | None
    eos: str
    pad: str
    auto_bos: bool  # the tokenizer adds the BOS by itself (add_special_tokens=True)
    config_eos: object  # the generation config's eos_token_id, as token strings
    stops: list  # what stop_token_ids must return, in order
    marker: str  # the assistant's end-of-turn marker (supervised)
    # hand-written expectations: (prompt, supervised texts of every assistant turn, text after the last marker)
    single: tuple
    multi: tuple


SHAPES = [
    Shape("llama2", LLAMA2, ["<s>", "</s>"], "<s>", "</s>", "</s>", True, "</s>", ["</s>"], "</s>",
          ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST]", [" It is 4. </s>"], ""),
          ("<s>[INST] 2+2? [/INST] Four. </s>[INST] And 3+3? [/INST]", [" Four. </s>", " Six. </s>"], "")),
    Shape("llama3", LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"],
          "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", True, ["<|end_of_text|>", "<|eot_id|>"],
          ["<|end_of_text|>", "<|eot_id|>"], "<|eot_id|>",
          (("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"), ["It is 4.<|eot_id|>"], ""),
          (("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nFour.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"), ["Four.<|eot_id|>", "Six.<|eot_id|>"], "")),
    Shape("gemma", GEMMA, ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
          "<bos>", "<eos>", "<pad>", True, ["<eos>", "<end_of_turn>"], ["<eos>", "<end_of_turn>"], "<end_of_turn>",
          ("<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
           ["It is 4.<end_of_turn>"], "\n"),
          (("<bos><start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\nFour.<end_of_turn>\n"
            "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n"),
           ["Four.<end_of_turn>", "Six.<end_of_turn>"], "\n")),
    Shape("qwen", QWEN, [], None, "<|im_end|>", "<|endoftext|>", False, ["<|im_end|>", "<|endoftext|>"],
          ["<|im_end|>", "<|endoftext|>"], "<|im_end|>",
          (("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n"), ["It is 4.<|im_end|>"], "\n"),
          (("<|im_start|>system\nYou are Qwerty, a careful assistant.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\nFour.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"),
           ["Four.<|im_end|>", "Six.<|im_end|>"], "\n")),
]
IDS = [s.name for s in SHAPES]


def build(smol_tokenizer, shape: Shape, special_marker: bool = True):
    tok = copy.deepcopy(smol_tokenizer)
    new = [t for t in shape.new_tokens if special_marker or t != shape.marker]
    tok.add_tokens(new, special_tokens=True)
    if not special_marker:  # as some fine-tunes register their turn end: an added token not marked special
        tok.add_tokens([shape.marker])
    tok.bos_token, tok.eos_token, tok.pad_token = shape.bos, shape.eos, shape.pad
    if shape.auto_bos:
        bos = tok.convert_tokens_to_ids(shape.bos)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{shape.bos} $A", pair=f"{shape.bos} $A {shape.bos} $B", special_tokens=[(shape.bos, bos)])
    tok.chat_template = shape.template
    return tok


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def shaped(request, smol_tokenizer):
    shape = request.param
    return shape, build(smol_tokenizer, shape)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def runs(tok, enc):
    """The supervised positions as decoded texts of contiguous runs (labels always equal the input there)."""
    assert len(enc.labels) == len(enc.input_ids)
    return [tok.decode(r) for r in id_runs(enc)]


def test_shape_tokenizer_is_built_as_the_family_does(shaped, smol_tokenizer):
    shape, tok = shaped
    assert tok.eos_token == shape.eos and tok.bos_token == shape.bos and tok.pad_token == shape.pad
    for t in shape.new_tokens + [shape.marker]:
        assert len(ids_of(tok, t)) == 1 and tok.convert_ids_to_tokens(ids_of(tok, t))[0] == t
    plain = tok("hi")["input_ids"]
    assert (plain[0] == tok.bos_token_id) == shape.auto_bos
    assert smol_tokenizer.chat_template != tok.chat_template and len(smol_tokenizer) == 49152  # fixture untouched


@pytest.mark.parametrize("conv", ["single", "multi"])
def test_chat_labels_supervise_exactly_the_assistant_turns(shaped, conv):
    shape, tok = shaped
    messages = SINGLE if conv == "single" else MULTI
    prompt, answers, tail = getattr(shape, conv)
    enc = encode(Example("x", messages), tok, template="chat")
    # the text is the hand-written rendering; the ids are prompt ids + final response ids + trailing ids
    assert tok.decode(enc.input_ids) == prompt + answers[-1] + tail
    n_prompt = len(ids_of(tok, prompt))
    assert enc.input_ids == ids_of(tok, prompt) + ids_of(tok, answers[-1]) + ids_of(tok, tail)
    assert enc.labels[n_prompt:] == ids_of(tok, answers[-1]) + [IGN] * len(ids_of(tok, tail))
    # every assistant turn (content + end-of-turn marker) is supervised, nothing else: no header, no
    # system (given or injected), no user text, no whitespace after the marker
    assert runs(tok, enc) == answers
    assert enc.n_supervised == sum(len(ids_of(tok, a)) for a in answers)
    unsupervised = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGN])
    for m in messages:
        assert (m["content"] in unsupervised) == (m["role"] != "assistant")
    # the last supervised token is the family's turn end, and generation stops at it
    assert enc.labels[n_prompt + len(ids_of(tok, answers[-1])) - 1] == tok.convert_tokens_to_ids(shape.marker)
    if shape.bos:  # exactly one BOS, although the tokenizer may add one by itself
        assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    out, stats = encode_all([Example("x", messages)], tok, template="chat")
    assert out[0].labels == enc.labels and stats["n_dropped_no_supervised"] == 0


@pytest.mark.parametrize("conv", ["single", "multi"])
def test_generation_prompt_ends_where_the_answer_starts(shaped, conv):
    shape, tok = shaped
    messages = SINGLE if conv == "single" else MULTI
    prompt, _, _ = getattr(shape, conv)
    ex = Example("x", messages)
    assert generation_prompt(ex, tok, "chat") == prompt
    assert generation_prompt(Example("y", messages[:-1]), tok, "chat") == prompt  # prompt-only example
    p_ids = ids_of(tok, prompt)
    enc = encode(ex, tok, template="chat")
    assert enc.input_ids[:len(p_ids)] == p_ids  # the model trains on exactly what it is prompted with
    assert enc.labels[len(p_ids) - 1] == IGN and enc.labels[len(p_ids)] != IGN


def test_default_system_prompt_is_injected_unsupervised_and_replaced(smol_tokenizer):
    shape = next(s for s in SHAPES if s.name == "qwen")
    tok = build(smol_tokenizer, shape)
    default = "You are Qwerty, a careful assistant."
    injected = encode(Example("d", MULTI), tok)
    text = tok.decode(injected.input_ids)
    assert text.startswith(f"<|im_start|>system\n{default}<|im_end|>\n")
    n_sys = len(ids_of(tok, f"<|im_start|>system\n{default}<|im_end|>\n"))
    assert injected.labels[:n_sys] == [IGN] * n_sys and default not in "".join(runs(tok, injected))
    given = encode(Example("g", SINGLE), tok)
    assert default not in tok.decode(given.input_ids) and "Be brief." in tok.decode(given.input_ids)
    assert runs(tok, given) == ["It is 4.<|im_end|>"]


@pytest.mark.parametrize("mask", ["response", "release"])
def test_plain_template_and_release_mask_with_each_shape(shaped, mask):
    shape, tok = shaped
    ex = Example("p", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "positive"}])
    enc = encode(ex, tok, template="plain", mask=mask)
    bos = shape.bos if shape.auto_bos else ""
    assert tok.decode(enc.input_ids) == bos + "Human: x\nAssistant: positive " + shape.eos
    assert enc.input_ids.count(tok.bos_token_id) == (1 if shape.auto_bos else 0)
    assert generation_prompt(ex, tok, "plain") == "Human: x\nAssistant: "
    n_prompt = len(tok("Human: x\nAssistant: ")["input_ids"])  # with the BOS the tokenizer adds
    if mask == "response":  # the response word merged with the space before it is supervised
        assert runs(tok, enc) == [" positive " + shape.eos]
    else:  # the release masks len(tokenizer(prompt)) positions: the first response token gets no loss
        assert enc.labels[:n_prompt] == [IGN] * n_prompt and runs(tok, enc) == [" " + shape.eos]
    # multi-turn: only the final response; the release mask is the response mask less its first token
    multi = Example("m", [{"role": "system", "content": "S."}] + MULTI)
    resp = encode(multi, tok, template="plain", mask="response")
    assert runs(tok, resp) == [" Six. " + shape.eos]
    if mask == "release":
        rel = encode(multi, tok, template="plain", mask="release")
        first = next(i for i, lab in enumerate(resp.labels) if lab != IGN)
        assert rel.input_ids == resp.input_ids
        assert rel.labels == resp.labels[:first] + [IGN] + resp.labels[first + 1:]
        assert runs(tok, rel) == [". " + shape.eos]


class _Forced:
    """Makes a model's greedy choice follow a script per row (step k: token script[row][k]) by overwriting the
    lm_head's logits, so the real `model.generate` and its stopping run; records the prompts it was given."""

    def __init__(self, model, script):
        self.script, self.step, self.prompts = script, 0, []
        self.handle = model.lm_head.register_forward_hook(self._hook)
        orig = model.generate

        def generate(**kw):
            self.prompts.append((kw["input_ids"].clone(), kw["attention_mask"].clone()))
            try:
                return orig(**kw)
            finally:
                self.handle.remove()
                model.generate = orig

        model.generate = generate

    def _hook(self, module, args, out):
        forced = torch.full_like(out, -1e4)
        for row in range(out.shape[0]):
            forced[row, -1, self.script[row % len(self.script)][self.step]] = 0.0
        self.step += 1
        return forced


def _model(tok, shape):
    model = tiny_llama(len(tok), seed=0)
    cfg = shape.config_eos
    model.generation_config.eos_token_id = (tok.convert_tokens_to_ids(cfg) if isinstance(cfg, str)
                                            else [tok.convert_tokens_to_ids(t) for t in cfg])
    return model


# also with the turn end registered as an added token that is not marked special (as some fine-tunes do), where
# skip_special_tokens would leave it in the text
@pytest.mark.parametrize("shape,special_marker", [(s, True) for s in SHAPES] + [
    (s, False) for s in SHAPES if s.marker != s.eos], ids=IDS + [f"{s.name}-marker-not-special" for s in SHAPES
                                                                  if s.marker != s.eos])
def test_greedy_generation_stops_at_the_familys_turn_end(smol_tokenizer, shape, special_marker):
    tok = build(smol_tokenizer, shape, special_marker=special_marker)
    assert runs(tok, encode(Example("x", SINGLE), tok)) == shape.single[1]  # trained to end with the marker
    model = _model(tok, shape)
    stops = [tok.convert_tokens_to_ids(t) for t in shape.stops]
    assert stop_token_ids(model, tok) == stops
    marker = tok.convert_tokens_to_ids(shape.marker)
    assert marker in stops
    hello, world = ids_of(tok, "Hello")[0], ids_of(tok, " world")[0]
    forced = _Forced(model, [[hello, world, marker, hello, hello], [hello] * 5])
    prompts = [MULTI[:3], "What is 2+2?"]
    out = generate(model, tok, prompts, max_new_tokens=5, batch_size=2, details=True)
    assert out.texts == ["Hello world", "Hello" * 5]
    assert out.truncated == [False, True]
    assert all(shape.marker not in t for t in out.texts)
    # the model was prompted with exactly the generation prompt's ids: one BOS, no special tokens added
    (ids, mask), = forced.prompts
    for row, p in enumerate(prompts):
        conv = p if isinstance(p, list) else [{"role": "user", "content": p}]
        got = ids[row][mask[row].bool()].tolist()
        assert got == ids_of(tok, generation_prompt(Example("g", conv), tok, "chat"))
        if shape.bos:
            assert got.count(tok.bos_token_id) == 1 and got[0] == tok.bos_token_id
    # sampled responses stop at the same token and keep it in their ids, not in their text
    _Forced(model, [[hello, marker, world, world]])
    (s,), = sample_responses(model, tok, ["q"], k=1, max_new_tokens=4)
    assert s.ids == [hello, marker] and s.text == "Hello" and not s.truncated


def test_a_random_tiny_model_favouring_the_stop_token_ends_at_once(smol_tokenizer):
    shape = next(s for s in SHAPES if s.name == "llama3")
    tok = build(smol_tokenizer, shape)
    model = _model(tok, shape)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    with torch.no_grad():  # tied embeddings: raise the output score of <|eot_id|> through a bias on lm_head
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok)))
        model.lm_head.bias[eot] = 1e3
    out = generate(model, tok, ["hi"], max_new_tokens=4, details=True)
    assert out.texts == [""] and out.truncated == [False]


@pytest.mark.parametrize("rows,expected", [
    ([[5, 6, 7]], [True]),         # used the whole budget, no stop
    ([[5, 6, 9]], [False]),        # the config's extra stop token in the last slot
    ([[9, 0, 0]], [False]),        # stopped at once, padded after
    ([[5, 2]], [False]),           # the tokenizer's eos, ended before the budget
    ([[5, 6]], [False]),           # shorter than the budget: every row ended
])
def test_cut_flags_with_several_stop_tokens(rows, expected):
    assert _cut_flags(torch.tensor(rows), [9, 2], max_new_tokens=3) == expected
