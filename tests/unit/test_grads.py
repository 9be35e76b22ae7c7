"""Per-sample gradients equal a naive per-example autograd loop (on a padded batch); the factored engine
equals the loop engine."""

import contextlib

import pytest
import torch

from dualselect.data.formatting import Encoded
from dualselect.grads import FactoredEngine, LoopEngine, batch_losses, flatten, get_engine, set_grads, trainable_params
from dualselect.models import add_lora, tiny_llama


def _samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (n, n_prompt) in enumerate([(9, 4), (14, 10), (5, 1)]):
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        labels = [-100] * n_prompt + ids[n_prompt:]
        out.append(Encoded(id=f"s{i}", input_ids=ids, labels=labels))
    return out


def _lora_model(tiny_model):
    model = add_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    # LoRA B starts at zero, which makes the A gradients zero: perturb so every block is exercised.
    torch.manual_seed(1)
    for p in trainable_params(model):
        p.data.normal_(0, 0.05)
    return model.eval()


def test_loop_engine_matches_naive_autograd_on_padded_batch(tiny_model):
    model = _lora_model(tiny_model)
    params = trainable_params(model)
    batch = _samples()
    got = LoopEngine()(model, batch, torch.device("cpu"))

    losses, tokens = batch_losses(model, batch, pad_id=0, device="cpu")
    for i in range(len(batch)):
        g = torch.autograd.grad(losses[i], params, retain_graph=True)
        ref = flatten(g, params)
        assert ref.abs().max() > 0
        torch.testing.assert_close(got.grads[i], ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.losses, losses.detach(), rtol=1e-5, atol=1e-6)
    assert got.tokens.tolist() == tokens.tolist() == [5, 4, 4]
    # every row differs: the rows are not one gradient copied
    assert not torch.allclose(got.grads[0], got.grads[1])


def test_mean_of_per_sample_grads_is_the_batch_gradient(tiny_model):
    model = _lora_model(tiny_model)
    params = trainable_params(model)
    batch = _samples()
    got = LoopEngine()(model, batch, torch.device("cpu"))
    losses, _ = batch_losses(model, batch, pad_id=0, device="cpu")
    losses.mean().backward()
    torch.testing.assert_close(got.grads.mean(0), flatten([p.grad for p in params], params), rtol=1e-4, atol=1e-7)


def test_set_grads_round_trips(tiny_model):
    model = _lora_model(tiny_model)
    params = trainable_params(model)
    vec = torch.arange(sum(p.numel() for p in params), dtype=torch.float32)
    set_grads(params, vec)
    assert torch.equal(flatten([p.grad for p in params], params), vec)


def test_batch_losses_with_supervised_logits_only_equal_full_logits(tiny_model):
    """batch_losses projects only supervised positions onto the vocabulary: same losses and gradients as
    the full-logits computation (per_sample_nll over every position)."""
    from dualselect.data.formatting import collate
    from dualselect.grads import per_sample_nll, supervised_positions

    model = _lora_model(tiny_model)
    params = trainable_params(model)
    batch = _samples()
    t = collate(batch, 0)
    keep = supervised_positions(t["labels"])
    assert 0 < len(keep) < t["labels"].shape[1] - 1  # some positions are skipped
    full, full_tokens = per_sample_nll(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits,
                                       t["labels"])
    ref = flatten(torch.autograd.grad(full.mean(), params), params)
    losses, tokens = batch_losses(model, batch, pad_id=0, device="cpu")
    got = flatten(torch.autograd.grad(losses.mean(), params), params)
    torch.testing.assert_close(losses, full, rtol=1e-6, atol=1e-7)
    assert tokens.tolist() == full_tokens.tolist()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)


def test_length_groups_is_the_cheapest_contiguous_partition():
    """The dynamic programme against brute force over every partition of the length-sorted samples."""
    import itertools
    import random

    from dualselect.grads import length_groups

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([5, 8, 40, 41, 90, 160]) + rng.randrange(3) for _ in range(rng.randrange(1, 8))]
        overhead = rng.choice([0, 8, 24, 200])

        def cost(groups):
            return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)

        got = length_groups(lengths, overhead)
        assert sorted(i for g in got for i in g) == list(range(len(lengths)))  # a partition
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(got) == best
    assert length_groups([10] * 8) == [list(range(8))]  # equal lengths: one forward
    assert len(length_groups([20] * 7 + [160])) == 2  # one long row apart: 300 padded tokens fewer


