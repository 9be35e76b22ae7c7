"""The training loop, written out: build model and data, then for every planned step let the method
put its update direction in .grad, clip, AdamW; log, checkpoint, resume."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import models
from .config import RunConfig, dump_yaml
from .data.formatting import encode, encode_all
from .data.mixing import load_task_examples
from .data.records import load_examples
from .distributed import ONE_PROCESS_SHARDING, SingleProcess, communicator, same_on_all, shard_base
from .errors import DualSelectError
from .grads import AutoEngine, get_engine, trainable_params
from .logs import JsonlLog, read_jsonl, write_atomic
from .methods import METHODS
from .methods.context import NonFiniteError, TrainContext, nonfinite_rows, show_ids
from .runinfo import adapter_settings, peak_rss_mb, read_run_info, record_budget, update_run_info, write_run_info

log = logging.getLogger("dualselect")

# Keys that may change between an interrupted run and its resumption (besides the eval section).
# train.nonfinite: a run stopped by a NaN continues with skip; model.trust_remote_code and model.gradient_checkpointing
# (memory only: the same gradients): absent from older runs' config.yaml and without effect on the result; so is
# train.shard_base (memory only; the checkpoints hold the replicated LoRA state either way).
RESUMABLE_CHANGES = {"train.max_steps", "train.quiet", "train.checkpoint_every", "train.log_every", "train.nonfinite",
                     "model.trust_remote_code", "model.gradient_checkpointing", "train.shard_base"}

# Methods that run in several processes (accelerate launch; distributed.py): their steps share each batch among
# the processes and sum-reduce the shares (sft's supervised_step, used by random and dsir; dualselect's step).
# The others are refused there until their steps do the same.
MULTIPROCESS_METHODS = ("sft", "dualselect", "random", "dsir")


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    final_loss: float | None
    seconds: float
    peak_rss_mb: float
    start_step: int = 0  # the checkpoint step a resumed run continued from (0: trained from the start)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.train.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_encoded(source: str, cfg: RunConfig, tokenizer, limit: int | None, what: str):
    """Load and tokenize one data source (the task data: with data.harmful mixed in, data/mixing.py); returns
    (encoded, facts for run_info, the examples of `encoded` in the same order)."""
    if what == "task":
        examples, facts = load_task_examples(cfg.data)
    else:
        examples, report = load_examples(source, data_dir=cfg.data.data_dir, fmt=cfg.data.format,
                                         columns=cfg.data.columns or None, limit=limit)
        facts = asdict(report)
    encoded, stats = encode_all(examples, tokenizer, template=cfg.data.template, mask=cfg.data.mask,
                                max_length=cfg.data.max_length)
    if not encoded:
        raise DualSelectError(f"{source}: no usable {what} records (read {facts.get('n_read', 0)}, "
                              f"skipped {facts.get('n_skipped_empty', 0)} empty, dropped "
                              f"{stats['n_dropped_no_supervised']})")
    log.info("%s data %s: %d records (%d harmful pairs, %d skipped empty, %d truncated to %d tokens, %d left without "
             "supervised tokens)", what, source, len(encoded), facts.get("n_harmful_pairs", 0),
             facts.get("n_skipped_empty", 0), stats["n_truncated"], cfg.data.max_length,
             stats["n_dropped_no_supervised"])
    kept = {e.id for e in encoded}
    return encoded, {**facts, **stats}, [ex for ex in examples if ex.id in kept]


def _atomic_dir(final: Path, write) -> Path:
    """Write a directory under a temporary name, then rename it into place. An existing `final` is renamed aside
    first and deleted last, so that a kill at any moment leaves `final` complete (old or new) or absent, never
    half-deleted; the hidden leftovers of a killed call (.NAME-*) are removed by the next call for NAME."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); an adapter or checkpoint is as readable as a mkdir'd one
    aside = final.parent / f".{final.name}-replaced"
    try:
        write(tmp)
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    return final


