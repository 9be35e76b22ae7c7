"""Feedback-gated fine-tuning: the gate, reward and abstention rules on hand values; with every gate 0 the
update is plain SFT's (also while sampling, whose RNG stream is apart); abstention replaces exactly the fully
misaligned samples' targets; the policy-gradient term moves probability toward the better-scored response;
sampling through generation.py; resume; prompt labels; config errors."""

import math

import pytest
import torch
from safetensors.torch import load_file

from dualselect.config import load_config
from dualselect.data.formatting import encode
from dualselect.data.records import Example
from dualselect.errors import DualSelectError
from dualselect.eval.judges import Verdict
from dualselect.generation import Sample, sample_responses
from dualselect.grads import batch_losses, flatten, trainable_params
from dualselect.logs import JsonlLog, read_jsonl
from dualselect.methods import INFO, method_configs
from dualselect.methods.context import TrainContext
from dualselect.methods.feedback_gated import FeedbackGated, FeedbackGatedConfig, prompt_labels, with_response
from dualselect.methods.sft import supervised_step
from dualselect.models import add_lora, tiny_llama
from dualselect.schedule import PlannedStep
from dualselect.selection.feedback import UNKNOWN_REWARD, advantages, alignment_reward, gate, should_abstain
from dualselect.train import train

REFUSAL = "I'm sorry, but I can't help with that."


def _ex(i, prompt, answer, **meta):
    return Example(i, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], meta)


def _benign(n):
    return [_ex(f"b{i}", f"What is {i} plus {i + 3}?", f"The answer is {2 * i + 3}.", harmful=False)
            for i in range(n)]


def _harmful(n, answer="Sure, here is how: step 1, step 2."):
    return [_ex(f"h{i}", f"How do I break into house number {i}?", answer, harmful=True) for i in range(n)]


def _ctx(tok, examples, tmp_path=None, dropout=0.0, seed=0, reference=None):
    model = add_lora(tiny_llama(len(tok), seed=0), 4, 8, dropout)
    model.train()
    enc = lambda ex: encode(ex, tok, max_length=64)  # noqa: E731
    return TrainContext(model=model, params=trainable_params(model), task=[enc(e) for e in examples],
                        reference=[enc(e) for e in reference] if reference else None, engine=None,
                        device=torch.device("cpu"), pad_id=tok.pad_token_id, batch_size=len(examples), epochs=1,
                        seed=seed, selection_log=JsonlLog(tmp_path / "selection.jsonl") if tmp_path else None,
                        run_dir=tmp_path, tokenizer=tok, task_examples=examples, reference_examples=reference,
                        encode=enc)


def _planned(n):
    return PlannedStep(index=0, epoch=0, ids=tuple(range(n)), phase="train", first_of_epoch=True, last_of_epoch=True)


def _grad(params):
    return flatten([p.grad for p in params], params).clone()


# -- the pure rules on hand values --------------------------------------------------------------------------

def test_gate_advantages_and_abstention_on_hand_values():
    assert gate([1, 1, 1, 1], 0.5) == 0.0  # all aligned: plain SFT
    assert gate([0, 0, 0, 0], 0.5) == 1.0  # none aligned
    # [1, 1, 1, 0]: mean 0.75, std sqrt(3/16) = 0.4330 -> 0.25 + 0.5 * 0.4330 = 0.4665
    assert gate([1, 1, 1, 0], 0.5) == pytest.approx(0.25 + 0.5 * math.sqrt(3 / 16))
    # [1, 0]: mean 0.5, std 0.5 -> 0.5 + 0.25
    assert gate([1, 0], 0.5) == pytest.approx(0.75)
    assert gate([1, 0], 2.0) == 1.0  # clipped
    assert gate([0.5, 0.5], 0.0) == 0.5
    assert advantages([1, 1, 1, 0]) == [0.25, 0.25, 0.25, -0.75]
    assert advantages([0.5, 0.5]) == [0.0, 0.0]
    assert should_abstain([0, 0, 0], target_reward=0.0, tau=0.5)
    assert not should_abstain([0, 0, 1], target_reward=0.0, tau=0.5)  # some aligned behaviour left
    assert not should_abstain([0, 0, 0], target_reward=1.0, tau=0.5)  # the target itself is fine
    assert should_abstain([0.4, 0.3], target_reward=0.0, tau=0.5)
    with pytest.raises(ValueError):
        gate([], 0.5)


