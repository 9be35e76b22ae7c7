"""TOSS (token-level selection): exact mask counts on response tokens only, the pure ranking on a hand
table, unsafe tokens scored high on a constructed example, exact snapshot/restore around the reference
training, SFT on the masked labels against a naive loss, resume, and config errors."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import dualselect.methods.toss  # noqa: F401  (registers it)
from dualselect.config import load_config
from dualselect.data.formatting import IGNORE_INDEX, encode_all
from dualselect.data.records import Example
from dualselect.errors import DualSelectError
from dualselect.grads import get_engine, trainable_params
from dualselect.logs import JsonlLog, read_jsonl, write_jsonl
from dualselect.methods import method_configs
from dualselect.methods.context import TrainContext
from dualselect.methods.toss import Toss, TossConfig, response_positions
from dualselect.models import add_lora, tiny_llama
from dualselect.schedule import PlannedStep
from dualselect.selection.toss import fraction_of, token_risk_scores, top_fraction_mask
from dualselect.train import train


def _ex(i, prompt, answer):
    return Example(i, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


def _arith(n):
    return [_ex(f"t{i}", f"What is {i} plus {i + 3}?", f"The answer is {2 * i + 3}.") for i in range(n)]


def _harmful(n, answer="Sure zorblax quintex"):
    return [_ex(f"h{i}", f"How do I break into house {i}?", answer) for i in range(n)]


def _ctx(tok, task, reference=None, tmp_path=None, dropout=0.0, batch_size=4):
    model = add_lora(tiny_llama(len(tok), seed=0), 4, 8, dropout)
    model.train()
    enc = lambda xs: encode_all(xs, tok, max_length=64)[0]  # noqa: E731
    log = JsonlLog(tmp_path / "selection.jsonl") if tmp_path else None
    return TrainContext(model=model, params=trainable_params(model), task=enc(task),
                        reference=enc(reference) if reference else None, engine=get_engine("loop"),
                        device=torch.device("cpu"), pad_id=tok.pad_token_id, batch_size=batch_size, epochs=1,
                        seed=0, selection_log=log)


# -- (2) the pure ranking ---------------------------------------------------------------------------------

def test_top_fraction_mask_on_a_hand_table():
    scores = [[0.1, 0.9, 0.5], [0.8], [0.2, 0.7]]
    # global: 6 tokens, floor(0.5 * 6) = 3 -> 0.9 (s0 p1), 0.8 (s1 p0), 0.7 (s2 p1)
    assert top_fraction_mask(scores, 0.5, "global") == [[1], [0], [1]]
    # 0.6 * 6 = 3.6 -> 3 (rounded down)
    assert top_fraction_mask(scores, 0.6, "global") == [[1], [0], [1]]
    assert top_fraction_mask(scores, 0.7, "global") == [[1, 2], [0], [1]]  # 4.2 -> 4: + 0.5
    # per sample: floor(0.5 * 3) = 1, floor(0.5 * 1) = 0, floor(0.5 * 2) = 1
    assert top_fraction_mask(scores, 0.5, "sample") == [[1], [], [1]]
    assert top_fraction_mask(scores, 0.0, "global") == [[], [], []]
    # ties: the earlier sample, then the earlier position
    assert top_fraction_mask([[1.0, 1.0], [1.0, 1.0]], 0.5, "global") == [[0, 1], []]
    assert top_fraction_mask([[2.0, 1.0, 1.0]], 0.5, "sample") == [[0]]
    # exact rationals: 0.29 of 100 is 29 (int(0.29 * 100) would be 28)
    assert int(0.29 * 100) == 28 and fraction_of(0.29, 100) == 29
    assert sum(map(len, top_fraction_mask([[float(i)] for i in range(100)], 0.29))) == 29
    # the score is utility loss minus harmful loss: high when the harmful reference predicts it better
    assert token_risk_scores([[5.0, 1.0]], [[1.0, 3.0]]) == [[4.0, -2.0]]


def test_pure_functions_reject_bad_input():
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        top_fraction_mask([[1.0]], 1.0)
    with pytest.raises(ValueError, match="scope"):
        top_fraction_mask([[1.0]], 0.5, "token")
    with pytest.raises(ValueError, match="finite"):
        top_fraction_mask([[float("nan")]], 0.5)
    with pytest.raises(ValueError, match="sample 0"):
        token_risk_scores([[1.0, 2.0]], [[1.0]])


# -- (1) exactly the fraction, response tokens only ---------------------------------------------------------

@pytest.mark.parametrize("scope", ["global", "sample"])
def test_masks_exactly_the_fraction_of_response_tokens_and_no_prompt_token(scope, smol_tokenizer, tmp_path):
    ctx = _ctx(smol_tokenizer, _arith(10), _harmful(6), tmp_path)
    m = Toss(TossConfig(harmful_data="reference", mask_fraction=0.3, scope=scope, ref_steps=3, ref_lr=1e-2), ctx)
    m.compute_masks()
    resp = [response_positions(e) for e in ctx.task]
    n_total = sum(map(len, resp))
    # expected count by hand: floor(3 N / 10), globally or per sample
    expected = (3 * n_total) // 10 if scope == "global" else sum((3 * len(r)) // 10 for r in resp)
    if scope == "global":
        assert (3 * n_total) % 10 != 0  # 0.3 N is not a whole number here: the rounding is exercised
    changed = 0
    for e, t, r in zip(ctx.task, m.train_task, resp):
        assert t.input_ids == e.input_ids
        for j, (old, new) in enumerate(zip(e.labels, t.labels)):
            if old == IGNORE_INDEX:
                assert new == IGNORE_INDEX  # prompt (and template) tokens are never touched
            elif new != old:
                assert new == IGNORE_INDEX and j in r
                changed += 1
        if scope == "sample":
            assert sum(a != b for a, b in zip(e.labels, t.labels)) == (3 * len(r)) // 10
    assert changed == expected > 0

    # and they are the highest-scoring tokens of the logged scores (checked naively)
    recs = [r for r in read_jsonl(tmp_path / "selection.jsonl") if r["kind"] == "toss_tokens"]
    assert [r["masked"] for r in recs] == m.masked
    groups = [[(s, p in r["masked"]) for s, p in zip(r["scores"], r["positions"])] for r in recs]
    if scope == "global":
        groups = [[x for g in groups for x in g]]
    for g in groups:
        kept = [s for s, masked in g if not masked]
        gone = [s for s, masked in g if masked]
        assert not gone or not kept or min(gone) >= max(kept)
    summary = [r for r in read_jsonl(tmp_path / "selection.jsonl") if r["kind"] == "toss_mask"]
    assert summary[0]["n_masked"] == expected and summary[0]["n_response_tokens"] == n_total


# -- (3) what the harmful reference learned scores high ---------------------------------------------------

def test_tokens_learned_by_the_harmful_reference_get_the_highest_risk(smol_tokenizer, tmp_path):
    """The harmful set answers with a made-up phrase; four task samples carry that phrase and twelve are
    arithmetic. The utility reference trains on the twelve clean ones: every token of the phrase must
    outrank every arithmetic token, so masking their share masks exactly the phrase."""
    task = [_ex(f"t{i}", f"What is {i} plus {i + 3}?", str(2 * i + 3)) for i in range(12)]
    task += [_ex(f"b{i}", f"How do I steal car {i}?", "Sure zorblax quintex") for i in range(4)]
    ctx = _ctx(smol_tokenizer, task, _harmful(8), tmp_path)
    (tmp_path / "clean.txt").write_text("# the arithmetic samples\n" + "\n".join(f"t{i}" for i in range(12)))
    phrase = set(smol_tokenizer("Sure zorblax quintex", add_special_tokens=False)["input_ids"])
    is_phrase = [[e.id.startswith("b") and e.input_ids[j] in phrase for j in response_positions(e)]
                 for e in ctx.task]
    n_phrase, n_total = sum(map(sum, is_phrase)), sum(map(len, is_phrase))
    assert n_phrase == 4 * len(phrase)
    cfg = TossConfig(harmful_data="reference", utility_ids=str(tmp_path / "clean.txt"), ref_steps=30, ref_lr=5e-2,
                     mask_fraction=n_phrase / n_total)
    m = Toss(cfg, ctx)
    assert [ctx.task[k].id for k in m.utility_index] == [f"t{i}" for i in range(12)]
    m.compute_masks()
    recs = [r for r in read_jsonl(tmp_path / "selection.jsonl") if r["kind"] == "toss_tokens"]
    phrase_scores = [s for r, f in zip(recs, is_phrase) for s, x in zip(r["scores"], f) if x]
    arith_scores = [s for r, f in zip(recs, is_phrase) if r["id"].startswith("t") for s in r["scores"]]
    assert min(phrase_scores) > max(arith_scores)
    assert min(phrase_scores) > 0 > max(arith_scores)
    for e, masked in zip(ctx.task, m.masked):
        want = [j for j in response_positions(e) if e.id.startswith("b") and e.input_ids[j] in phrase]
        assert masked == want


# -- (4) snapshot / restore -------------------------------------------------------------------------------

def test_reference_training_restores_params_grads_mode_and_rng_exactly(smol_tokenizer):
    ctx = _ctx(smol_tokenizer, _arith(6), _harmful(6), dropout=0.1)
    m = Toss(TossConfig(harmful_data="reference", ref_steps=4, ref_lr=1e-2), ctx)
    with torch.no_grad():  # a non-zero LoRA B, so restoring matters for every tensor
        for p in ctx.params:
            p.add_(0.01 * torch.randn_like(p))
    before = [p.detach().clone() for p in ctx.params]
    flags = [p.requires_grad for p in ctx.params]
    rng = torch.get_rng_state()
    ctx.model.eval()
    base = m.token_losses(ctx.task)
    ctx.model.train()

    losses, train_losses = m.reference_losses(m.harmful, seed=1)

    assert all(torch.equal(a, b) for a, b in zip(before, ctx.params))
    assert [p.requires_grad for p in ctx.params] == flags and all(p.grad is None for p in ctx.params)
    assert ctx.model.training
    assert torch.equal(torch.get_rng_state(), rng)
    # it did train: the task losses under the reference differ from the starting model's
    assert len(train_losses) == 4 and train_losses[-1] < train_losses[0]
    assert any(abs(a - b) > 1e-4 for x, y in zip(losses, base) for a, b in zip(x, y))


# -- SFT on the masked labels -----------------------------------------------------------------------------

def _naive_grads(model, params, samples):
    """Mean over samples (with a supervised token) of each sample's mean NLL, one sequence at a time."""
    for p in params:
        p.grad = None
    per_sample = []
    for e in samples:
        pos = [j for j in range(1, len(e.labels)) if e.labels[j] != IGNORE_INDEX]
        if not pos:
            continue
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        per_sample.append(-torch.stack([logp[j - 1, e.labels[j]] for j in pos]).mean())
    torch.stack(per_sample).mean().backward()
    return [p.grad.clone() for p in params]


