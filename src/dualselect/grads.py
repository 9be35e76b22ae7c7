"""Per-sample losses and gradients of the trainable (LoRA) parameters, flattened to fp32 vectors.

An engine turns a list of encoded samples into (losses, supervised-token counts, gradients [n, P]).
`loop` runs one forward/backward per sample without padding (batched autograd/vmap variants were slower
on a 2-core CPU and used far more memory). `factored` runs one padded forward/backward per chunk and
forms each sample's exact LoRA gradient from hooked factors (einsums over that sample's tokens). `auto`
(AutoEngine) times both on its first call and keeps the faster. Engines are looked up by name in ENGINES.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data.formatting import Encoded, collate

log = logging.getLogger(__name__)


@dataclass
class PerSampleGrads:
    losses: torch.Tensor  # [n] float32, mean NLL over each sample's supervised tokens
    tokens: torch.Tensor  # [n] int64, supervised-token counts
    grads: torch.Tensor  # [n, P] float32, flattened gradients of the trainable parameters


def trainable_params(model) -> list[torch.nn.Parameter]:
    """The trainable parameters in a fixed order (the order of the flattened vectors)."""
    return [p for p in model.parameters() if p.requires_grad]


def num_params(params) -> int:
    return sum(p.numel() for p in params)


def flatten(tensors, params) -> torch.Tensor:
    """Concatenate per-parameter tensors (None -> zeros) into one fp32 vector."""
    return torch.cat([
        (t if t is not None else torch.zeros_like(p)).reshape(-1).float() for t, p in zip(tensors, params)
    ])


def set_grads(params, vec: torch.Tensor) -> None:
    """Write a flat vector into the parameters' .grad (the optimiser's input)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = vec[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token NLL over the supervised tokens of each row, and the token counts.

    logits [b, T, V], labels [b, T] with -100 where unsupervised (prompt, padding)."""
    b, t, v = logits.shape
    shift_labels = labels[:, 1:]
    # (b*T, V) rows: cross_entropy over a transposed [b, V, T] view takes a less accurate CPU path (3e-5 rel.)
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, v), shift_labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(b, t - 1)
    tokens = (shift_labels != -100).sum(dim=1)
    return nll.sum(dim=1) / tokens.clamp(min=1), tokens


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions (over the whole batch) whose next token is supervised in at least one row: the only
    positions whose logits a loss needs."""
    return (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(1)


# A padded forward computes every padding position, and on a CPU its time grows with the padded tokens; a batch
# of mixed lengths (short task rows, a few long ones) is run there as a few length-sorted groups instead. The
# cost of one more forward call, in padded tokens (a rough CPU figure; the partition is not sensitive to it).
GROUP_OVERHEAD_TOKENS = 24


def length_groups(lengths: list[int], overhead: int = GROUP_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length (contiguous in length order) minimising the padded
    tokens, sum(len(group) * longest in group), plus `overhead` per group (exact, O(n^2) dynamic programme)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_len = [lengths[i] for i in order]
    best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sorted_len[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _padded_losses(model, batch: list[Encoded], pad_id: int, device, autocast):
    t = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
    keep = supervised_positions(t["labels"])
    with autocast():
        try:
            logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], logits_to_keep=keep).logits
        except TypeError:  # an architecture without logits_to_keep
            return per_sample_nll(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits,
                                  t["labels"])
    targets = t["labels"][:, 1:][:, keep]
    b, k, v = logits.shape
    nll = F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1), ignore_index=-100,
                          reduction="none").view(b, k)
    tokens = (targets != -100).sum(dim=1)
    return nll.sum(dim=1) / tokens.clamp(min=1), tokens


def batch_losses(model, batch: list[Encoded], pad_id: int, device, autocast=contextlib.nullcontext,
                 by_length: bool = True):
    """Per-sample mean losses [b] (with graph) and token counts [b], in the order of `batch`.

    One padded forward pass; on a CPU with `by_length`, one per length group (length_groups: the same losses up
    to float rounding, less padding; LoRA dropout draws its masks per group).
    Only the positions in supervised_positions are projected onto the vocabulary (`logits_to_keep`), the
    same losses as full logits at a fraction of the lm_head cost; models whose forward has no
    `logits_to_keep` get full logits."""
    device = torch.device(device)
    groups = (length_groups([len(e.input_ids) for e in batch]) if by_length and device.type == "cpu"
              else [list(range(len(batch)))])
    if len(groups) == 1:
        return _padded_losses(model, batch, pad_id, device, autocast)
    parts = [_padded_losses(model, [batch[i] for i in g], pad_id, device, autocast) for g in groups]
    back = torch.argsort(torch.tensor([i for g in groups for i in g], device=device))  # to the order of `batch`
    losses = torch.cat([p[0] for p in parts])[back]
    tokens = torch.cat([p[1] for p in parts])[back]
    return losses, tokens


