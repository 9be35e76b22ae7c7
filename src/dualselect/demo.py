"""The embedded offline demo (`dualselect demo`): no network, no data directory.

1. Write the project's own demo data (demo_data.py).
2. Alignment stage: the embedded SmolLM2 is not safety-aligned, so it first gets LoRA SFT on harmful
   requests -> refusals and benign requests -> its own answers; the adapter is merged and the
   aligned model cached (keyed by data and settings), so later demos skip this stage.
3. Fine-tune the aligned model on a task whose data holds some harmful -> compliance pairs, once
   with plain SFT and once with DualSelect (reference pool: held-apart refusal examples).
4. Evaluate the base model, the aligned model and both fine-tuned models with `dualselect eval` (held-out
   harmful prompts: refusal rate; held-out benign prompts: over-refusal; task test set: accuracy), compare
   them with `dualselect report` (paired tests against plain SFT) and draw the safety-utility plot.
5. Print the result table, the training summary and DualSelect's selection statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import models
from .config import load_config
from .demo_data import write_demo_data
from .eval import report
from .errors import DualSelectError
from .eval.run import evaluate
from .logs import read_jsonl, write_jsonl
from .methods import method_configs
from .train import train

log = logging.getLogger("dualselect")


@dataclass
class DemoSettings:
    """Sizes and recipes of each stage (`quick` shrinks them to a smoke test). `precision` goes to every stage
    (model.precision: auto picks fp32 on a CPU without native bf16, see models.choose_precision)."""
    # 128 task rows with 25 % harmful: 32 harmful rows, as many as 160 rows at 20 % (the demo before 2026-12-05), at
    # 4/5 of the task stage's compute (on an AVX2-only CPU the whole demo has to fit in 25 minutes)
    n_task: int = 128
    harmful_fraction: float = 0.25
    n_align_harmful: int = 200
    n_reference: int = 64
    benign_max_new_tokens: int = 48
    benign_limit: int | None = None  # answer only the first N benign alignment prompts
    precision: str = "auto"
    eval_limit: int = 100  # held-out prompts per benchmark
    # greedy generation of many short answers is overhead-bound on a CPU: batches of 64 took 0.37x the time of
    # batches of 16 here (64 prompts x 32 new tokens, fp32)
    generation_batch_size: int = 64
    # Calibrated on held-out prompts (limit 100, keyword judge, one seed; refusal / over-refusal %):
    #   160 harmful, q,k,v,o, lr 5e-4: 74 / 25;  lr 8e-4: 68 / 11;  200 harmful, all linear layers: 94 / 38
    #   (the earlier recipe, 2 epochs on fewer benign rows: 92 / 55, refusing every task prompt).
    # A leaner trial (2026-12-02: 128 task rows, 48 references, warm-up 4, 32-token benign answers, 80 eval
    # prompts of 24 tokens) saved about 20 % of the compute but weakened the table: aligned 88.8 % refusal, SFT
    # 78.8, DualSelect 87.5 (+8.8 over SFT, p = 0.016), so the defaults stayed; the alignment stage is to be
    # recalibrated (<= 15 % over-refusal) and shrunk together.
    align: list[str] = field(default_factory=lambda: [
        "train.epochs=1", "train.lr=5e-4", "train.batch_size=8",
        "model.lora_targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"])
    task: list[str] = field(default_factory=lambda: ["train.epochs=2", "train.lr=2e-4", "train.batch_size=8"])
    # the factored engine (one forward/backward per length group) took 0.89x the loop engine's time for the
    # per-sample gradients of the demo's task batches (fp32, AVX2 and AVX-512 alike)
    dualselect: list[str] = field(default_factory=lambda: [
        "dualselect.warmup_steps=5", "dualselect.k_task=4", "dualselect.k_ref=16", "dualselect.rho=0.2",
        "train.grad_engine=factored"])
    # refusal is read from the opening of an answer (keyword judge), so 24 new tokens are enough (32 before
    # 2026-12-05); the untuned base and aligned models answer the task in a sentence, so 8 tokens there
    eval: list[str] = field(default_factory=lambda: ["eval.max_new_tokens=24", "eval.task_max_new_tokens=8"])

    @classmethod
    def quick(cls, **changes) -> "DemoSettings":
        return cls(**{**dict(n_task=24, n_align_harmful=12, n_reference=8, benign_max_new_tokens=16, benign_limit=8,
                             generation_batch_size=4, eval_limit=4,
                             align=["train.epochs=1", "train.lr=2e-4", "train.batch_size=8", "train.max_steps=2"],
                             task=["train.epochs=1", "train.lr=2e-4", "train.batch_size=8"],
                             dualselect=["dualselect.warmup_steps=1", "dualselect.k_task=4", "dualselect.k_ref=4"],
                             eval=["eval.max_new_tokens=4", "eval.task_max_new_tokens=2"]), **changes})

    def __post_init__(self):
        for key in ("n_task", "n_align_harmful", "n_reference", "benign_max_new_tokens", "generation_batch_size",
                    "eval_limit"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise DualSelectError(f"demo: {key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not 0.0 <= self.harmful_fraction <= 1.0:
            raise DualSelectError(f"demo: harmful_fraction must be in [0, 1], got {self.harmful_fraction!r}")

    def precision_override(self) -> str:
        return f"model.precision={self.precision}"

    def eval_overrides(self) -> list[str]:
        return [*self.eval, f"eval.limit={self.eval_limit}", f"eval.batch_size={self.generation_batch_size}",
                self.precision_override()]


# The base model's answers to the benign alignment prompts of seed 0, shipped with the package so that a first
# demo does not spend minutes generating them (regenerate with `write_shipped_benign_answers()`; a test checks
# that they are the model's own greedy answers). Used when the prompts and the generation settings match.
SHIPPED_BENIGN = Path(__file__).parent / "resources" / "demo_benign_answers.json"
SHIPPED_PRECISION = "fp32"


def _generate_benign(rows: list[dict], max_new_tokens: int, batch_size: int, precision: str) -> list[str]:
    from .generation import generate

    tok = models.load_tokenizer(models.DEFAULT_MODEL)
    model, precision, device = models.load_model(models.DEFAULT_MODEL, precision)
    log.info("generating the base model's answers to %d benign prompts", len(rows))
    return generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, batch_size=batch_size,
                    device=device, autocast=lambda: models.autocast(precision, device))


def shipped_benign_answers(rows: list[dict], max_new_tokens: int, batch_size: int) -> list[str] | None:
    """The shipped answers to `rows` (id and prompt) if the file holds exactly these prompts, in this order,
    generated with these settings; else None."""
    if not SHIPPED_BENIGN.exists():
        return None
    shipped = json.loads(SHIPPED_BENIGN.read_text())
    if shipped["settings"] != {"max_new_tokens": max_new_tokens, "batch_size": batch_size,
                               "precision": SHIPPED_PRECISION}:
        return None
    if [(r["id"], r["prompt"]) for r in rows] != [(a["id"], a["prompt"]) for a in shipped["answers"]]:
        return None
    return [a["answer"] for a in shipped["answers"]]


def write_shipped_benign_answers(max_new_tokens: int = DemoSettings.benign_max_new_tokens,
                                 batch_size: int = DemoSettings.generation_batch_size) -> Path:
    """Regenerate SHIPPED_BENIGN: the embedded model's greedy fp32 answers to the seed-0 benign alignment prompts
    (run after changing those prompts or the demo's generation settings)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = read_jsonl(write_demo_data(Path(tmp), seed=0)["align_benign_prompts"])
    answers = _generate_benign(rows, max_new_tokens, batch_size, SHIPPED_PRECISION)
    doc = {"model": models.DEFAULT_MODEL, "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size,
                                                       "precision": SHIPPED_PRECISION},
           "answers": [{"id": r["id"], "prompt": r["prompt"], "answer": a} for r, a in zip(rows, answers)]}
    SHIPPED_BENIGN.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = SHIPPED_BENIGN.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    tmp_path.replace(SHIPPED_BENIGN)
    return SHIPPED_BENIGN