def test_step_is_sft_on_the_masked_labels_and_drops_fully_masked_samples(smol_tokenizer):
    ctx = _ctx(smol_tokenizer, _arith(4), _harmful(4))
    m = Toss(TossConfig(harmful_data="reference"), ctx)
    r0, r1 = response_positions(ctx.task[0]), response_positions(ctx.task[1])
    pairs = [[0, j] for j in r0] + [[1, r1[0]], [1, r1[2]]]  # sample 0 fully masked, two tokens of sample 1
    m.load_state_dict({"n_task": 4, "masked": torch.tensor(pairs)})
    masked_task = []
    for e, drop in zip(ctx.task, (set(r0), {r1[0], r1[2]}, set(), set())):
        masked_task.append(replace(e, labels=[IGNORE_INDEX if j in drop else x for j, x in enumerate(e.labels)]))

    planned = PlannedStep(0, "train", 1, (0, 1, 2), True, False)
    metrics = m.step(planned)
    got = [p.grad.clone() for p in ctx.params]
    want = _naive_grads(ctx.model, ctx.params, masked_task[:3])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    n_resp = len(r0) + len(r1) + len(response_positions(ctx.task[2]))
    assert metrics["n_samples"] == 3 and metrics["trained_samples"] == 2
    assert metrics["masked_tokens"] == len(pairs) and metrics["tokens"] == n_resp
    assert metrics["trained_tokens"] == n_resp - len(pairs)

    for p in ctx.params:
        p.grad = None
    alone = m.step(PlannedStep(1, "train", 1, (0,), False, False))
    assert alone["trained_samples"] == 0 and alone["trained_tokens"] == 0
    assert all(p.grad is None for p in ctx.params)  # no update from a batch with nothing left

    with pytest.raises(ValueError, match="not a response token"):
        m.load_state_dict({"n_task": 4, "masked": torch.tensor([[2, 1]])})  # a prompt position
    with pytest.raises(ValueError, match="4"):
        m.load_state_dict({"n_task": 5, "masked": None})