def save_checkpoint(run_dir: Path, step: int, model, optimizer, method, logs: dict[str, JsonlLog], keep: int = 2):
    def write(tmp: Path):
        model.save_pretrained(tmp / "adapter")
        torch.save({
            "step": step, "optimizer": optimizer.state_dict(), "method": method.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "log_offsets": {name: lg.offset() for name, lg in logs.items()},
        }, tmp / "state.pt")

    ckpts = run_dir / "checkpoints"
    _atomic_dir(ckpts / f"step-{step:06d}", write)
    # the checkpoints before the last `keep`, and what killed writes of other steps left (hidden .step-* dirs)
    for old in sorted(ckpts.glob("step-*"))[:-keep] + list(ckpts.glob(".step-*")):
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def _diff_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k not in ("columns",):
            keys |= _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.add(f"{prefix}{k}")
    return keys


def _check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    import yaml

    from .config import to_dict, with_defaults

    saved = with_defaults(yaml.safe_load((run_dir / "config.yaml").read_text()), cfg)
    changed = {k for k in _diff_keys(saved, to_dict(cfg)) - RESUMABLE_CHANGES if not k.startswith("eval.")}
    if changed:
        raise DualSelectError(f"{run_dir}: cannot resume, the config differs from the saved one in: "
                              f"{', '.join(sorted(changed))}")


def train(cfg: RunConfig, resume: bool = False, on_step=None) -> TrainResult:
    """Run one training job described by `cfg`. `on_step(step_index)` is called after every step."""
    t0 = time.time()
    if cfg.train.method not in METHODS:
        raise DualSelectError(f"unknown method '{cfg.train.method}'; known: {', '.join(METHODS)}")
    if not cfg.data.task:
        raise DualSelectError("no task data: set data.task (a file, a named dataset or hf:NAME)")
    comm = communicator(cpu=models.pick_device(cfg.model.device).type == "cpu")
    if comm.world_size > 1:
        _check_processes(cfg, comm)
    elif cfg.train.shard_base:
        raise DualSelectError(ONE_PROCESS_SHARDING)
    run_dir = Path(cfg.train.output_dir) if cfg.train.output_dir else default_run_dir(cfg)
    if resume:
        if not (run_dir / "config.yaml").exists():
            raise DualSelectError(f"--resume: {run_dir} holds no earlier run (set train.output_dir to its directory)")
        _check_resumable(run_dir, cfg)
    elif (run_dir / "config.yaml").exists():
        raise DualSelectError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another "
                              "train.output_dir")
    comm.barrier()  # every process has looked at the run dir before the main one writes in it
    if not comm.is_main:
        return _other_process(cfg, run_dir, resume, on_step, t0, comm)
    run_dir.mkdir(parents=True, exist_ok=True)
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if log.level == logging.NOTSET:  # called from Python without logging set up: still fill train.log
        log.setLevel(logging.INFO)
    log.addHandler(file_log)
    try:
        return _train(cfg, run_dir, resume, on_step, t0, comm)
    except NonFiniteError as e:  # into train.log as well (the CLI prints it on the console)
        file_log.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, str(e), None, None))
        raise
    finally:
        log.removeHandler(file_log)
        file_log.close()


def _check_processes(cfg: RunConfig, comm) -> None:
    """What a run in several processes needs (refused with a clear error otherwise)."""
    if cfg.train.method not in MULTIPROCESS_METHODS:
        raise DualSelectError(f"method {cfg.train.method} cannot run in several processes yet (this run was started "
                              f"as {comm.world_size}): run it in one process, or use one of "
                              f"{', '.join(MULTIPROCESS_METHODS)}")
    if not cfg.train.output_dir:
        raise DualSelectError("a run in several processes needs train.output_dir (the run directory the main process "
                              "writes and every process resumes from)")
    device = models.pick_device(cfg.model.device)
    if device.type != comm.device.type or (device.index is not None and device != comm.device):
        raise DualSelectError(f"model.device={cfg.model.device} ({device}) but this process of {comm.world_size} "
                              f"was given {comm.device}: set model.device=auto (each process uses the device the "
                              "launcher gives it), or launch CPU processes for model.device=cpu")


