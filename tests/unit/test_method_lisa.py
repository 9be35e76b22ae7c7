"""Lisa (bi-state optimisation + proximal term) on a tiny random Llama: the proximal gradient against a
hand computation, the state schedule against SFT's plan, the anchor against weights snapshotted by an
independent loop, resume equality, and clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

import dualselect.methods.lisa  # noqa: F401  (registers it)
from dualselect.config import load_config
from dualselect.data.formatting import encode_all
from dualselect.data.records import load_examples
from dualselect.errors import DualSelectError
from dualselect.grads import batch_losses, get_engine, trainable_params
from dualselect.methods import METHODS, method_configs
from dualselect.methods.context import TrainContext
from dualselect.methods.lisa import Lisa, LisaConfig
from dualselect.models import add_lora
from dualselect.schedule import PlannedStep, batch_plan
from dualselect.selection.lisa import alignment_batches, bistate_plan, switch_steps
from dualselect.train import train


def _cfg(model_dir, task, refs, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", f"data.reference={refs}", "data.max_length=64",
        "train.batch_size=4", "train.lr=1e-3", "train.seed=3", "train.quiet=true", f"train.output_dir={out}",
        "train.method=lisa", *extra], method_configs())


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _encoded(path, tokenizer):
    examples, _ = load_examples(str(path))
    encoded, _ = encode_all(examples, tokenizer, max_length=64)
    return encoded


def _ctx(tiny_model, tokenizer, toy_data, epochs=2):
    """A context like train.build's, on a LoRA model whose weights are all non-zero (B starts at 0)."""
    task, refs = toy_data
    model = add_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    for p in trainable_params(model):
        p.data.normal_(0, 0.05)
    model.train()
    return TrainContext(model=model, params=trainable_params(model), task=_encoded(task, tokenizer),
                        reference=_encoded(refs, tokenizer), engine=get_engine("loop"), device=torch.device("cpu"),
                        pad_id=tokenizer.pad_token_id, batch_size=4, epochs=epochs, seed=3)


def _task_step(ids=(0, 1, 2, 3)):
    return PlannedStep(index=0, phase="train", epoch=1, ids=tuple(ids), first_of_epoch=True, last_of_epoch=False)


# -- (1) the proximal term --------------------------------------------------------------------------

def test_without_data_loss_the_gradient_is_rho_times_the_distance_and_a_step_moves_to_the_anchor(
        tiny_model, smol_tokenizer, toy_data, monkeypatch):
    ctx = _ctx(tiny_model, smol_tokenizer, toy_data)
    rho = 0.7
    method = Lisa(LisaConfig(rho=rho), ctx)
    g = torch.Generator().manual_seed(5)
    method.anchor = [p.detach() + 0.1 * torch.randn(p.shape, generator=g) for p in ctx.params]

    def zero_loss(model, batch, pad_id, device, autocast):  # data loss switched off, still on the graph
        zero = sum(p.sum() for p in ctx.params) * 0.0
        return zero.expand(len(batch)), torch.ones(len(batch), dtype=torch.int64)

    monkeypatch.setattr(dualselect.methods.lisa, "batch_losses", zero_loss)
    theta = [p.detach().clone() for p in ctx.params]
    metrics = method.step(_task_step())

    # hand computation: d/dtheta rho/2 ||theta - a||^2 = rho (theta - a), exactly
    for p, t, a in zip(ctx.params, theta, method.anchor):
        assert torch.equal(p.grad, rho * (t - a))
    dist2 = sum(float(((t - a) ** 2).sum()) for t, a in zip(theta, method.anchor))
    assert metrics["drift"] == pytest.approx(dist2, rel=1e-6)
    assert metrics["proximal"] == pytest.approx(rho / 2 * dist2, rel=1e-6)

    lr = 0.5
    torch.optim.SGD(ctx.params, lr=lr).step()
    # theta' = a + (1 - lr rho)(theta - a): a contraction towards the anchor
    for p, t, a in zip(ctx.params, theta, method.anchor):
        torch.testing.assert_close(p.detach(), a + (1 - lr * rho) * (t - a), rtol=0, atol=1e-7)
    after = sum(float(((p.detach() - a) ** 2).sum()) for p, a in zip(ctx.params, method.anchor))
    assert after == pytest.approx((1 - lr * rho) ** 2 * dist2, rel=1e-5) and after < dist2


