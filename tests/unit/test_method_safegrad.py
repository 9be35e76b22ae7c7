"""SafeGrad: the surgered update on real tiny-model steps against a naive recomputation (per-sample
forwards, projection by hand), g_R reuse with ref_every, the KL reference loss, resume, validation."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import dualselect.methods.safegrad  # noqa: F401  (registers it)
from dualselect.config import load_config
from dualselect.data.formatting import encode_all
from dualselect.data.records import Example
from dualselect.errors import DualSelectError
from dualselect.grads import flatten, trainable_params
from dualselect.methods import method_configs
from dualselect.methods.context import TrainContext
from dualselect.methods.safegrad import SafeGrad, SafeGradConfig, reference_batch
from dualselect.models import add_lora
from dualselect.schedule import PlannedStep
from dualselect.train import train


def _example(i, user, answer):
    return Example(i, [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], {})


@pytest.fixture()
def setup(tiny_model, smol_tokenizer):
    task = [_example(f"t{i}", f"What is {i} plus {i + 3}?", str(2 * i + 3)) for i in range(8)]
    refs = [_example(f"r{i}", f"How do I pick lock number {i}?", "I can't help with that.") for i in range(6)]
    task, _ = encode_all(task, smol_tokenizer)
    refs, _ = encode_all(refs, smol_tokenizer)
    model = add_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    for p in trainable_params(model):  # LoRA B = 0 would zero the A gradients: perturb every block
        p.data.normal_(0, 0.05)
    model.eval()
    ctx = TrainContext(model=model, params=trainable_params(model), task=task, reference=refs, engine=None,
                       device=torch.device("cpu"), pad_id=smol_tokenizer.pad_token_id, batch_size=2, epochs=1, seed=0)
    return ctx


def _step(index, ids):
    return PlannedStep(index=index, phase="train", epoch=1, ids=tuple(ids), first_of_epoch=index == 0,
                       last_of_epoch=False)


def _naive_mean_grad(ctx, samples):
    """Mean over samples of each sample's mean response NLL, one unpadded forward per sample."""
    params = ctx.params
    total = None
    for e in samples:
        ids = torch.tensor([e.input_ids])
        logits = ctx.model(input_ids=ids).logits[0, :-1]
        loss = F.cross_entropy(logits, torch.tensor(e.labels[1:]), ignore_index=-100)
        g = flatten(torch.autograd.grad(loss, params, allow_unused=True), params).double()
        total = g if total is None else total + g
    return total / len(samples)


def _update(ctx):
    return flatten([p.grad for p in ctx.params], ctx.params).double()


def test_update_is_the_surgered_task_gradient(setup):
    ctx = setup
    method = SafeGrad(SafeGradConfig(ref_batch_size=2), ctx)
    seen = set()
    for index, ids in enumerate([(0, 1), (2, 3), (4, 5), (6, 7)]):
        for p in ctx.params:
            p.grad = None
        metrics = method.step(_step(index, ids))
        g = _update(ctx)
        g_t = _naive_mean_grad(ctx, [ctx.task[i] for i in ids])
        g_r = _naive_mean_grad(ctx, [ctx.reference[i] for i in reference_batch(6, 2, 0, index)])
        dot = float(g_t @ g_r)
        expected = g_t - dot / float(g_r @ g_r) * g_r if dot < 0 else g_t
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
        assert float(g @ g_r) >= -1e-6 * float(g.norm() * g_r.norm())  # never against g_R
        assert metrics["conflict"] == int(dot < 0)
        if dot < 0:
            assert float(g @ g_r) == pytest.approx(0.0, abs=1e-6 * float(g.norm() * g_r.norm()))
            assert not torch.allclose(g, g_t, rtol=1e-3, atol=1e-6)
        else:
            torch.testing.assert_close(g, g_t, rtol=1e-4, atol=1e-6)  # no conflict: plain task gradient
        assert metrics["trained_samples"] == 2 and metrics["ref_samples"] == 2
        assert metrics["trained_tokens"] == sum(ctx.task[i].n_supervised for i in ids)
        seen.add(dot < 0)
    assert seen == {True, False}  # both branches were exercised on the model