def _other_process(cfg: RunConfig, run_dir: Path, resume: bool, on_step, t0: float, comm) -> TrainResult:
    """A process other than the main one of a multi-process run: the same steps, but it writes nothing to the run
    dir and logs warnings only."""
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        return _train(cfg, run_dir, resume, on_step, t0, comm)
    finally:
        log.setLevel(level)


@dataclass
class Setup:
    """Model, data and the context a method works in."""
    ctx: TrainContext
    tokenizer: object
    precision: str
    facts: dict  # data reports for run_info.json
    sharding: dict | None = None  # train.shard_base: run_info.json's shard_base entry


def build(cfg: RunConfig, run_dir: Path, resuming: bool = False, comm=None) -> Setup:
    """Seed, load tokenizer, data and model (+ LoRA); open the run's JSONL logs (the main process's only).
    `comm`: the run's processes (distributed.py; default one process)."""
    from tqdm.auto import tqdm

    comm = comm or SingleProcess()
    if cfg.train.grad_engine == "auto" and comm.world_size > 1:  # each process would time and choose on its own
        raise DualSelectError(f"train.grad_engine=auto chooses in one process, and this run has {comm.world_size}: "
                              "set train.grad_engine=loop or factored")
    seed_everything(cfg.train.seed)
    tokenizer = models.load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    task, task_facts, task_examples = load_encoded(cfg.data.task, cfg, tokenizer, cfg.data.task_limit, "task")
    reference, ref_facts, ref_examples = (
        load_encoded(cfg.data.reference, cfg, tokenizer, cfg.data.reference_limit, "reference")
        if cfg.data.reference else (None, None, None))
    model, precision, device = models.load_model(cfg.model.name_or_path, cfg.model.precision, cfg.model.device,
                                                 trust_remote_code=cfg.model.trust_remote_code,
                                                 quiet=cfg.train.quiet or not comm.is_main)
    model = models.add_lora(model, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout,
                            cfg.model.lora_targets, cfg.model.init_adapter)
    if cfg.model.gradient_checkpointing:
        if getattr(cfg.method_args, "score_mode", "train") == "eval":  # transformers checkpoints in train mode only
            raise DualSelectError(f"model.gradient_checkpointing=true would not apply: {cfg.train.method}.score_mode="
                                  "eval computes every gradient in eval mode, where transformers does not checkpoint; "
                                  f"set {cfg.train.method}.score_mode=train or model.gradient_checkpointing=false")
        models.enable_gradient_checkpointing(model)
    if cfg.train.shard_base:  # LoRA added, optimizer not yet built; the run's collectives go through the sharding's
        comm = shard_base(model, comm)
    model.train()
    ctx = TrainContext(
        model=model, params=trainable_params(model), task=task, reference=reference,
        engine=get_engine(cfg.train.grad_engine), device=device, pad_id=tokenizer.pad_token_id,
        batch_size=cfg.train.batch_size, epochs=cfg.train.epochs, seed=cfg.train.seed,
        autocast=lambda: models.autocast(precision, device),
        selection_log=JsonlLog(run_dir / "selection.jsonl") if comm.is_main else None,
        progress=lambda it, **kw: tqdm(it, leave=False, disable=cfg.train.quiet or not comm.is_main, **kw),
        run_dir=run_dir, resuming=resuming, tokenizer=tokenizer, template=cfg.data.template,
        task_examples=task_examples, reference_examples=ref_examples,
        encode=lambda ex: encode(ex, tokenizer, template=cfg.data.template, mask=cfg.data.mask,
                                 max_length=cfg.data.max_length),
        nonfinite=cfg.train.nonfinite, comm=comm,
    )
    return Setup(ctx, tokenizer, precision, {"task": task_facts, "reference": ref_facts},
                 sharding=comm.facts if cfg.train.shard_base else None)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, on_step, t0: float, comm) -> TrainResult:
    from tqdm.auto import tqdm

    setup = build(cfg, run_dir, resume, comm)
    ctx, comm = setup.ctx, setup.ctx.comm  # train.shard_base: the sharding's communicator
    model, params, quiet = ctx.model, ctx.params, cfg.train.quiet or not comm.is_main
    # only the main process writes the run dir: logs, checkpoints, config, run_info, the adapter
    metrics_log = JsonlLog(run_dir / "metrics.jsonl") if comm.is_main else None
    logs = {"selection": ctx.selection_log, "metrics": metrics_log} if comm.is_main else {}
    try:
        method = METHODS[cfg.train.method](cfg.method_args, ctx)
    except ValueError as e:
        raise DualSelectError(f"method {cfg.train.method}: {e}") from None
    plan = method.plan()
    if cfg.train.max_steps is not None:
        plan = plan[: cfg.train.max_steps]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    start = 0
    if resume and (ckpt := latest_checkpoint(run_dir)):
        start = _restore(ckpt, model, optimizer, method, logs)
        log.info("resumed from %s (step %d)", ckpt, start)
    else:
        for lg in logs.values():
            lg.truncate(0)
    if comm.is_main:
        write_atomic(run_dir / "config.yaml", dump_yaml(cfg))  # rewritten on resume: a kill must not leave it cut
        engine_record = _engine_record(ctx.engine, run_dir, resume)  # reads the earlier run_info.json: before it goes
        write_run_info(run_dir, cfg, device=ctx.device, precision=setup.precision,
                       precision_reason=models.choose_precision(cfg.model.precision, ctx.device).reason,
                       n_trainable=sum(p.numel() for p in params), data=setup.facts, plan_steps=len(plan),
                       adapter=adapter_settings(model, cfg.model.init_adapter),
                       grad_engine=engine_record, shard_base=setup.sharding)
        if comm.world_size > 1:
            update_run_info(run_dir, "processes", {
                "count": comm.world_size, "backend": comm.backend,
                "split": "each step's batch in contiguous blocks in batch order, the first ones one sample larger "
                         "where it does not divide (distributed.share)"})
    if comm.world_size > 1:
        _same_start(comm, params, cfg.train.seed, start)
    log.info("run dir %s: method %s, %d steps, %d trainable parameters, %s on %s", run_dir, cfg.train.method,
             len(plan), sum(p.numel() for p in params), setup.precision, ctx.device)

    last_loss = None
    bar = tqdm(total=len(plan), initial=start, disable=quiet, desc=cfg.train.method)
    for planned in plan[start:]:
        step_t = time.time()
        ctx.dropped.clear()
        try:
            if planned.first_of_epoch:
                method.on_epoch_start(planned.epoch)
            optimizer.zero_grad(set_to_none=True)
            metrics = method.step(planned)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            _, what = nonfinite_rows(torch.tensor([float(metrics["loss"])]), grad_norm.reshape(1))
            if what:
                raise NonFiniteError(_sample_ids(method, ctx, planned), what)
        except NonFiniteError as e:
            if cfg.train.nonfinite != "skip":
                raise _stopped(e, planned, run_dir) from None
            optimizer.zero_grad(set_to_none=True)
            event = {"data": e.data, "what": e.what, "ids": e.ids}
            metrics, grad_norm = {"loss": None, "skipped": True, "trained_samples": 0, "trained_tokens": 0,
                                  "nonfinite": ctx.dropped + ([event] if event not in ctx.dropped else [])}, None
        else:
            optimizer.step()
            if ctx.dropped:
                metrics["nonfinite"] = list(ctx.dropped)
        for d in metrics.get("nonfinite", []):
            log.warning("step %d: non-finite %s (NaN or inf) on %s: %s (train.nonfinite=skip)", planned.index,
                        d["what"], _samples(d["data"], d["ids"]),
                        "step skipped, no update" if grad_norm is None else "left out of the update")
        if planned.last_of_epoch:
            method.on_epoch_end(planned.epoch)
        last_loss = metrics["loss"] if grad_norm is not None else last_loss
        if comm.is_main:
            metrics_log.write({"step": planned.index, "phase": planned.phase, "epoch": planned.epoch, **metrics,
                               "grad_norm": None if grad_norm is None else float(grad_norm),
                               "seconds": round(time.time() - step_t, 3)})
        if cfg.train.log_every and (planned.index + 1) % cfg.train.log_every == 0 and last_loss is not None:
            bar.set_postfix(loss=f"{last_loss:.4f}")
        bar.update(1)
        done = planned.index + 1
        if comm.is_main and cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done < len(plan):
            save_checkpoint(run_dir, done, model, optimizer, method, logs)
        if on_step:
            on_step(planned.index)
    bar.close()
    if not same_on_all(comm, params):
        raise DualSelectError(f"the {comm.world_size} processes ended with different parameters (a bug in the "
                              "sharing of updates); no adapter was written")
    if comm.world_size > 1:
        log.info("the %d processes ended with identical parameters (checksum)", comm.world_size)
    adapter_dir = run_dir / "adapter"
    if comm.is_main:
        save_checkpoint(run_dir, len(plan), model, optimizer, method, logs)
        _atomic_dir(adapter_dir, lambda tmp: model.save_pretrained(tmp))
        record_budget(run_dir, read_jsonl(run_dir / "metrics.jsonl"))
    comm.barrier()  # the run dir is complete when train() returns, in every process
    result = TrainResult(run_dir, adapter_dir, len(plan), last_loss, time.time() - t0, peak_rss_mb(), start)
    log.info("done: %d steps in %.1f s, peak RSS %.0f MB; adapter at %s", len(plan), result.seconds,
             result.peak_rss_mb, adapter_dir)
    return result


