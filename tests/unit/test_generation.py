"""Generation stops at the model's own stop tokens (its generation config, e.g. Llama-3's <|eot_id|> or
Gemma-3's <end_of_turn>), not only at the tokenizer's eos: passed to generate, used for the truncation flags
and for cutting sampled responses."""

from types import SimpleNamespace

import torch

from dualselect.generation import generate, sample_responses, stop_token_ids


class _Scripted(torch.nn.Module):
    """A stand-in for a causal LM whose generate() returns fixed new tokens after the prompt, and records the
    keyword arguments it was called with."""

    def __init__(self, new_rows, eos_token_id):
        super().__init__()
        self.new_rows = new_rows
        self.generation_config = SimpleNamespace(eos_token_id=eos_token_id)
        self.calls = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append(kwargs)
        n = input_ids.shape[0] * kwargs.get("num_return_sequences", 1)
        prompt = input_ids.repeat_interleave(kwargs.get("num_return_sequences", 1), dim=0)
        return torch.cat([prompt, torch.tensor(self.new_rows[:n])], dim=1)


def test_stop_token_ids_take_the_generation_config_first():
    tok = SimpleNamespace(eos_token_id=2)
    assert stop_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 2])), tok) == [7, 2]
    assert stop_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=7)), tok) == [7, 2]
    assert stop_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), tok) == [2]
    assert stop_token_ids(SimpleNamespace(), tok) == [2]


def test_greedy_generation_stops_and_flags_with_the_models_stop_tokens(smol_tokenizer):
    eot = smol_tokenizer.convert_tokens_to_ids("<|endoftext|>")  # plays Llama-3's <|eot_id|>
    eos = smol_tokenizer.eos_token_id
    assert eot != eos
    hello = smol_tokenizer("Hello", add_special_tokens=False)["input_ids"][0]
    rows = [[hello, eot, hello], [hello, hello, hello], [hello, eos, eos]]
    model = _Scripted(rows, eos_token_id=[eot, eos])
    out = generate(model, smol_tokenizer, ["a", "b", "c"], max_new_tokens=3, batch_size=3, details=True)
    assert model.calls[0]["eos_token_id"] == [eot, eos]
    # the first row ended at the config's extra stop token: not truncated; the second never stopped
    assert out.truncated == [False, True, False]
    # with only the tokenizer's eos (the old behaviour) the first row would have counted as cut off
    out_old = generate(_Scripted(rows, eos_token_id=None), smol_tokenizer, ["a", "b", "c"], max_new_tokens=3,
                       batch_size=3, details=True)
    assert out_old.truncated == [True, True, False]


def test_sampled_responses_are_cut_after_the_first_stop_token(smol_tokenizer):
    eot = smol_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos = smol_tokenizer.eos_token_id
    hi = smol_tokenizer("Hi", add_special_tokens=False)["input_ids"][0]
    rows = [[hi, eot, hi, hi], [hi, hi, eos, eos]]
    model = _Scripted(rows, eos_token_id=[eot, eos])
    groups = sample_responses(model, smol_tokenizer, ["q"], k=2, max_new_tokens=4)
    assert [s.ids for s in groups[0]] == [[hi, eot], [hi, hi, eos]]
    assert [s.truncated for s in groups[0]] == [False, False]
    assert model.calls[0]["do_sample"] and model.calls[0]["num_return_sequences"] == 2