def test_align_weight_adds_the_reference_gradient(setup):
    ctx = setup
    method = SafeGrad(SafeGradConfig(ref_batch_size=3, align_weight=0.5), ctx)
    method.step(_step(0, (6, 7)))
    g_t = _naive_mean_grad(ctx, [ctx.task[i] for i in (6, 7)])
    g_r = _naive_mean_grad(ctx, [ctx.reference[i] for i in reference_batch(6, 3, 0, 0)])
    dot = float(g_t @ g_r)
    proj = g_t - dot / float(g_r @ g_r) * g_r if dot < 0 else g_t
    torch.testing.assert_close(_update(ctx), proj + 0.5 * g_r, rtol=1e-4, atol=1e-6)


def test_reference_batches_cycle_through_seeded_shuffles():
    batches = [reference_batch(5, 2, seed=4, b=b) for b in range(6)]
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1]
    assert sorted(sum(batches[:3], ())) == sorted(sum(batches[3:], ())) == [0, 1, 2, 3, 4]  # each pass: all once
    assert batches == [reference_batch(5, 2, seed=4, b=b) for b in range(6)]
    assert any(reference_batch(5, 2, seed=s, b=0) != batches[0] for s in range(5, 10))
    assert reference_batch(3, 8, seed=0, b=1) and len(reference_batch(3, 8, seed=0, b=1)) == 3