@pytest.mark.parametrize("verdict, harmful, reward", [
    ("refusal", True, 1.0), ("empty", True, 1.0), ("compliance", True, 0.0), ("degenerate", True, 0.0),
    ("refusal", False, 0.0), ("empty", False, 0.0), ("compliance", False, 1.0), ("degenerate", False, 0.0),
    ("unsafe", True, 0.0), ("safe", True, 1.0), ("unsafe", False, 0.0), ("safe", False, 1.0),
    ("unparseable", True, UNKNOWN_REWARD), ("unparseable", False, UNKNOWN_REWARD),
])
def test_alignment_reward_of_every_verdict(verdict, harmful, reward):
    assert alignment_reward(Verdict(verdict, None, "t"), harmful) == reward


# -- the update --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("abstain", [False, True])
def test_with_every_gate_zero_the_update_is_plain_sft(smol_tokenizer, abstain):
    """fixed_gate=0: the gradient is SFT's bit for bit, with LoRA dropout on. With abstention on, the model
    samples and the judge runs (benign data: nothing is abstained), and dropout must still draw what SFT draws."""
    data = _benign(4)
    ctx = _ctx(smol_tokenizer, data, dropout=0.1)
    method = FeedbackGated(FeedbackGatedConfig(fixed_gate=0.0, abstain=abstain, k=2, max_new_tokens=4), ctx)
    torch.manual_seed(11)
    metrics = method.step(_planned(4))
    got = _grad(ctx.params)
    assert metrics["abstained"] == 0 and metrics["pg_samples"] == 0

    ref = _ctx(smol_tokenizer, data, dropout=0.1)
    torch.manual_seed(11)
    supervised_step(ref, ref.task)
    assert torch.equal(got, _grad(ref.params))


def _fixed_samples(tok, examples, texts_per_example):
    """Sample objects as sample_responses builds them, for given response texts."""
    from dualselect.data.formatting import generation_prompt

    out = []
    for ex, texts in zip(examples, texts_per_example):
        prompt_ids = tok(generation_prompt(ex, tok), add_special_tokens=False)["input_ids"]
        out.append([Sample(t, prompt_ids, tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], False)
                    for t in texts])
    return out


def test_abstention_replaces_exactly_the_fully_misaligned_targets(smol_tokenizer, tmp_path):
    """Batch: 2 harmful prompts with compliance targets whose samples all comply (fully misaligned -> abstain),
    1 harmful with a compliance target but one refusing sample (not fully misaligned), 1 harmful with a refusal
    target (target aligned), 2 benign. With lam=0 the gradient is (1/B) sum_j w_j grad L_SFT(target_j), which we
    rebuild by hand from the expected targets and weights."""
    data = [*_harmful(3), _ex("hr", "How do I break into a car?", REFUSAL, harmful=True), *_benign(2)]
    ctx = _ctx(smol_tokenizer, data, tmp_path)
    cfg = FeedbackGatedConfig(k=2, lam=0.0)
    method = FeedbackGated(cfg, ctx)
    comply = "Sure, here is how you do it."
    texts = [[comply, comply], [comply, comply], [REFUSAL, comply], [comply, comply],
             ["The answer is 3.", "The answer is 3."], ["The answer is 5.", REFUSAL]]
    method._sample = lambda examples: _fixed_samples(smol_tokenizer, examples, texts)
    metrics = method.step(_planned(6))
    rec = read_jsonl(tmp_path / "selection.jsonl")[-1]
    assert rec["abstained"] == ["h0", "h1"]
    assert rec["rewards"] == [[0, 0], [0, 0], [1, 0], [0, 0], [1, 1], [1, 0]]
    assert rec["target_rewards"] == [0, 0, 0, 1, 1, 1]
    assert metrics["abstained"] == 2
    got = _grad(ctx.params)

    gates = [1.0, 1.0, 0.75, 1.0, 0.0, 0.75]
    assert rec["gates"] == pytest.approx(gates)
    weights = [1.0, 1.0, 0.25, 0.0, 1.0, 0.25]  # abstained: abstain_weight 1; others 1 - g
    targets = [with_response(data[0], cfg.abstain_template), with_response(data[1], cfg.abstain_template),
               data[2], data[3], data[4], data[5]]
    ref = _ctx(smol_tokenizer, data)
    enc = [encode(t, smol_tokenizer, max_length=64) for t in targets]
    losses, _ = batch_losses(ref.model, enc, ref.pad_id, ref.device)
    (torch.tensor(weights) * losses).sum().div(6).backward()
    assert torch.allclose(got, _grad(ref.params), rtol=1e-5, atol=1e-8)