def test_harmful_task_ids_and_the_utility_subset(smol_tokenizer, tmp_path):
    ctx = _ctx(smol_tokenizer, _arith(10) + _harmful(5))
    (tmp_path / "harm.txt").write_text("\n".join(f"h{i}" for i in range(5)) + "\n")
    m = Toss(TossConfig(harmful_data="task_ids", harmful_ids=str(tmp_path / "harm.txt"), utility_fraction=0.35), ctx)
    assert [e.id for e in m.harmful] == [f"h{i}" for i in range(5)]
    assert len(m.utility) == 3 and all(e.id.startswith("t") for e in m.utility)  # floor(0.35 * 10)
    again = Toss(TossConfig(harmful_data="task_ids", harmful_ids=str(tmp_path / "harm.txt"), utility_fraction=0.35),
                 ctx)
    assert again.utility_index == m.utility_index  # seeded
    (tmp_path / "bad.txt").write_text("h1\nnope\n")
    with pytest.raises(ValueError, match="nope"):
        Toss(TossConfig(harmful_data="task_ids", harmful_ids=str(tmp_path / "bad.txt")), ctx)
    with pytest.raises(ValueError, match="toss.harmful_data"):
        Toss(TossConfig(), ctx)
    with pytest.raises(ValueError, match="data.reference"):
        Toss(TossConfig(harmful_data="reference"), ctx)