def _same_start(comm, params, seed: int, start: int) -> None:
    """Several processes: all start from the main process's parameters (as DDP does), and from here each draws
    its own LoRA dropout masks (a seed of its own: the masks of a sample differ from a one-process run's anyway;
    a resumed run draws new ones)."""
    with torch.no_grad():
        for p in params:
            p.copy_(comm.broadcast(p))
    torch.manual_seed(seed + 1_000_003 * (comm.rank + 1) + start)


def _engine_record(engine, run_dir: Path, resume: bool) -> dict:
    """run_info.json's grad_engine entry. `auto` resumes with the engine the run started with (read back from
    run_info.json, not probed again), and records its probe there when it makes it."""
    if not isinstance(engine, AutoEngine):
        return {"requested": engine.name, "used": engine.name}
    earlier = read_run_info(run_dir).get("grad_engine") if resume else None
    if earlier and earlier.get("used"):
        engine.use(earlier)
        log.info("grad_engine auto: %s, as chosen when this run started", earlier["used"])
    engine.on_choice = lambda record: update_run_info(run_dir, "grad_engine", record)
    return engine.record


def _sample_ids(method, ctx: TrainContext, planned) -> list[str]:
    """Ids of the samples of a step: the method's sample_ids(planned) where its steps draw on other data than the
    task list (e.g. alignment batches), else the task ids of planned.ids."""
    if hasattr(method, "sample_ids"):
        return method.sample_ids(planned)
    return [ctx.task[i].id for i in planned.ids]