def test_ref_every_reuses_the_last_reference_gradient(setup):
    ctx = setup
    method = SafeGrad(SafeGradConfig(ref_batch_size=2, ref_every=3), ctx)
    refs_used, g_refs = [], []
    for index, ids in enumerate([(6, 7), (0, 1), (2, 3), (4, 5), (6, 7)]):
        for p in ctx.params:
            p.grad = None
        metrics = method.step(_step(index, ids))
        refs_used.append(metrics["ref_samples"])
        g_refs.append(method.g_ref.clone())
        # naive update with the g_R of the last refresh (steps 0 and 3), at the parameters of that refresh
        if index in (0, 3):
            g_r = _naive_mean_grad(ctx, [ctx.reference[i] for i in reference_batch(6, 2, 0, index // 3)])
        g_t = _naive_mean_grad(ctx, [ctx.task[i] for i in ids])
        dot = float(g_t @ g_r)
        expected = g_t - dot / float(g_r @ g_r) * g_r if dot < 0 else g_t
        torch.testing.assert_close(_update(ctx), expected, rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # move the parameters, so a recomputed g_R would differ from the reused one
            for p in ctx.params:
                p -= 0.5 * p.grad
    assert refs_used == [2, 0, 0, 2, 0]
    assert torch.equal(g_refs[0], g_refs[1]) and torch.equal(g_refs[0], g_refs[2])
    assert torch.equal(g_refs[3], g_refs[4]) and not torch.allclose(g_refs[0], g_refs[3])


def test_kl_reference_loss_matches_a_naive_kl_to_the_adapter_off_model(setup):
    ctx = setup
    with torch.no_grad():  # a larger adapter: a KL well above the float noise of padded vs unpadded forwards
        for p in ctx.params:
            p.mul_(4)
    method = SafeGrad(SafeGradConfig(ref_batch_size=2, ref_loss="kl"), ctx)
    batch = [ctx.reference[0], ctx.task[3]]  # different lengths: padding is exercised
    losses, tokens = method._kl_losses(batch)
    for row, e in enumerate(batch):
        ids = torch.tensor([e.input_ids])
        keep = [i for i, lab in enumerate(e.labels[1:]) if lab != -100]
        log_q = F.log_softmax(ctx.model(input_ids=ids).logits[0, :-1][keep], dim=-1)
        with torch.no_grad(), ctx.model.disable_adapter():
            log_p = F.log_softmax(ctx.model(input_ids=ids).logits[0, :-1][keep], dim=-1)
        naive = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # KL(p_base || q), mean over positions
        assert naive.item() > 1e-2
        torch.testing.assert_close(losses[row].detach(), naive.detach(), rtol=1e-4, atol=1e-7)
        assert int(tokens[row]) == len(keep)


def test_kl_reference_gradient_is_zero_for_a_fresh_adapter(tiny_model, smol_tokenizer):
    """A fresh LoRA (B = 0) is the base model: KL is at its minimum, g_R = 0, and the update is g_T."""
    task, _ = encode_all([_example(f"t{i}", f"What is {i} plus 1?", str(i + 1)) for i in range(2)], smol_tokenizer)
    refs, _ = encode_all([_example("r0", "Pick a lock?", "I can't help with that.")], smol_tokenizer)
    model = add_lora(tiny_model, r=4, alpha=8, dropout=0.0).eval()
    ctx = TrainContext(model=model, params=trainable_params(model), task=task, reference=refs, engine=None,
                       device=torch.device("cpu"), pad_id=smol_tokenizer.pad_token_id, batch_size=2, epochs=1, seed=0)
    method = SafeGrad(SafeGradConfig(ref_loss="kl", align_weight=1.0), ctx)
    metrics = method.step(_step(0, (0, 1)))
    assert float(method.g_ref.abs().max()) < 1e-6 and metrics["ref_loss"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(_update(ctx), _naive_mean_grad(ctx, task), rtol=1e-4, atol=1e-6)


def _cfg(model_dir, task, refs, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", f"data.reference={refs}", "data.max_length=64", "train.method=safegrad",
        "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}",
        *extra], method_configs())


def test_same_task_steps_as_sft_and_a_step_log(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "run", "train.epochs=2", "safegrad.ref_batch_size=3",
                     "safegrad.ref_every=2"))
    assert res.steps == 10  # 20 samples / batch 4 x 2 epochs, as SFT
    metrics = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["ref_samples"] for m in metrics] == [3, 0] * 5
    recs = [json.loads(x) for x in (res.run_dir / "selection.jsonl").read_text().splitlines()]
    assert [r["ref_refreshed"] for r in recs] == [True, False] * 5
    assert all(len(r["ref_ids"]) == 3 for r in recs if r["ref_refreshed"])
    assert all((r["dot"] < 0) == r["conflict"] for r in recs)


@pytest.mark.parametrize("loss", ["nll", "kl"])
def test_resumed_run_ends_with_the_same_adapter(loss, tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    # g_R is refreshed on even step indices; the run is cut after the checkpoint of 3 steps, so the
    # resumed run starts at index 3, which reuses the g_R of index 2: it must come from the checkpoint
    extra = ["train.epochs=2", "train.checkpoint_every=3", "model.lora_dropout=0.1", "safegrad.ref_batch_size=3",
             "safegrad.ref_every=2", f"safegrad.ref_loss={loss}", "safegrad.align_weight=0.5"]
    full = train(_cfg(tiny_model_dir, task, refs, tmp_path / "full", *extra))

    def crash(step):
        if step == 4:  # dies after the checkpoint at 3 steps; index 3 reused the g_R of index 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", *extra), on_step=crash)
    resumed = train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", *extra), resume=True)
    a = load_file(str(full.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("metrics.jsonl", "selection.jsonl"):
        strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                           for x in p.read_text().splitlines()]
        assert strip(full.run_dir / name) == strip(resumed.run_dir / name)


@pytest.mark.parametrize("override,match", [
    ("safegrad.ref_batch_size=0", "ref_batch_size must be a positive"),
    ("safegrad.ref_every=0", "ref_every must be a positive"),
    ("safegrad.ref_loss=mse", "ref_loss"),
    ("safegrad.align_weight=-1", "align_weight must be"),
])
def test_bad_options_give_clear_errors(override, match):
    with pytest.raises(DualSelectError, match=match):
        load_config(None, ["train.method=safegrad", override], method_configs())


def test_missing_reference_is_a_clear_error(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    with pytest.raises(DualSelectError, match="safegrad needs a reference pool"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "a", "data.reference=null"))