def test_length_grouped_losses_equal_one_padded_forward(tiny_model):
    """A batch of very different lengths runs as several forwards on a CPU: the same losses and gradient as one
    padded forward, in the batch's order."""
    model = _lora_model(tiny_model)
    params = trainable_params(model)
    g = torch.Generator().manual_seed(3)
    batch = []
    for i, n in enumerate([12, 150, 9, 148, 11, 10]):
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        batch.append(Encoded(id=f"s{i}", input_ids=ids, labels=[-100] * (n // 2) + ids[n // 2:]))
    from dualselect.grads import length_groups

    assert len(length_groups([len(e.input_ids) for e in batch])) > 1
    one, one_tok = batch_losses(model, batch, pad_id=0, device="cpu", by_length=False)
    ref = flatten(torch.autograd.grad(one.mean(), params), params)
    got, got_tok = batch_losses(model, batch, pad_id=0, device="cpu")
    torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-6)
    assert got_tok.tolist() == one_tok.tolist() == [6, 75, 5, 74, 6, 5]
    torch.testing.assert_close(flatten(torch.autograd.grad(got.mean(), params), params), ref, rtol=1e-4, atol=1e-7)


# -- the factored engine: the same gradients from one padded backward per chunk ---------------------------



def _naive(model, batch, autocast=contextlib.nullcontext):
    """Per-example autograd through one padded batched forward (the same dropout draws as that forward)."""
    params = trainable_params(model)
    losses, _ = batch_losses(model, batch, pad_id=0, device="cpu", autocast=autocast, by_length=False)
    return torch.stack([flatten(torch.autograd.grad(losses[i], params, retain_graph=True), params)
                        for i in range(len(batch))]), losses.detach()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]])
@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_factored_engine_equals_the_loop_engine(smol_tokenizer, targets, chunk):
    """Padding (lengths 5-14 in one chunk), masked prompt tokens, several LoRA targets; .grad is left alone."""
    model = add_lora(tiny_llama(len(smol_tokenizer), seed=0), r=4, alpha=8, dropout=0.0, target_modules=targets)
    torch.manual_seed(1)
    for p in trainable_params(model):
        p.data.normal_(0, 0.05)
    batch = _samples()
    want = LoopEngine()(model, batch, torch.device("cpu"))
    assert isinstance(get_engine("factored"), FactoredEngine)
    got = FactoredEngine(chunk)(model, batch, torch.device("cpu"))
    assert all(p.grad is None for p in trainable_params(model))
    torch.testing.assert_close(got.grads, want.grads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.tokens, want.tokens)
    assert (want.grads.abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("chunk", [2, 8])
def test_factored_engine_in_length_groups_equals_the_loop_engine(tiny_model, chunk):
    """Very different lengths: on a CPU the engine runs several length groups (and chunks of them); every row
    still lands at its own sample."""
    from dualselect.grads import length_groups

    model = _lora_model(tiny_model)
    g = torch.Generator().manual_seed(4)
    batch = []
    for i, n in enumerate([12, 150, 9, 148, 11, 10, 60]):
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        batch.append(Encoded(id=f"s{i}", input_ids=ids, labels=[-100] * (n // 3) + ids[n // 3:]))
    assert len(length_groups([len(e.input_ids) for e in batch])) > 1
    want = LoopEngine()(model, batch, torch.device("cpu"))
    got = FactoredEngine(chunk)(model, batch, torch.device("cpu"))
    torch.testing.assert_close(got.grads, want.grads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.tokens, want.tokens)


def test_factored_engine_with_lora_dropout_is_the_gradient_of_its_own_forward(tiny_model):
    model = add_lora(tiny_model, r=4, alpha=8, dropout=0.3, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    for p in trainable_params(model):
        p.data.normal_(0, 0.05)
    model.train()
    batch = _samples()
    torch.manual_seed(5)
    got = FactoredEngine(chunk=8, by_length=False)(model, batch, torch.device("cpu"))
    torch.manual_seed(5)  # the same dropout draws: one forward over the same padded batch
    want, losses = _naive(model, batch)
    torch.testing.assert_close(got.grads, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.losses, losses, rtol=1e-5, atol=1e-6)


def test_factored_engine_under_bf16_autocast(tiny_model):
    model = _lora_model(tiny_model)
    batch = _samples()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    got = FactoredEngine(chunk=8)(model, batch, torch.device("cpu"), autocast)
    want, _ = _naive(model, batch, autocast)
    rel = (got.grads - want).norm(dim=1) / want.norm(dim=1)
    assert rel.max() < 2e-2  # bf16 rounding of the factors against bf16 weight-gradient matmuls


def test_factored_engine_refuses_non_lora_trainable_parameters(tiny_model):
    model = _lora_model(tiny_model)
    next(p for n, p in model.named_parameters() if "norm" in n).requires_grad_(True)
    with pytest.raises(ValueError, match="every trainable parameter"):
        FactoredEngine()(model, _samples(), torch.device("cpu"))