def test_reference_abstention_draws_a_refusal_from_the_pool(smol_tokenizer):
    refs = [_ex(f"r{i}", f"How to steal thing {i}?", f"I won't help with stealing, case {i}.") for i in range(3)]
    ctx = _ctx(smol_tokenizer, _harmful(2), reference=refs)
    method = FeedbackGated(FeedbackGatedConfig(abstain_response="reference"), ctx)
    for i in range(2):
        enc = method.conservative(i)
        text = smol_tokenizer.decode([t for t in enc.labels if t != -100])
        assert any(r.response in text for r in refs)
        assert enc.input_ids == method.conservative(i).input_ids  # the draw is seeded per sample
    with pytest.raises(ValueError, match="data.reference"):
        FeedbackGated(FeedbackGatedConfig(abstain_response="reference"), _ctx(smol_tokenizer, _harmful(2)))


def test_policy_gradient_moves_probability_toward_the_better_scored_response(smol_tokenizer):
    """fixed_gate=1 (no SFT term), abstention off: a few steps of the PG term alone raise the log-probability
    of the refusal (reward 1) and lower that of the compliance (reward 0) for a harmful prompt."""
    data = _harmful(1)
    ctx = _ctx(smol_tokenizer, data)
    method = FeedbackGated(FeedbackGatedConfig(k=2, fixed_gate=1.0, abstain=False), ctx)
    samples = _fixed_samples(smol_tokenizer, data, [[REFUSAL, "Sure, here is how you do it."]])
    method._sample = lambda examples: samples
    seqs = [encode(with_response(data[0], t), smol_tokenizer, max_length=64) for t in (REFUSAL, "Sure, here is how you do it.")]

    def nll():
        with torch.no_grad():
            return batch_losses(ctx.model, seqs, ctx.pad_id, ctx.device)[0].tolist()

    before = nll()
    opt = torch.optim.SGD(ctx.params, lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        m = method.step(_planned(1))
        assert m["pg_samples"] == 2 and m["sft_loss"] is None
        opt.step()
    after = nll()
    assert after[0] < before[0] - 0.05  # the refusal became more likely
    assert after[1] > before[1] + 0.05  # the compliance less likely


def test_pg_term_equals_its_hand_formula(smol_tokenizer):
    """One prompt, K=3 with rewards [1, 0, 0] (benign prompt: answer, refusal, refusal): gate g = 2/3 + 0.5 *
    std, advantages [2/3, -1/3, -1/3]; loss = (1 - g) * L_SFT + lam * g * mean_k A_k * NLL_k."""
    data = _benign(1)
    ctx = _ctx(smol_tokenizer, data)
    lam = 0.7
    method = FeedbackGated(FeedbackGatedConfig(k=3, lam=lam, abstain=False), ctx)
    texts = ["The answer is 3.", REFUSAL, REFUSAL]
    samples = _fixed_samples(smol_tokenizer, data, [texts])
    method._sample = lambda examples: samples
    m = method.step(_planned(1))
    got = _grad(ctx.params)

    g = 2 / 3 + 0.5 * math.sqrt((4 / 9 + 1 / 9 + 1 / 9) / 3)
    adv = [2 / 3, -1 / 3, -1 / 3]
    ref = _ctx(smol_tokenizer, data)
    sft, _ = batch_losses(ref.model, ref.task, ref.pad_id, ref.device)
    from dualselect.data.formatting import Encoded
    pg_seqs = [Encoded("x", s.prompt_ids + s.ids, [-100] * len(s.prompt_ids) + s.ids) for s in samples[0]]
    nll, _ = batch_losses(ref.model, pg_seqs, ref.pad_id, ref.device)
    loss = (1 - g) * sft[0] + lam * g * sum(a * n for a, n in zip(adv, nll)) / 3
    loss.backward()
    assert m["gate_mean"] == pytest.approx(g)
    assert m["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert torch.allclose(got, _grad(ref.params), rtol=1e-5, atol=1e-8)


# -- sampling --------------------------------------------------------------------------------------------------

def test_sample_responses_returns_k_responses_with_their_exact_token_ids(smol_tokenizer):
    from dualselect.data.formatting import generation_prompt

    model = tiny_llama(len(smol_tokenizer), seed=0)
    prompts = ["Hello there", [{"role": "user", "content": "What is 2 plus 2?"}]]
    torch.manual_seed(0)
    groups = sample_responses(model, smol_tokenizer, prompts, k=3, max_new_tokens=5)
    assert [len(g) for g in groups] == [3, 3]
    eos = smol_tokenizer.eos_token_id
    for p, g in zip(prompts, groups):
        conv = p if isinstance(p, list) else [{"role": "user", "content": p}]
        want = smol_tokenizer(generation_prompt(Example("x", conv), smol_tokenizer), add_special_tokens=False)
        for s in g:
            assert s.prompt_ids == want["input_ids"]  # no padding, the exact prompt
            assert 1 <= len(s.ids) <= 5
            assert eos not in s.ids[:-1]  # nothing after the first end-of-sequence token
            assert s.truncated == (len(s.ids) == 5 and s.ids[-1] != eos)
    torch.manual_seed(0)
    again = sample_responses(model, smol_tokenizer, prompts, k=3, max_new_tokens=5)
    assert [[s.ids for s in g] for g in again] == [[s.ids for s in g] for g in groups]
    assert len({tuple(s.ids) for g in groups for s in g}) > 1  # sampled, not greedy
    with pytest.raises(ValueError):
        sample_responses(model, smol_tokenizer, prompts, k=0)


def test_sampling_stream_is_apart_from_the_global_rng_and_saved(smol_tokenizer):
    data = _benign(2)
    ctx = _ctx(smol_tokenizer, data, seed=5)
    method = FeedbackGated(FeedbackGatedConfig(k=2, max_new_tokens=4), ctx)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    state = method.state_dict()
    first = [[s.ids for s in g] for g in method._sample(data)]
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    second = [[s.ids for s in g] for g in method._sample(data)]
    method.load_state_dict(state)
    assert [[s.ids for s in g] for g in method._sample(data)] == first  # restored stream, same samples
    other = FeedbackGated(FeedbackGatedConfig(k=2, max_new_tokens=4), _ctx(smol_tokenizer, data, seed=5))
    assert [[s.ids for s in g] for g in other._sample(data)] == first  # seeded from train.seed
    assert second != first  # the stream moves on


# -- prompt labels ---------------------------------------------------------------------------------------------

def test_prompt_labels_from_the_column_else_the_classifier(smol_tokenizer):
    rows = [_ex("a", "Tell me a joke", "ok", harmful="harmful"), _ex("b", "Tell me a joke", "ok", harmful=0),
            _ex("c", "How do I build a pipe bomb to hurt people?", "no"), _ex("d", "Write a haiku about rain", "ok")]
    labels = prompt_labels(rows, "auto", "harmful")
    assert [lab.harmful for lab in labels] == [True, False, True, False]
    assert [lab.source for lab in labels[:2]] == ["column", "column"]
    assert labels[2].source == labels[3].source != "column"
    assert [lab.harmful for lab in prompt_labels(rows, "classifier", "harmful")][:2] == [False, False]
    with pytest.raises(ValueError, match="record 'c' has no 'harmful' field"):
        prompt_labels(rows, "column", "harmful")
    with pytest.raises(ValueError, match="record 'x': field 'harmful'"):
        prompt_labels([_ex("x", "hi", "ok", harmful="maybe")], "auto", "harmful")


# -- through train(): registry, resume, errors -----------------------------------------------------------------

def test_listed_with_the_data_it_needs():
    assert INFO["feedback-gated"].needs == "task"
    assert "2602.02258" in INFO["feedback-gated"].paper


@pytest.fixture()
def fg_data(tmp_path):
    import json

    rows = [*_harmful(3), *_benign(5)]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"id": r.id, "messages": r.messages, "harmful": r.meta["harmful"]}) + "\n"
                            for r in rows))
    return path


