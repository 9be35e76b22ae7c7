"""SEAL (Shen, Chen, Das, Chen: "SEAL: Safety-enhanced Aligned LLM Fine-tuning via Bilevel Data Selection",
ICLR 2025, arXiv 2410.07471; release github.com/hanshen95/SEAL).

Stage 1 learns one selector logit per task sample by a penalty-based first-order bilevel method: a proxy
copy of the LoRA weights fits the selector-weighted task loss (lower level) plus a decaying weight on the
loss of the safe reference set (upper level), and the logits descend the weighted task loss at the proxy
weights, so samples the safe-fitted proxy explains well rise. Stage 2 restores the LoRA init and runs plain
SFT (as methods/sft.py) on the top-p fraction of the task samples by logit.

One selector step on task batch B (ids) and reference batch R, upper-level weight lambda of the epoch:

    v      = n * softmax(w)[B]                    (detached; selection/seal.py: selector_weights)
    theta <- Adam step on  lambda * mean_R l_r(theta) + (1 - lambda) * mean_B v_b * l_b(theta)
    w     <- Adam step on  mean_B (n * softmax(w))[B] * l_b(theta)   with l_b(theta) constants
                            (the losses of the same forward, i.e. before this step's theta update)

This is the paper's memory-efficient variant (Algorithm 2), which the authors' release implements: the
penalty hypergradient of w, gamma * (grad_w g(theta, w) - grad_w g(theta_hat, w)), without the auxiliary
lower-level solution theta_hat. lambda = penalty - (e - 1) * penalty_decay in selector epoch e (a rising
penalty constant gamma in the paper's terms).

Paper / release defaults vs ours:

    key             paper (release, Llama-3 script)          ours
    selector_epochs 3                                         3
    selector_lr     5e-3 (Adam, betas 0.9/0.95, constant)     5e-3 (same optimiser)
    lower_lr        1e-5 (Adam, betas 0.9/0.95, constant)     2e-5 (= our train.lr default; same optimiser)
    penalty         1.0 (upperlevel_weight)                   1.0
    penalty_decay   0.03 per epoch (0.02 in the Pythia one)   0.03
    keep            0.8 (topp)                                0.8
    activation      softmax (n * softmax over all samples)    softmax; sigmoid (2 * sigmoid) as option
    ref_batch_size  = task batch (64)                         train.batch_size unless set
    max_grad_norm   1.0 (DeepSpeed clipping, both engines)     1.0, on proxy LoRA and on the logits
    keep count      int(topp * n)                             max(1, floor(p * n)), highest logits

Our reading where the paper/release is not precise or differs:
* The release zips the safe and the task loaders, so an epoch stops at the shorter one; here an epoch is
  one pass over the task set (batches from schedule.batch_plan with train.seed) and the reference set is
  cycled (reshuffled on each pass, from a generator seeded with train.seed).
* The selector stage runs on the training model's LoRA weights (the "proxy"), in the model's current
  mode (train: LoRA dropout active, as the release), inside torch.random.fork_rng seeded with train.seed;
  afterwards the LoRA values are restored exactly and the global RNG is as before, so stage 2 starts
  from the same state as plain SFT (keep = 1 gives plain SFT exactly).
* Stage 2 samples are kept in their original order and batch_plan runs over the kept positions, so
  keep = 1 reproduces SFT's batches.

When it runs, and resume: stage 1 runs inside plan() (train.py calls plan() once before the loop; the plan
needs the kept set). Its result goes to RUN_DIR/seal_selector.json (logits per task id, kept ids, per-epoch
losses, a fingerprint of method config, seed, batch size, data and LoRA init) and, at the first SFT epoch,
to the selection log (kind "selector"). On resume (ctx.resuming) plan() reloads that file instead of
recomputing when the fingerprint matches; otherwise it
recomputes (deterministic on CPU). state_dict() holds the logits and kept positions and load_state_dict()
checks them against the plan in use.

Reuse across runs (seal.selector_cache, off by default): the stage does not depend on keep, so runs that differ
only in keep (a tuning sweep, and the cell that runs the chosen keep with the tuning seed) compute the same
logits. With a cache directory set, a finished stage is filed there under a hash of everything it depends on
(cache_key: this section but keep, seed, batch size, data, every model weight, device, autocast precision),
and a later run with the same hash loads it instead of recomputing; the run's scores file and selection log
name the file it came from (cached_from), and its train time is then the SFT stage's only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..grads import batch_losses
from ..logs import write_atomic
from ..schedule import PlannedStep, batch_plan
from ..selection.seal import ACTIVATIONS, keep_top, penalty_schedule, selector_loss, selector_weights
from ..errors import DualSelectError
from . import register
from .sft import supervised_step
from .context import TrainContext

SCORES_FILE = "seal_selector.json"


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class SEALConfig:
    selector_epochs: int = _opt(3, "E_sel: passes over the task set that train the selector (paper: 3)")
    selector_lr: float = _opt(5e-3, "Adam learning rate of the selector logits (paper: 5e-3)")
    lower_lr: float = _opt(2e-5, "Adam learning rate of the proxy LoRA weights during selection (paper: 1e-5)")
    penalty: float = _opt(1.0, "initial upper-level (safe-loss) weight lambda in (0, 1] (paper: 1.0)")
    penalty_decay: float = _opt(0.03, "lambda drops by this much each selector epoch (paper: 0.03)")
    keep: float = _opt(0.8, "fraction p of task samples kept by logit for SFT, in (0, 1]: floor(p * n), >= 1 "
                            "(paper: 0.8)")
    ref_batch_size: int | None = _opt(None, "references per selector step (null: train.batch_size)")
    activation: Literal["softmax", "sigmoid"] = _opt(
        "softmax", "sample weights from logits: softmax (n * softmax over the task set) or sigmoid (2 * sigmoid)")
    max_grad_norm: float = _opt(1.0, "clip the proxy-LoRA and the selector gradient norms during selection")
    selector_cache: str | None = _opt(
        None, "directory of finished selector stages, each filed under a hash of everything it depends on (this "
              "section but keep, seed, batch size, data, all model weights, device, precision): a run whose "
              "stage is there reuses it instead of recomputing, e.g. a sweep over keep or its seed-0 cell "
              "(null: off)")

    def __post_init__(self):
        if self.selector_epochs < 1:
            raise ValueError(f"selector_epochs must be >= 1, got {self.selector_epochs}")
        if not self.selector_lr > 0:
            raise ValueError(f"selector_lr must be > 0, got {self.selector_lr}")
        if not self.lower_lr > 0:
            raise ValueError(f"lower_lr must be > 0, got {self.lower_lr}")
        if not (0 < self.keep <= 1):
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.ref_batch_size is not None and self.ref_batch_size < 1:
            raise ValueError(f"ref_batch_size must be >= 1 (or null), got {self.ref_batch_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        penalty_schedule(self.penalty, self.penalty_decay, self.selector_epochs)  # raises a clear ValueError


@register("seal", summary="learn per-sample selector logits by penalty bilevel optimisation against the reference "
                           "(safe) loss, then plain SFT on the top-p samples",
          paper='Shen et al., "SEAL: Safety-enhanced Aligned LLM Fine-tuning via Bilevel Data Selection", ICLR 2025 '
                "(arXiv 2410.07471)", needs="task+reference")
class SEAL:
    Config = SEALConfig

    def __init__(self, cfg: SEALConfig, ctx: TrainContext):
        if not ctx.reference:
            raise ValueError("seal needs a reference (safe) set for its upper level: set data.reference")
        self.cfg, self.ctx = cfg, ctx
        self.logits: torch.Tensor | None = None  # [n] float32, CPU
        self.kept: list[int] = []  # kept task positions, ascending
        self.record: dict = {}  # what the selector stage did (scores file, selection log)

    # -- stage 1: the selector -----------------------------------------------------------------------
    def _run_dir(self) -> Path | None:
        return self.ctx.run_dir

    def fingerprint(self) -> str:
        """What the selector stage depends on: method config, seed, batch size, data, LoRA init."""
        c, h = self.ctx, hashlib.sha256()
        h.update(json.dumps({"cfg": dataclasses.asdict(self.cfg), "seed": c.seed, "batch_size": c.batch_size},
                            sort_keys=True).encode())
        for part in (c.task, c.reference):
            for e in part:
                h.update(json.dumps([e.id, e.input_ids, e.labels]).encode())
        for p in c.params:
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def cache_key(self) -> str:
        """What the selector stage's result depends on, for selector_cache: fingerprint()'s inputs without keep
        (it only cuts the ranking) plus the base model's weights and config, the device and the autocast
        precision. The stage is deterministic given these (on a CPU; see the module docstring)."""
        c, h = self.ctx, hashlib.sha256()
        stage_cfg = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("keep", "selector_cache")}
        device = torch.device(c.device)
        with c.autocast():
            amp = [torch.is_autocast_enabled(device.type), str(torch.get_autocast_dtype(device.type))]
        model_config = getattr(c.model, "config", None)
        h.update(json.dumps({"cfg": stage_cfg, "seed": c.seed, "batch_size": c.batch_size, "device": str(device),
                             "autocast": amp, "model_config": model_config.to_json_string()
                             if model_config is not None else None}, sort_keys=True).encode())
        for part in (c.task, c.reference):
            for e in part:
                h.update(json.dumps([e.id, e.input_ids, e.labels]).encode())
        for name, p in c.model.named_parameters():  # base weights and the LoRA init
            h.update(name.encode())
            h.update(str(p.dtype).encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())  # any dtype, as stored
        return h.hexdigest()

    def _cache_path(self, key: str) -> Path:
        return Path(self.cfg.selector_cache) / f"seal-selector-{key[:32]}.json"

    def _load_cached(self, key: str) -> tuple[dict, Path] | None:
        path = self._cache_path(key)
        if not path.exists():
            return None
        try:
            cached = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DualSelectError(f"seal.selector_cache: {path} is not a readable selector file ({e}); remove "
                                  "it to recompute") from None
        if cached.get("key") != key or cached.get("ids") != [e.id for e in self.ctx.task]:
            return None
        return cached["result"], path

    def _save_cached(self, key: str, result: dict) -> None:
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(
            {"key": key, "ids": [e.id for e in self.ctx.task], "result": result,
             "written_by": str(self._run_dir()) if self._run_dir() else None}))

    def _load_saved(self, fingerprint: str) -> dict | None:
        run_dir = self._run_dir()
        if run_dir is None or not self.ctx.resuming or not (run_dir / SCORES_FILE).exists():
            return None  # not a resume, or nothing saved
        saved = json.loads((run_dir / SCORES_FILE).read_text())
        if saved.get("fingerprint") != fingerprint or saved.get("ids") != [e.id for e in self.ctx.task]:
            return None
        return saved

    def selector_stage(self) -> dict:
        """Train the selector logits on the proxy LoRA weights; restore the LoRA values and the RNG."""
        cfg, c = self.cfg, self.ctx
        n = len(c.task)
        lambdas = penalty_schedule(cfg.penalty, cfg.penalty_decay, cfg.selector_epochs)
        ref_bs = cfg.ref_batch_size or c.batch_size
        ref_rng = random.Random(f"seal-reference-{c.seed}")
        ref_order: list[int] = []

        def next_refs() -> list[int]:
            out = []
            while len(out) < ref_bs:
                if not ref_order:
                    ref_order.extend(range(len(c.reference)))
                    ref_rng.shuffle(ref_order)
                out.append(ref_order.pop())
            return out

        device = torch.device(c.device)
        logits = torch.zeros(n, dtype=torch.float32, device=device, requires_grad=True)
        sel_opt = torch.optim.Adam([logits], lr=cfg.selector_lr, betas=(0.9, 0.95), weight_decay=0.0)
        lower_opt = torch.optim.Adam(c.params, lr=cfg.lower_lr, betas=(0.9, 0.95), weight_decay=0.0)
        snapshot = [p.detach().clone() for p in c.params]
        saved_grads = [p.grad for p in c.params]
        steps = batch_plan(n, c.batch_size, cfg.selector_epochs, c.seed)
        epochs = {e: {"epoch": e, "upper_weight": lambdas[e - 1], "ref_loss": 0.0, "task_loss": 0.0,
                      "weighted_task_loss": 0.0, "steps": 0} for e in range(1, cfg.selector_epochs + 1)}
        counts = {"task_samples": 0, "task_tokens": 0, "ref_samples": 0, "ref_tokens": 0}
        t0 = time.time()
        rng_devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(c.seed)
                for planned in c.progress(steps, desc="seal selector", total=len(steps)):
                    lam = lambdas[planned.epoch - 1]
                    ids = list(planned.ids)
                    refs = next_refs()
                    lower_opt.zero_grad(set_to_none=True)
                    grad_ctx = contextlib.nullcontext() if lam < 1.0 else torch.no_grad()
                    with grad_ctx:  # lambda = 1: the task losses only feed the selector
                        task_l, task_tok = batch_losses(c.model, [c.task[i] for i in ids], c.pad_id, c.device,
                                                        c.autocast)
                    ref_l, ref_tok = batch_losses(c.model, [c.reference[j] for j in refs], c.pad_id, c.device,
                                                  c.autocast)
                    v = selector_weights(logits.detach(), cfg.activation)[torch.tensor(ids, device=device)]
                    weighted = (v * task_l).mean()
                    ref_mean = ref_l.mean()
                    lower = lam * ref_mean + (1.0 - lam) * weighted if lam < 1.0 else ref_mean
                    lower.backward()
                    torch.nn.utils.clip_grad_norm_(c.params, cfg.max_grad_norm)
                    lower_opt.step()

                    sel_opt.zero_grad(set_to_none=True)
                    selector_loss(logits, ids, task_l, cfg.activation).backward()
                    torch.nn.utils.clip_grad_norm_([logits], cfg.max_grad_norm)
                    sel_opt.step()

                    rec = epochs[planned.epoch]
                    rec["ref_loss"] += ref_mean.item()
                    rec["task_loss"] += task_l.mean().item()
                    rec["weighted_task_loss"] += weighted.item()
                    rec["steps"] += 1
                    counts["task_samples"] += len(ids)
                    counts["task_tokens"] += int(task_tok.sum())
                    counts["ref_samples"] += len(refs)
                    counts["ref_tokens"] += int(ref_tok.sum())
        finally:
            with torch.no_grad():
                for p, s, g in zip(c.params, snapshot, saved_grads):
                    p.copy_(s)
                    p.grad = g
        for rec in epochs.values():
            for k in ("ref_loss", "task_loss", "weighted_task_loss"):
                rec[k] /= max(rec["steps"], 1)
        final = logits.detach().cpu()
        return {"logits": final.tolist(), "weights": selector_weights(final, cfg.activation).tolist(),
                "epochs": list(epochs.values()), **counts, "seconds": round(time.time() - t0, 3)}

    def plan(self) -> list[PlannedStep]:
        c, cfg = self.ctx, self.cfg
        fingerprint = self.fingerprint()
        saved = self._load_saved(fingerprint)
        cached_from = None
        if saved is not None:
            result = {k: v for k, v in saved.items()
                      if k not in ("fingerprint", "ids", "kept", "kept_ids", "keep", "n_task", "cached_from")}
            cached_from = saved.get("cached_from")
        else:
            key = self.cache_key() if cfg.selector_cache else None
            hit = self._load_cached(key) if key else None
            if hit is not None:
                result, path = hit
                cached_from = str(path)
            else:
                result = self.selector_stage()
                if key:
                    self._save_cached(key, result)
        self.logits = torch.tensor(result["logits"], dtype=torch.float32)
        self.kept = sorted(keep_top(self.logits, cfg.keep))
        self.record = {"ids": [e.id for e in c.task], **result, "kept": self.kept,
                       "kept_ids": [c.task[i].id for i in self.kept], "keep": cfg.keep, "n_task": len(c.task),
                       "cached_from": cached_from, "reused": saved is not None}
        run_dir = self._run_dir()
        if run_dir is not None and saved is None:
            out = {"fingerprint": fingerprint, **{k: v for k, v in self.record.items() if k != "reused"}}
            write_atomic(run_dir / SCORES_FILE, json.dumps(out))
        base = batch_plan(len(self.kept), c.batch_size, c.epochs, c.seed)
        return [dataclasses.replace(s, ids=tuple(self.kept[j] for j in s.ids)) for s in base]

    # -- stage 2: plain SFT on the kept samples ------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        c = self.ctx
        if epoch == 1 and c.selection_log:  # not in plan(): train.py truncates the logs after plan() on a fresh run
            c.selection_log.write({"kind": "selector",
                                   **{k: v for k, v in self.record.items() if k not in ("seconds", "reused")}})

    def step(self, planned: PlannedStep) -> dict:
        return supervised_step(self.ctx, [self.ctx.task[i] for i in planned.ids])

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"logits": self.logits.clone() if self.logits is not None else None, "kept": list(self.kept)}

    def load_state_dict(self, state: dict) -> None:
        if state["kept"] != self.kept:
            raise ValueError("seal: the kept task samples of this plan differ from the checkpoint's (the selector "
                             f"stage did not reproduce; {SCORES_FILE} missing or changed?)")
        self.logits = state["logits"]