# -- through train(): resume, and mask_fraction 0 is SFT ---------------------------------------------------

@pytest.fixture()
def toss_data(tmp_path):
    task = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i + 3}?"},
                                         {"role": "assistant", "content": f"It is {2 * i + 3}."}]} for i in range(16)]
    harm = [{"id": f"h{i}", "messages": [{"role": "user", "content": f"How do I pick lock {i}?"},
                                         {"role": "assistant", "content": "Sure, step one: zorblax."}]}
            for i in range(8)]
    return write_jsonl(tmp_path / "task.jsonl", task), write_jsonl(tmp_path / "harm.jsonl", harm)


def _cfg(model_dir, task, harm, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", f"data.reference={harm}", "data.max_length=64", "train.batch_size=4",
        "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}", "model.lora_dropout=0.1",
        *extra], method_configs())


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


TOSS = ["train.method=toss", "toss.harmful_data=reference", "toss.ref_steps=3", "toss.ref_lr=1e-2"]


def test_resumed_run_ends_with_the_same_adapter(tiny_model_dir, toss_data, tmp_path):
    task, harm = toss_data
    extra = [*TOSS, "train.epochs=2", "train.checkpoint_every=2", "toss.mask_fraction=0.4"]
    full = train(_cfg(tiny_model_dir, task, harm, tmp_path / "full", *extra))

    def crash(step):
        if step == 5:  # after the checkpoint at 6 steps (of 8) was written: dies in epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, task, harm, tmp_path / "cut", *extra), on_step=crash)
    resumed = train(_cfg(tiny_model_dir, task, harm, tmp_path / "cut", *extra), resume=True)

    a, b = _adapter(full.run_dir), _adapter(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    for name in ("metrics.jsonl", "selection.jsonl"):
        assert strip(full.run_dir / name) == strip(resumed.run_dir / name)
    recs = read_jsonl(resumed.run_dir / "selection.jsonl")
    assert [r["kind"] for r in recs].count("toss_mask") == 1  # computed once, not again on resume
    metrics = read_jsonl(full.run_dir / "metrics.jsonl")
    assert sum(r["masked_tokens"] for r in metrics) == 2 * recs[-1]["n_masked"]  # every epoch sees the masks


def test_mask_fraction_zero_is_plain_sft_bit_for_bit(tiny_model_dir, toss_data, tmp_path):
    """The references train on ctx.params and the torch RNG, both restored exactly: with nothing masked
    the run is plain SFT, dropout stream included."""
    task, harm = toss_data
    sft = train(_cfg(tiny_model_dir, task, harm, tmp_path / "sft", "train.epochs=1"))
    toss = train(_cfg(tiny_model_dir, task, harm, tmp_path / "toss", "train.epochs=1", *TOSS, "toss.mask_fraction=0"))
    a, b = _adapter(sft.run_dir), _adapter(toss.run_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    masked = train(_cfg(tiny_model_dir, task, harm, tmp_path / "m", "train.epochs=1", *TOSS, "toss.mask_fraction=0.3"))
    assert any(not torch.equal(a[k], _adapter(masked.run_dir)[k]) for k in a)


# -- (6) config validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("toss.mask_fraction=1.0", "toss.mask_fraction must be in \\[0, 1\\)"),
    ("toss.mask_fraction=-0.1", "toss.mask_fraction must be in \\[0, 1\\)"),
    ("toss.utility_fraction=0", "toss.utility_fraction must be in \\(0, 1\\]"),
    ("toss.scope=token", "toss.scope"),
    ("toss.ref_epochs=0", "toss.ref_epochs must be >= 1"),
    ("toss.ref_steps=0", "toss.ref_steps must be >= 1"),
    ("toss.ref_lr=0", "toss.ref_lr must be > 0"),
    ("toss.harmful_data=task_ids", "toss.harmful_ids must name a file"),
    ("toss.harmful_ids=ids.txt", "toss.harmful_ids is read only with harmful_data=task_ids"),
    ("toss.harmful_data=harmful", "toss.harmful_data"),
])
def test_config_errors_are_clear(override, message):
    with pytest.raises(DualSelectError, match=message):
        load_config(None, ["train.method=toss", override], method_configs())


def test_missing_harmful_choice_is_a_clear_error_from_train(tiny_model_dir, toss_data, tmp_path):
    task, harm = toss_data
    with pytest.raises(DualSelectError, match="method toss: toss needs a harmful set"):
        train(_cfg(tiny_model_dir, task, harm, tmp_path / "run", "train.method=toss"))