def test_gradient_is_the_batch_mean_gradient_plus_the_proximal_gradient(tiny_model, smol_tokenizer, toy_data):
    ctx = _ctx(tiny_model, smol_tokenizer, toy_data)
    rho = 2.5
    method = Lisa(LisaConfig(rho=rho), ctx)
    g = torch.Generator().manual_seed(6)
    method.anchor = [p.detach() - 0.05 * torch.randn(p.shape, generator=g) for p in ctx.params]
    ids = (3, 7, 11, 19)
    # independent data gradient: a padded forward, mean of per-sample means, autograd
    losses, _ = batch_losses(ctx.model, [ctx.task[i] for i in ids], ctx.pad_id, ctx.device)
    data_grads = torch.autograd.grad(losses.mean(), ctx.params)
    assert all(d.abs().max() > 0 for d in data_grads)

    metrics = method.step(_task_step(ids))
    assert metrics["loss"] == pytest.approx(float(losses.mean().detach()), rel=1e-6)
    for p, d, a in zip(ctx.params, data_grads, method.anchor):
        torch.testing.assert_close(p.grad, d + rho * (p.detach() - a), rtol=1e-5, atol=1e-7)


# -- (2) the state schedule and the anchor ----------------------------------------------------------

def test_plan_alternates_states_on_schedule_and_keeps_the_sft_task_batches():
    sft = batch_plan(20, 4, 2, seed=3)  # 10 task steps
    plan = bistate_plan(sft, n_align=12, batch_size=4, align_steps=2, task_steps=3, seed=3)
    assert "".join("A" if s.phase == "align" else "T" for s in plan) == "AATTT" "AATTT" "AATTT" "AAT"
    assert [s.index for s in plan] == list(range(len(plan)))
    tasks = [s for s in plan if s.phase == "train"]
    assert [(s.epoch, s.ids) for s in tasks] == [(s.epoch, s.ids) for s in sft]  # SFT's batches, in SFT order
    assert switch_steps(plan) == [2, 5, 7, 10, 12, 15, 17]

    # alignment batches: positions in the 12 alignment samples, every 3 batches one seeded permutation
    aligns = [s.ids for s in plan if s.phase == "align"]
    assert aligns == alignment_batches(12, 4, 8, seed=3)
    for start in (0, 3):
        assert sorted(i for b in aligns[start:start + 3] for i in b) == list(range(12))
    assert aligns[0:3] != aligns[3:6]  # each pass is a fresh shuffle
    assert aligns == [s.ids for s in bistate_plan(sft, 12, 4, 2, 3, seed=3) if s.phase == "align"]  # seeded
    assert aligns != [s.ids for s in bistate_plan(sft, 12, 4, 2, 3, seed=4) if s.phase == "align"]

    # an alignment step carries the epoch of the task step after it; each epoch starts and ends once
    for s, nxt in zip(plan, plan[1:]):
        if s.phase == "align":
            assert s.epoch == nxt.epoch
    for epoch in (1, 2):
        steps = [s for s in plan if s.epoch == epoch]
        assert [s.first_of_epoch for s in steps] == [True] + [False] * (len(steps) - 1)
        assert [s.last_of_epoch for s in steps] == [False] * (len(steps) - 1) + [True]
    assert plan[-1].phase == "train" and plan[-1].last_of_epoch

    # no alignment steps: exactly SFT's plan; a task block longer than the run: one alignment block
    assert bistate_plan(sft, 12, 4, align_steps=0, task_steps=3, seed=3) == sft
    long = bistate_plan(sft, 12, 4, align_steps=2, task_steps=100, seed=3)
    assert [s.phase for s in long] == ["align"] * 2 + ["train"] * 10


def test_anchor_is_the_adapter_at_the_latest_switch(tiny_model, smol_tokenizer, toy_data):
    """An independent loop snapshots the weights before every step; at each step Lisa's anchor must be
    the snapshot taken at the latest phase change (the initial weights before the first)."""
    ctx = _ctx(tiny_model, smol_tokenizer, toy_data, epochs=1)  # 5 task steps
    method = Lisa(LisaConfig(align_steps=2, task_steps=2, rho=1.0), ctx)
    plan = method.plan()
    assert [s.phase for s in plan] == ["align", "align", "train", "train"] * 2 + ["align", "align", "train"]
    assert plan == bistate_plan(batch_plan(20, 4, 1, 3), 12, 4, 2, 2, 3)
    opt = torch.optim.SGD(ctx.params, lr=0.05)
    expected = [p.detach().clone() for p in ctx.params]
    seen_switches = []
    for i, s in enumerate(plan):
        before = [p.detach().clone() for p in ctx.params]
        if i > 0 and s.phase != plan[i - 1].phase:
            expected = before
            seen_switches.append(i)
        opt.zero_grad(set_to_none=True)
        m = method.step(s)
        assert all(torch.equal(a, e) for a, e in zip(method.anchor, expected)), i
        assert m["switched"] == (i in switch_steps(plan))
        data = ctx.reference if s.phase == "align" else ctx.task
        n_tok = sum(data[j].n_supervised for j in s.ids)
        if s.phase == "align":
            assert (m["trained_samples"], m["trained_tokens"], m["align_samples"], m["align_tokens"]) == (
                0, 0, len(s.ids), n_tok)
        else:
            assert (m["trained_samples"], m["trained_tokens"], m["align_samples"]) == (len(s.ids), n_tok, 0)
        opt.step()
    assert seen_switches == switch_steps(plan) and method.switches == len(seen_switches) == 5