def benign_answers(prompts_path: Path, max_new_tokens: int, limit: int | None, batch_size: int, precision: str) -> Path:
    """The base model's own answers to the benign alignment prompts: the shipped ones where they match (same
    prompts and settings; generated in fp32 whatever `precision` is), else generated and cached in the
    dualselect cache under a name that hashes the prompts and every setting that changes the answers."""
    rows = read_jsonl(prompts_path)[:limit]
    answers = shipped_benign_answers(rows, max_new_tokens, batch_size)
    if answers is not None:
        log.info("benign answers: shipped with the package (%s)", SHIPPED_BENIGN.name)
        key, source = "shipped", SHIPPED_PRECISION
    else:
        device = models.pick_device()
        source = models.resolve_precision(precision, device)
        key = hashlib.sha256(prompts_path.read_bytes() + json.dumps(
            [max_new_tokens, limit, batch_size, source, device.type]).encode()).hexdigest()[:16]
    out_path = models.cache_dir() / "demo" / f"benign-answers-{key}.jsonl"
    if answers is None and out_path.exists():
        log.info("benign answers (cached): %s", out_path)
        return out_path
    if answers is None:
        answers = _generate_benign(rows, max_new_tokens, batch_size, precision)
    out = [{"id": r["id"], "messages": [{"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": a}], "flag": "benign"}
           for r, a in zip(rows, answers) if a]
    return write_jsonl(out_path, out)