class LoopEngine:
    """One forward/backward per sample, no padding."""

    name = "loop"

    def __call__(self, model, batch: list[Encoded], device, autocast=contextlib.nullcontext) -> PerSampleGrads:
        params = trainable_params(model)
        grads = torch.empty(len(batch), num_params(params), dtype=torch.float32, device=device)
        losses = torch.empty(len(batch), dtype=torch.float32, device=device)
        tokens = torch.empty(len(batch), dtype=torch.int64, device=device)
        for i, enc in enumerate(batch):
            ids = torch.tensor([enc.input_ids], device=device)
            targets = torch.tensor(enc.labels[1:], device=device)
            keep = (targets != -100).nonzero().squeeze(1)  # positions whose next token is supervised
            with autocast():
                # Project only those positions onto the vocabulary (the rest of the logits are unused).
                logits = model(input_ids=ids, logits_to_keep=keep).logits[0]
            loss = F.cross_entropy(logits.float(), targets[keep])
            g = torch.autograd.grad(loss, params, allow_unused=True)
            grads[i] = flatten(g, params)
            losses[i] = loss.detach()
            tokens[i] = len(keep)
        return PerSampleGrads(losses, tokens, grads)


class FactoredEngine:
    """Exact per-sample gradients of LoRA weights from one padded forward/backward per chunk of samples (on a
    CPU, chunks of samples of similar length: length_groups).

    The backward is that of the sum of the samples' mean losses, so sample n's rows carry only the gradient of
    its own loss. Hooks on every LoRA pair keep lora_A's input u (after LoRA dropout), its output h, and the
    gradients at h and at lora_B's output g; then, per sample and summed over its tokens (padding and
    unsupervised positions contribute exact zeros), grad B_n = g_n^T h_n and grad A_n = (dL/dh)_n^T u_n
    (lora_B's output is scaled after the module, so the scaling is in g). The factors are float32; under bf16
    autocast the result is the exact gradient of that forward up to bf16 rounding of the factors.
    Needs every trainable parameter to be a plain (non-DoRA) LoRA A or B weight of an active adapter. Exact under
    (non-reentrant) gradient checkpointing too, whose recompute runs the hooked forwards a second time (_hook)."""

    name = "factored"

    def __init__(self, chunk: int = 8, by_length: bool = True):
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        self.chunk, self.by_length = chunk, by_length

    @staticmethod
    def lora_pairs(model, params) -> list[tuple[torch.nn.Module, torch.nn.Module, int, int]]:
        """(lora_A, lora_B, offset of A's weight, offset of B's weight) in the flattened vector, for every
        trainable LoRA pair; raises ValueError when a trainable parameter is not covered."""
        offsets, off = {}, 0
        for prm in params:
            offsets[id(prm)] = off
            off += prm.numel()
        pairs, covered = [], set()
        for module in model.modules():
            if not (hasattr(module, "lora_A") and hasattr(module, "lora_B")):
                continue
            for name in getattr(module, "active_adapters", []):
                if name not in module.lora_A:
                    continue
                a, b = module.lora_A[name], module.lora_B[name]
                if not (a.weight.requires_grad and b.weight.requires_grad):
                    continue
                if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name):
                    raise ValueError("the factored engine supports plain LoRA only (not DoRA or other variants)")
                if a.bias is not None or b.bias is not None:
                    raise ValueError("the factored engine supports LoRA without biases")
                pairs.append((a, b, offsets[id(a.weight)], offsets[id(b.weight)]))
                covered |= {id(a.weight), id(b.weight)}
        if not pairs or covered != set(offsets):
            raise ValueError("the factored engine needs every trainable parameter to be a LoRA A or B weight")
        return pairs

    def __call__(self, model, batch: list[Encoded], device, autocast=contextlib.nullcontext) -> PerSampleGrads:
        params = trainable_params(model)
        pairs = self.lora_pairs(model, params)
        n = len(batch)
        grads = torch.zeros(n, num_params(params), dtype=torch.float32, device=device)
        losses = torch.empty(n, dtype=torch.float32, device=device)
        tokens = torch.empty(n, dtype=torch.int64, device=device)
        # on a CPU, samples of similar length share a forward (length_groups), so little padding is computed
        groups = (length_groups([len(e.input_ids) for e in batch])
                  if self.by_length and torch.device(device).type == "cpu" else [list(range(n))])
        for group in groups:
            for start in range(0, len(group), self.chunk):
                index = group[start:start + self.chunk]
                rows = torch.zeros(len(index), grads.shape[1], dtype=torch.float32, device=device)
                handles = []
                for a, b, off_a, off_b in pairs:
                    handles += self._hook(a, b, rows, off_a, off_b)
                try:
                    chunk_losses, chunk_tokens = batch_losses(model, [batch[i] for i in index], 0, device, autocast,
                                                              by_length=False)
                    # the hooks fill `rows`; the summed gradient itself is not needed (and .grad is left untouched)
                    torch.autograd.grad(chunk_losses.sum(), params, allow_unused=True)
                finally:
                    for h in handles:
                        h.remove()
                grads[index] = rows
                losses[index] = chunk_losses.detach().float()
                tokens[index] = chunk_tokens
        return PerSampleGrads(losses, tokens, grads)

    @staticmethod
    def _hook(a, b, rows: torch.Tensor, off_a: int, off_b: int) -> list:
        saved = {}
        na, nb = a.weight.numel(), b.weight.numel()

        def on_b_grad(g):  # dL/d(lora_B output), [n, T, d_out]
            rows[:, off_b:off_b + nb] += torch.einsum("ntd,ntr->ndr", g.float(), saved["h"]).reshape(len(rows), -1)

        def on_h_grad(g):  # dL/dh, [n, T, r]
            rows[:, off_a:off_a + na] += torch.einsum("ntr,nti->nri", g.float(), saved.pop("u")).reshape(len(rows), -1)
            saved.pop("h", None)

        # Under gradient checkpointing a layer's forward runs again in the backward (same RNG state, same values),
        # but the backward goes through the graph of the first forward only (non-reentrant checkpointing: the
        # recompute just refills that graph's saved tensors): only the first forward's factors and hooks count.
        def a_forward(module, inputs, output):
            if output.requires_grad and not saved.get("a_seen"):
                saved.update(a_seen=True, u=inputs[0].detach().float(), h=output.detach().float())
                output.register_hook(on_h_grad)

        def b_forward(module, inputs, output):
            if output.requires_grad and not saved.get("b_seen"):
                saved["b_seen"] = True
                output.register_hook(on_b_grad)

        return [a.register_forward_hook(a_forward), b.register_forward_hook(b_forward)]


