"""TOSS: token-level data selection for safe fine-tuning (Li, Liu, Li, Lin and Zhang, "Token-level
Data Selection for Safe LLM Fine-tuning", ICLR 2026, arXiv 2603.01185; release github.com/Polly-LYP/TOSS).

Two reference LoRAs are trained from the run's starting adapter: a safety-degraded one on harmful pairs
and a utility-oriented one on clean task data. Every response token of the task set gets the risk score
``loss_utility - loss_harmful``; the top ``mask_fraction`` of them get label -100, then plain SFT.

Procedure (once, before the first optimiser step; the arithmetic is in selection/toss.py):

1. Snapshot the values of ctx.params (the run's LoRA init, B = 0 for a fresh LoRA: the references start
   from the base model). Train the safety-degraded reference on the harmful set with its own AdamW, then
   compute, in eval mode, the NLL of every response token of every task sample; restore the snapshot
   exactly. The same for the utility reference on the utility subset. Each reference runs under
   ``torch.random.fork_rng`` seeded from ctx.seed, so the main run's dropout stream is the one it
   would be without them (with ``mask_fraction=0`` TOSS is bit-for-bit plain SFT).
2. Score = loss_utility - loss_harmful per token (high: the harmful reference predicts it much better,
   an unsafe token). Mask the ``floor(mask_fraction * N)`` highest scores, ranked over all N response
   tokens of the task set (``scope=global``, the release's script) or within each sample
   (``scope=sample``, the release's other option). Only response tokens are ranked, never prompt tokens.
3. Plain SFT (as methods/sft.py) on the task set with the masked labels for train.epochs. The batch loss
   is the mean over samples of each sample's mean NLL over its remaining supervised tokens; a sample
   left with none is dropped from that mean, and a batch left with none makes no update (.grad stays
   None, so AdamW skips the step).

Where the reference data come from. The paper trains the safety-degraded model on harmful data and the
utility-oriented one on high-quality utility data (the release trains both with its SFT script on up
to 22,400 samples, a fifth of its 112,000-sample RedOrca task set). A method here gets only the encoded
task set and data.reference (no tokenizer to encode another file), so:

* harmful set (``harmful_data``, must be chosen explicitly): ``reference`` = data.reference, which for
  TOSS must hold harmful (request, compliant answer) pairs, e.g. ``beavertails_sst2:unsafe`` - NOT the
  refusal pool other methods use there (a refusal-trained "harmful" reference would invert the score);
  or ``task_ids`` = the task samples whose record ids are listed in the file ``harmful_ids``.
* utility set: the task samples listed in ``utility_ids``, else a seeded random ``utility_fraction`` of
  the task samples whose tokens differ from every harmful-set sample (so, when the harmful set is the
  known-harmful part of the task, the utility reference never sees it). Our reading, not the paper's
  exact setup: the utility reference has seen the samples it is trained on, which lowers their
  utility loss and so their scores a little.

Defaults, release scripts (train_*_model.sh, generate_token_mask.sh, selective_finetuning.sh) vs ours:

    item                   release                                   ours
    ---------------------  ----------------------------------------  ---------------------------------------
    reference LoRA         r 16, alpha 16, q_proj v_proj             the run's own LoRA and its starting values
    reference data         max_samples 22,400 each (1/5 of the       harmful: all of it; utility: 1/5 of the
                           112,000-sample task set)                  task outside the harmful set
    reference training     2 epochs, lr 1e-5, batch 64, constant     ref_epochs 2, ref_lr 1e-4, batch
                           lr, AdamW betas (0.9, 0.95), wd 0,        train.batch_size, AdamW torch betas,
                           clip 1.0                                  wd 0, ref_max_grad_norm 1.0
    risk score             loss_utility - loss_safety_degraded       the same
    masked tokens          top 20 % (data_prop 0.2), global rank     mask_fraction 0.2, scope global
    rounding               int(N * data_prop)                        floor, exact in rationals
    fully masked sample    not handled                               dropped from the batch loss
    TOSS-Pro (iterative)   refines the safety-degraded reference     not implemented

ref_lr is 10x the release's because our reference sets are small (tens of steps, not hundreds).

Resume: the masks are computed lazily at the first step (train.py calls plan() before it restores a
checkpoint), kept in state_dict() as (sample, label position) pairs and restored by load_state_dict(),
so a resumed run never recomputes them. The selection log holds one ``toss_reference`` record per
reference, one ``toss_tokens`` record per task sample (positions, token ids, both losses, scores, the
masked positions) and a ``toss_mask`` summary.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import FieldError
from ..data.formatting import IGNORE_INDEX, Encoded, collate
from ..grads import batch_losses
from ..schedule import PlannedStep, batch_plan
from ..selection.toss import SCOPES, token_risk_scores, top_fraction_mask
from . import register
from .context import TrainContext


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TossConfig:
    harmful_data: Literal["reference", "task_ids"] | None = _opt(
        None, "what the safety-degraded reference trains on (required): reference = data.reference, which must "
              "hold harmful compliant pairs (not refusals); task_ids = the task samples listed in harmful_ids")
    harmful_ids: str | None = _opt(None, "file of task record ids, one per line (# starts a comment line), read "
                                         "with harmful_data=task_ids")
    utility_ids: str | None = _opt(None, "file of task record ids the utility reference trains on "
                                         "(unset: a random utility_fraction of the task outside the harmful set)")
    utility_fraction: float = _opt(0.2, "share of the non-harmful task samples drawn for the utility reference")
    mask_fraction: float = _opt(0.2, "share of the task's response tokens masked (label -100), highest risk first")
    scope: Literal["global", "sample"] = _opt("global", "rank tokens over the whole task set (global) or within "
                                                         "each sample (sample)")
    ref_epochs: int = _opt(2, "passes of each reference over its data (ignored when ref_steps is set)")
    ref_steps: int | None = _opt(None, "AdamW steps of each reference (cycling over reshuffled passes)")
    ref_lr: float = _opt(1e-4, "AdamW learning rate of the references (paper: 1e-5 over many more steps)")
    ref_max_grad_norm: float = _opt(1.0, "gradient-norm clip of the reference training")

    def __post_init__(self):
        if not 0.0 <= self.mask_fraction < 1.0:
            raise FieldError("mask_fraction", f"must be in [0, 1), got {self.mask_fraction!r}")
        if not 0.0 < self.utility_fraction <= 1.0:
            raise FieldError("utility_fraction", f"must be in (0, 1], got {self.utility_fraction!r}")
        if self.scope not in SCOPES:
            raise FieldError("scope", f"must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.ref_epochs < 1:
            raise FieldError("ref_epochs", f"must be >= 1, got {self.ref_epochs!r}")
        if self.ref_steps is not None and self.ref_steps < 1:
            raise FieldError("ref_steps", f"must be >= 1, got {self.ref_steps!r}")
        if not self.ref_lr > 0:
            raise FieldError("ref_lr", f"must be > 0, got {self.ref_lr!r}")
        if not self.ref_max_grad_norm > 0:
            raise FieldError("ref_max_grad_norm", f"must be > 0, got {self.ref_max_grad_norm!r}")
        if self.harmful_data == "task_ids" and not self.harmful_ids:
            raise FieldError("harmful_ids", "must name a file of task record ids when harmful_data is task_ids")
        if self.harmful_ids and self.harmful_data != "task_ids":
            raise FieldError("harmful_ids", "is read only with harmful_data=task_ids")


def _read_ids(path: str, key: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{key}: {path} is not a file")
    ids = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    ids = [i for i in ids if i and not i.startswith("#")]
    if not ids:
        raise ValueError(f"{key}: {path} lists no record id")
    return ids


def _task_positions(task: list[Encoded], ids: list[str], key: str) -> list[int]:
    wanted = set(ids)
    missing = sorted(wanted - {e.id for e in task})
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{key}: {len(missing)} id(s) are not in the task set: {', '.join(missing[:5])}{more}")
    return [k for k, e in enumerate(task) if e.id in wanted]


def response_positions(e: Encoded) -> list[int]:
    """Label positions that carry loss: supervised and not the first token (nothing predicts it)."""
    return [j for j in range(1, len(e.labels)) if e.labels[j] != IGNORE_INDEX]


@register("toss", summary="mask the response tokens a harmful-trained reference LoRA predicts much better than a "
                          "utility-trained one, then plain SFT on the rest",
          paper='Li et al., "Token-level Data Selection for Safe LLM Fine-tuning", ICLR 2026 (arXiv 2603.01185)',
          needs="task+harmful")
class Toss:
    Config = TossConfig

    def __init__(self, cfg: TossConfig, ctx: TrainContext):
        self.cfg, self.ctx = cfg, ctx
        if cfg.harmful_data is None:
            raise ValueError("toss needs a harmful set for its safety-degraded reference: set toss.harmful_data="
                             "reference (data.reference holds harmful compliant pairs, e.g. beavertails_sst2:unsafe, "
                             "not refusals) or toss.harmful_data=task_ids with toss.harmful_ids=FILE")
        if cfg.harmful_data == "reference":
            if not ctx.reference:
                raise ValueError("toss.harmful_data=reference needs data.reference (harmful compliant pairs)")
            self.harmful = list(ctx.reference)
        else:
            pos = _task_positions(ctx.task, _read_ids(cfg.harmful_ids, "toss.harmful_ids"), "toss.harmful_ids")
            self.harmful = [ctx.task[k] for k in pos]
        if cfg.utility_ids:
            self.utility_index = _task_positions(ctx.task, _read_ids(cfg.utility_ids, "toss.utility_ids"),
                                                 "toss.utility_ids")
        else:
            harmful_tokens = {tuple(e.input_ids) for e in self.harmful}
            pool = [k for k, e in enumerate(ctx.task) if tuple(e.input_ids) not in harmful_tokens]
            if not pool:
                raise ValueError("toss: every task sample is in the harmful set, none is left for the utility "
                                 "reference (set toss.utility_ids)")
            k = max(1, math.floor(Fraction(repr(float(cfg.utility_fraction))) * len(pool)))
            self.utility_index = sorted(random.Random(ctx.seed + 3).sample(pool, k))
        self.utility = [ctx.task[k] for k in self.utility_index]
        self.masked: list[list[int]] | None = None  # per task sample: masked label positions
        self.train_task: list[Encoded] | None = None

    def plan(self) -> list[PlannedStep]:
        c = self.ctx
        return batch_plan(len(c.task), c.batch_size, c.epochs, c.seed)

    # -- 1. the two references --------------------------------------------------------------------
    def _ref_batches(self, n: int, seed: int):
        cfg, bs = self.cfg, self.ctx.batch_size
        rng = random.Random(seed)
        steps, passes = 0, 0
        while True:
            order = list(range(n))
            rng.shuffle(order)
            for start in range(0, n, bs):
                yield order[start:start + bs]
                steps += 1
                if cfg.ref_steps is not None and steps >= cfg.ref_steps:
                    return
            passes += 1
            if cfg.ref_steps is None and passes >= cfg.ref_epochs:
                return

    @torch.no_grad()
    def token_losses(self, samples: list[Encoded]) -> list[list[float]]:
        """NLL of every response token (positions of :func:`response_positions`) under the current model."""
        c = self.ctx
        out = []
        starts = range(0, len(samples), c.batch_size)
        for start in c.progress(starts, desc="toss: token losses", total=len(starts)):
            batch = samples[start:start + c.batch_size]
            t = {k: v.to(c.device) for k, v in collate(batch, c.pad_id).items()}
            with c.autocast():
                logits = c.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
            b, width, v = logits.shape
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, v), t["labels"][:, 1:].reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="none").view(b, width - 1)
            for r, e in enumerate(batch):
                out.append(nll[r, [j - 1 for j in response_positions(e)]].tolist())
        return out

    def reference_losses(self, data: list[Encoded], seed: int,
                         name: str = "reference") -> tuple[list[list[float]], list[float]]:
        """Train a reference LoRA on `data` from the current values of ctx.params, return the task set's
        per-token losses under it and its training losses; ctx.params, their .grad, the model's mode and
        the torch RNG are left exactly as they were."""
        c, cfg = self.ctx, self.cfg
        snapshot = [p.detach().clone() for p in c.params]
        was_training = c.model.training
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        train_losses = []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for p in c.params:
                    p.grad = None
                opt = torch.optim.AdamW(c.params, lr=cfg.ref_lr, weight_decay=0.0)
                c.model.train()
                for ids in c.progress(self._ref_batches(len(data), seed), desc=f"toss: {name} reference"):
                    opt.zero_grad(set_to_none=True)
                    losses, _ = batch_losses(c.model, [data[i] for i in ids], c.pad_id, c.device, c.autocast)
                    loss = losses.mean()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(c.params, cfg.ref_max_grad_norm)
                    opt.step()
                    train_losses.append(loss.item())
                del opt
                c.model.eval()
                token_losses = self.token_losses(c.task)
        finally:
            with torch.no_grad():
                for p, s in zip(c.params, snapshot):
                    p.copy_(s)
                    p.grad = None
            c.model.train(was_training)
        return token_losses, train_losses

    # -- 2. scores and masks ----------------------------------------------------------------------
    def compute_masks(self) -> None:
        cfg, c = self.cfg, self.ctx
        loss_h, train_h = self.reference_losses(self.harmful, c.seed + 1, "harmful")
        loss_u, train_u = self.reference_losses(self.utility, c.seed + 2, "utility")
        scores = token_risk_scores(loss_u, loss_h)
        chosen = top_fraction_mask(scores, cfg.mask_fraction, cfg.scope)
        positions = [response_positions(e) for e in c.task]
        self.masked = [[pos[k] for k in ch] for pos, ch in zip(positions, chosen)]
        self._apply_masks()
        if c.selection_log:
            log = c.selection_log
            for which, data, losses in (("harmful", self.harmful, train_h), ("utility", self.utility, train_u)):
                log.write({"kind": "toss_reference", "reference": which, "n_samples": len(data),
                           "ids": [e.id for e in data], "steps": len(losses), "train_losses": losses})
            for i, e in enumerate(c.task):
                log.write({"kind": "toss_tokens", "index": i, "id": e.id, "positions": positions[i],
                           "tokens": [e.input_ids[j] for j in positions[i]], "loss_utility": loss_u[i],
                           "loss_harmful": loss_h[i], "scores": scores[i], "masked": self.masked[i]})
            n_resp = sum(len(p) for p in positions)
            masked_scores = [scores[i][k] for i, ch in enumerate(chosen) for k in ch]
            full = sum(1 for p, m in zip(positions, self.masked) if p and len(m) == len(p))
            log.write({"kind": "toss_mask", "mask_fraction": cfg.mask_fraction, "scope": cfg.scope,
                       "n_response_tokens": n_resp, "n_masked": len(masked_scores), "n_samples_fully_masked": full,
                       "lowest_masked_score": min(masked_scores) if masked_scores else None})

    def _apply_masks(self) -> None:
        out = []
        for e, masked in zip(self.ctx.task, self.masked):
            labels = list(e.labels)
            for j in masked:
                labels[j] = IGNORE_INDEX
            out.append(replace(e, labels=labels))
        self.train_task = out

    def _ensure_masks(self) -> None:
        if self.masked is None:
            self.compute_masks()

    def on_epoch_start(self, epoch: int) -> None:
        self._ensure_masks()

    # -- 3. SFT on the masked labels --------------------------------------------------------------
    def step(self, planned: PlannedStep) -> dict:
        c = self.ctx
        self._ensure_masks()
        batch = [self.train_task[i] for i in planned.ids]
        losses, tokens = batch_losses(c.model, batch, c.pad_id, c.device, c.autocast)
        keep = tokens > 0
        n_keep = int(keep.sum())
        n_tok = int(tokens.sum())
        n_masked = sum(len(self.masked[i]) for i in planned.ids)
        loss_value = 0.0
        if n_keep:
            loss = losses.mean() if n_keep == len(batch) else losses[keep].mean()
            loss.backward()
            loss_value = loss.item()
        # else: nothing left to learn from in this batch; .grad stays None and the optimiser skips it
        return {"loss": loss_value, "tokens": n_tok + n_masked, "n_samples": len(planned.ids),
                "trained_samples": n_keep, "trained_tokens": n_tok, "masked_tokens": n_masked}

    def on_epoch_end(self, epoch: int) -> None:
        pass

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.masked is None:
            return {"n_task": len(self.ctx.task), "masked": None}
        pairs = [(i, j) for i, m in enumerate(self.masked) for j in m]
        return {"n_task": len(self.ctx.task), "masked": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)}

    def load_state_dict(self, state: dict) -> None:
        task = self.ctx.task
        if state["n_task"] != len(task):
            raise ValueError(f"toss: the checkpoint's masks are for {state['n_task']} task samples, the task set "
                             f"has {len(task)}")
        if state["masked"] is None:
            self.masked, self.train_task = None, None
            return
        masked: list[list[int]] = [[] for _ in task]
        for i, j in state["masked"].tolist():
            if not (1 <= j < len(task[i].labels) and task[i].labels[j] != IGNORE_INDEX):
                raise ValueError(f"toss: the checkpoint masks position {j} of task sample {i} ({task[i].id}), "
                                 "which is not a response token: the task data changed")
            masked[i].append(j)
        self.masked = masked
        self._apply_masks()