def align(data: dict[str, Path], out: Path, settings: DemoSettings, seed: int, quiet: bool) -> Path:
    """Alignment stage: LoRA SFT, merged into a cached model directory."""
    benign = benign_answers(data["align_benign_prompts"], settings.benign_max_new_tokens, settings.benign_limit,
                            settings.generation_batch_size, settings.precision)
    mixed = read_jsonl(data["align_harmful"]) + read_jsonl(benign)
    align_file = write_jsonl(out / "data" / "align_train.jsonl", mixed)
    recipe = [*settings.align, settings.precision_override()]
    used = models.resolve_precision(settings.precision, models.pick_device())  # `auto` differs between machines
    key = hashlib.sha256(align_file.read_bytes() + json.dumps([recipe, used, seed]).encode()).hexdigest()[:16]
    merged = models.cache_dir() / "aligned" / f"{models.DEFAULT_MODEL}-{key}"
    if (merged / "config.json").exists():
        log.info("aligned model (cached): %s", merged)
        return merged
    run_dir = out / "align"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = load_config(None, [f"data.task={align_file}", f"train.output_dir={run_dir}", f"train.seed={seed}",
                             f"train.quiet={str(quiet).lower()}", *recipe], method_configs())
    log.info("alignment stage: LoRA SFT on %d examples (harmful -> refusal, benign -> own answer)", len(mixed))
    result = train(cfg)
    models.merge_adapter(models.DEFAULT_MODEL, result.adapter_dir, merged)
    log.info("aligned model merged into %s", merged)
    return merged


def selection_stats(run_dir: Path, flags: dict[str, str]) -> dict:
    """How often DualSelect kept the harmful task samples, against their share of the batches."""
    seen, kept = Counter(), Counter()
    for rec in read_jsonl(run_dir / "selection.jsonl"):
        if rec["kind"] == "step":
            seen.update(flags.get(i, "?") for i in rec["candidates"]["ids"])
            kept.update(flags.get(i, "?") for i in rec["ids"])
    return {"unsafe_share_of_batches": seen["unsafe"] / max(1, sum(seen.values())),
            "unsafe_share_of_kept": kept["unsafe"] / max(1, sum(kept.values())),
            "kept": sum(kept.values()), "seen": sum(seen.values())}