def _samples(data: str | None, ids: list[str]) -> str:
    return f"{data} samples {show_ids(ids)}" if data else f"the step's samples {show_ids(ids)}"


def _stopped(e: NonFiniteError, planned, run_dir: Path) -> NonFiniteError:
    """train.nonfinite=stop: the one-line error that ends the run (nothing of the step was applied)."""
    ckpt = latest_checkpoint(run_dir)
    kept = (f"its last checkpoint {ckpt.relative_to(run_dir)} is intact" if ckpt else
            "no checkpoint was saved before it (train.checkpoint_every)")
    return NonFiniteError(e.ids, e.what, e.data, message=(
        f"step {planned.index} (epoch {planned.epoch}, {planned.phase}): non-finite {e.what} (NaN or inf) on "
        f"{_samples(e.data, e.ids)}; the run stopped without this update and {kept}, no adapter was written; "
        f"fix: check or remove these samples, lower train.lr or use model.precision=fp32, or set "
        f"train.nonfinite=skip to skip such steps (--resume continues this run)"))


def _restore(ckpt: Path, model, optimizer, method, logs: dict[str, JsonlLog]) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(ckpt / "state.pt", weights_only=False)
    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    method.load_state_dict(state["method"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for name, lg in logs.items():
        lg.truncate(state["log_offsets"][name])
    return state["step"]