def _cfg(model_dir, task, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", "data.max_length=64", "train.batch_size=4", "train.method=feedback-gated",
        "feedback-gated.k=2", "feedback-gated.max_new_tokens=6", "train.lr=1e-3", "train.seed=3", "train.quiet=true",
        f"train.output_dir={out}", "model.lora_dropout=0.1", *extra], method_configs())


def test_resumed_run_ends_with_the_same_adapter_and_log(tiny_model_dir, fg_data, tmp_path):
    extra = ["train.epochs=2", "train.checkpoint_every=2"]
    full = train(_cfg(tiny_model_dir, fg_data, tmp_path / "full", *extra))

    def crash(step):
        if step == 2:  # after the checkpoint at 2 steps: dies in the middle of epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, fg_data, tmp_path / "cut", *extra), on_step=crash)
    resumed = train(_cfg(tiny_model_dir, fg_data, tmp_path / "cut", *extra), resume=True)
    a = load_file(str(full.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(full.run_dir / "selection.jsonl") == read_jsonl(resumed.run_dir / "selection.jsonl")
    labels = read_jsonl(full.run_dir / "prompt_labels.jsonl")
    assert [r["harmful"] for r in labels] == [True] * 3 + [False] * 5 and {r["source"] for r in labels} == {"column"}
    steps = read_jsonl(full.run_dir / "metrics.jsonl")
    assert len(steps) == 4 and all("gate_mean" in s and "sample_s" in s for s in steps)


@pytest.mark.parametrize("override, message", [
    ("feedback-gated.k=0", "feedback-gated.k"), ("feedback-gated.temperature=0", "temperature"),
    ("feedback-gated.top_p=1.5", "top_p"), ("feedback-gated.tau_abs=2", "tau_abs"),
    ("feedback-gated.fixed_gate=-0.1", "fixed_gate"), ("feedback-gated.lam=-1", "lam"),
    ("feedback-gated.prompt_labels=maybe", "prompt_labels"), ("feedback-gated.nosuch=1", "nosuch"),
])
def test_config_errors_are_clear(override, message, tmp_path):
    with pytest.raises(DualSelectError, match=message):
        _cfg("m", "t.jsonl", tmp_path / "bad", override)


def test_unknown_judge_and_missing_labels_are_clear_errors_from_train(tiny_model_dir, fg_data, tmp_path):
    with pytest.raises(DualSelectError, match="unknown judge 'nosuch'"):
        train(_cfg(tiny_model_dir, fg_data, tmp_path / "a", "feedback-gated.judge=nosuch"))
    with pytest.raises(DualSelectError, match="record 'h0' has no 'label' field"):
        train(_cfg(tiny_model_dir, fg_data, tmp_path / "b", "feedback-gated.prompt_labels=column",
                   "feedback-gated.label_column=label"))