def _sync(device) -> None:
    """Wait for the device's queued work (a timing must not stop the clock before the kernels ran)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def _rng_kept(device):
    """A context that restores the CPU RNG and `device`'s RNG when it ends (LoRA dropout draws from them)."""
    dev = torch.device(device)
    return torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev], device_type=dev.type)


class AutoEngine:
    """`auto`: the faster of `loop` and `factored` for this model and device, measured on the first call.

    That call's samples (at most `probe_samples` of them) are computed by both engines, alternately, `rounds`
    times; each engine's best time counts (the first round pays one-time costs) and the faster one computes
    this call and every later one. Where factored does not apply (FactoredEngine.lora_pairs refuses the trainable
    parameters: non-LoRA ones, DoRA) it is loop, without a probe. The probe leaves nothing behind: the RNG (the
    LoRA dropout draws) is restored, and the engines change neither .grad nor the model's mode, so the run is the
    one the chosen engine, named, would give. `record` (requested, used, seconds per engine, why) goes to
    run_info.json through `on_choice(record)`; `use(record)` takes the engine of an earlier record (a resumed run
    keeps the engine it started with)."""

    name = "auto"

    def __init__(self, rounds: int = 2, probe_samples: int = 8, on_choice=None):
        if rounds < 1 or probe_samples < 1:
            raise ValueError("rounds and probe_samples must be >= 1")
        self.rounds, self.probe_samples, self.on_choice = rounds, probe_samples, on_choice
        self.engine = None
        self.record = {"requested": "auto", "used": None}  # used: null until the first call

    def use(self, record: dict) -> None:
        if record.get("used") not in ("loop", "factored"):
            raise ValueError(f"grad_engine record names no engine: {record!r}")
        self.engine, self.record = ENGINES[record["used"]](), dict(record)

    def __call__(self, model, batch: list[Encoded], device, autocast=contextlib.nullcontext) -> PerSampleGrads:
        if self.engine is None:
            self._choose(model, batch, device, autocast)
        return self.engine(model, batch, device, autocast)

    def _choose(self, model, batch, device, autocast) -> None:
        try:
            FactoredEngine.lora_pairs(model, trainable_params(model))
        except ValueError as e:
            self._chose("loop", None, f"factored does not apply ({e})")
            return
        engines, sample = {"loop": LoopEngine(), "factored": FactoredEngine()}, batch[:self.probe_samples]
        times = {name: [] for name in engines}
        with _rng_kept(device):
            for _ in range(self.rounds):
                for name, engine in engines.items():
                    _sync(device)
                    start = time.perf_counter()
                    engine(model, sample, device, autocast)
                    _sync(device)
                    times[name].append(time.perf_counter() - start)
        seconds = {name: round(min(t), 4) for name, t in times.items()}
        used = min(seconds, key=seconds.get)  # equal: loop
        self._chose(used, seconds, f"measured on {len(sample)} samples, {self.rounds} rounds: factored took "
                                   f"{seconds['factored'] / max(seconds['loop'], 1e-9):.2f}x the loop's time")

    def _chose(self, used: str, seconds: dict | None, reason: str) -> None:
        self.engine = ENGINES[used]()
        self.record = {"requested": "auto", "used": used, "seconds": seconds, "reason": reason}
        log.info("grad_engine auto -> %s: %s", used, reason)
        if self.on_choice is not None:
            self.on_choice(self.record)


ENGINES = {"loop": LoopEngine, "factored": FactoredEngine, "auto": AutoEngine}


def get_engine(name: str):
    if name not in ENGINES:
        from .errors import DualSelectError

        raise DualSelectError(f"unknown grad_engine '{name}'; known: {', '.join(ENGINES)}")
    return ENGINES[name]()