def test_train_run_counts_alignment_steps_apart_and_keeps_the_sft_task_budget(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    res = train(_cfg(tiny_model_dir, task, refs, tmp_path / "lisa", "train.epochs=2", "lisa.align_steps=2",
                     "lisa.task_steps=3"))
    rows = _metrics(res.run_dir)
    assert "".join("A" if r["phase"] == "align" else "T" for r in rows) == "AATTTAATTTAATTTAAT"
    assert [r["switched"] for r in rows] == [i in (2, 5, 7, 10, 12, 15, 17) for i in range(18)]
    # at a switch the anchor is the current adapter: zero distance; elsewhere the adapter has moved away
    assert [r["drift"] == 0 for r in rows] == [i in (0, 2, 5, 7, 10, 12, 15, 17) for i in range(18)]
    budget = json.loads((res.run_dir / "run_info.json").read_text())["budget"]
    assert budget["steps_by_phase"] == {"align": 8, "train": 10}
    assert budget["trained_samples"] == 40  # 20 task samples x 2 epochs, as plain SFT
    assert sum(r["align_samples"] for r in rows) == 32


def test_without_alignment_steps_or_proximal_term_it_is_sft(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    common = ["train.epochs=2", "model.lora_dropout=0"]
    sft = _adapter(train(_cfg(tiny_model_dir, task, refs, tmp_path / "sft", *common, "train.method=sft")).run_dir)
    lisa = _adapter(train(_cfg(tiny_model_dir, task, refs, tmp_path / "l0", *common, "lisa.align_steps=0",
                               "lisa.rho=0")).run_dir)
    for k in sft:
        torch.testing.assert_close(sft[k], lisa[k], rtol=1e-6, atol=1e-8)
    # the proximal term (towards the initial adapter here) changes the result
    prox = _adapter(train(_cfg(tiny_model_dir, task, refs, tmp_path / "l1", *common, "lisa.align_steps=0",
                               "lisa.rho=5")).run_dir)
    assert any(not torch.allclose(sft[k], prox[k]) for k in sft)


# -- (3) resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("crash_at", [2, 6])
def test_resumed_run_ends_with_the_same_adapter(crash_at, tiny_model_dir, toy_data, tmp_path):
    """Checkpoints every 2 steps; the plan is AATTT AATTT ... A crash after step 2 resumes from the
    checkpoint after 2 steps, on a switch (align -> train); one after step 6 resumes inside the 2nd
    alignment block, whose anchor is the adapter before step 5."""
    task, refs = toy_data
    extra = ["train.epochs=2", "train.checkpoint_every=2", "model.lora_dropout=0.1", "lisa.align_steps=2",
             "lisa.task_steps=3", "lisa.rho=2"]
    full = train(_cfg(tiny_model_dir, task, refs, tmp_path / "full", *extra))

    def crash(step):
        if step == crash_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", *extra), on_step=crash)
    assert not (tmp_path / "cut" / "adapter").exists()
    resumed = train(_cfg(tiny_model_dir, task, refs, tmp_path / "cut", *extra), resume=True)

    a, b = _adapter(full.run_dir), _adapter(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_metrics(full.run_dir)) == strip(_metrics(resumed.run_dir))


# -- (4) configuration and data errors --------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("lisa.rho=-0.5", "lisa.rho must be a finite number >= 0"),
    ("lisa.task_steps=0", "lisa.task_steps must be >= 1"),
    ("lisa.align_steps=-1", "lisa.align_steps must be >= 0"),
    ("lisa.align_steps=1.5", "lisa.align_steps must be an int"),
])
def test_bad_config_values_give_clear_errors(override, message):
    with pytest.raises(DualSelectError, match=message):
        load_config(None, ["train.method=lisa", override], method_configs())
    with pytest.raises(ValueError):
        LisaConfig(rho=float("nan"))


def test_registered_and_needs_alignment_data(tiny_model_dir, toy_data, tmp_path):
    assert METHODS["lisa"] is Lisa
    cfg = load_config(None, ["train.method=lisa"], method_configs())
    assert cfg.method_args == LisaConfig(align_steps=10, task_steps=90, rho=1.0)
    task, refs = toy_data
    with pytest.raises(DualSelectError, match="lisa needs alignment data.*data.reference"):
        train(_cfg(tiny_model_dir, task, refs, tmp_path / "x", "data.reference=null"))