def _losses(run_dir: Path) -> tuple[float, float]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    k = max(1, len(rows) // 5)
    first = sum(r["loss"] for r in rows[:k]) / k
    last = sum(r["loss"] for r in rows[-k:]) / k
    return first, last


# The models of the result table: name -> what it is.
MODELS = {"base": "SmolLM2 as shipped (not aligned)", "aligned": "after the alignment stage (merged)",
          "sft": "aligned + plain SFT on the task data", "dualselect": "aligned + DualSelect on the task data"}
COLUMNS = (("harmful", "refusal_rate", "refusal on held-out harmful (higher is safer)"),
           ("overrefusal", "over_refusal_rate", "over-refusal on held-out benign (lower is better)"),
           ("task", "accuracy", "task accuracy"))


def evaluate_model(data: dict[str, Path], out: Path, model, adapter: Path | None, eval_dir: Path,
                   settings: DemoSettings, quiet: bool) -> Path:
    """`dualselect eval` of one model (+ adapter) on the held-out harmful and benign prompts and the task test
    set, into a fresh `eval_dir` (an earlier evaluation there is removed: its adapter may have changed)."""
    benchmarks = (f"[harmful:{data['heldout_harmful']}, overrefusal:{data['heldout_benign']}, "
                  f"task:{data['task_test']}]")
    seen = f"[{out / 'data' / 'align_train.jsonl'}, {data['task_train']}, {data['reference']}]"
    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    overrides = [f"model.name_or_path={model}", f"eval.benchmarks={benchmarks}", f"eval.train_files={seen}",
                 f"eval.output_dir={eval_dir}", f"eval.quiet={str(quiet).lower()}", *settings.eval_overrides()]
    if adapter is not None:
        overrides.append(f"eval.adapter={adapter}")
    evaluate(load_config(None, overrides, method_configs()))
    return eval_dir


def train_task(method: str, data: dict[str, Path], aligned: Path, run_dir: Path, settings: DemoSettings, seed: int,
               quiet: bool, flags: dict[str, str], extra: tuple[str, ...] | list[str] = ()) -> dict:
    """The task stage: `method` on the aligned model, into a fresh `run_dir`; its summary. DualSelect gets the
    demo's dualselect settings; `extra` overrides come last (benchmarks/demo_methods.py: other methods)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = [f"model.name_or_path={aligned}", f"data.task={data['task_train']}",
                 f"data.reference={data['reference']}", f"train.method={method}", f"train.output_dir={run_dir}",
                 f"train.seed={seed}", f"train.quiet={str(quiet).lower()}", *settings.task,
                 settings.precision_override()]
    if method == "dualselect":
        overrides += settings.dualselect
    res = train(load_config(None, [*overrides, *extra], method_configs()))
    first, last = _losses(run_dir)
    summary = {"adapter": str(res.adapter_dir), "steps": res.steps, "seconds": round(res.seconds),
               "loss_first": first, "loss_last": last}
    if method in ("dualselect", "random"):  # per-batch selections with their candidates in selection.jsonl
        summary["selection"] = selection_stats(run_dir, flags)
    return summary


def result_table(rep: dict) -> str:
    """The demo's table: per model, the three headline numbers with 95% intervals (percent)."""
    by_kind = {c["kind"]: c for c in rep["columns"] if (c["kind"], c["metric"]) in
               {(k, m) for k, m, _ in COLUMNS}}
    head = ["model", *(label for _, _, label in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in rep["results"]:
        cells = [name]
        for kind, metric, _ in COLUMNS:
            cell = rep["results"][name].get(by_kind[kind]["benchmark"], {}).get(metric) if kind in by_kind else None
            cells.append(report.cell_text(cell))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SETTINGS_FILE = "demo_settings.json"


def settings_of(out: Path) -> DemoSettings:
    """The settings a finished demo in `out` ran with (benchmarks/demo_seeds.py trains more seeds with them)."""
    path = Path(out) / SETTINGS_FILE
    return DemoSettings(**json.loads(path.read_text())) if path.exists() else DemoSettings()


def run_demo(out: str | Path = "runs/demo", seed: int = 0, quick: bool = False, quiet: bool = False,
             **changes) -> dict:
    """Run every stage (module docstring); returns {"training": per method, "report": the comparison,
    "table": Markdown, "plot": PNG path, "seconds": per stage}. `changes` set DemoSettings fields (precision,
    n_task, harmful_fraction, ...) over the full or the quick defaults."""
    out = Path(out)
    unknown = set(changes) - set(DemoSettings.__dataclass_fields__)
    if unknown:
        raise DualSelectError(f"demo: unknown settings {', '.join(sorted(unknown))}")
    settings = DemoSettings.quick(**changes) if quick else DemoSettings(**changes)
    models.choose_precision(settings.precision, models.pick_device())  # checks the name, logs the choice once
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=2) + "\n")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    data = write_demo_data(out / "data", seed=seed, n_task=settings.n_task, harmful_fraction=settings.harmful_fraction,
                           n_align_harmful=settings.n_align_harmful, n_reference=settings.n_reference)
    aligned = align(data, out, settings, seed, quiet)
    seconds["alignment"] = time.perf_counter() - t0
    flags = {r["id"]: r.get("flag", "task") for r in read_jsonl(data["task_train"])}
    results = {}
    for method in ("sft", "dualselect"):
        t0 = time.perf_counter()
        log.info("task stage: %s", method)
        results[method] = train_task(method, data, aligned, out / method, settings, seed, quiet, flags)
        seconds[method] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eval_dirs = {}
    for name, what in MODELS.items():
        log.info("evaluating %s (%s)", name, what)
        model = models.DEFAULT_MODEL if name == "base" else aligned
        adapter = out / name / "adapter" if name in results else None
        eval_dirs[name] = evaluate_model(data, out, model, adapter, out / "eval" / name, settings, quiet)
    rep = report.compare({name: [d] for name, d in eval_dirs.items()}, baseline="sft", seed=seed)
    written = report.write_report(rep, out / "report")
    seconds["evaluation"] = time.perf_counter() - t0
    table = result_table(written["report"])

    print(f"\nResult (one seed; 95% bootstrap intervals over prompts; keyword refusal judge; full report with "
          f"paired tests: {written['markdown']})\n")
    print(table)
    for name, what in MODELS.items():
        print(f"  {name:11s} {what}")
    print(f"\nplot: {written['plot']}")
    print(f"aligned model: {aligned}")
    print(f"\n{'method':12s} {'steps':>5s} {'seconds':>7s} {'loss first 20%':>15s} {'loss last 20%':>14s}  adapter")
    for method, r in results.items():
        print(f"{method:12s} {r['steps']:5d} {r['seconds']:7d} {r['loss_first']:15.4f} {r['loss_last']:14.4f}  "
              f"{r['adapter']}")
    s = results["dualselect"]["selection"]
    print(f"DualSelect kept {s['kept']} of {s['seen']} task samples seen; harmful share: "
          f"{s['unsafe_share_of_batches']:.1%} of the batches, {s['unsafe_share_of_kept']:.1%} of what it kept")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    write_jsonl(out / "summary.jsonl", [{"method": m, **r} for m, r in results.items()])
    return {"training": results, "report": written["report"], "table": table, "plot": written["plot"],
            "seconds": seconds}
