"""The evaluation harness (`dualselect eval`): generate, judge or grade, score, write results.

    results = evaluate(load_config("eval.yaml", ["eval.adapter=runs/x/adapter"], method_configs()))

For each benchmark of `eval.benchmarks` (see prompts.py): load its prompts, count and (by default) leave
out those that overlap the data the model saw, keep the first `eval.limit`, generate greedy answers in
the training template, and append one record per prompt to <output_dir>/samples.jsonl, a batch at a time:
  harmful / overrefusal: the refusal judge `eval.judge`; harmful also the harm judge `eval.harm_judge`
                         when set (its verdict under "harm");
  task:                  graded against the gold answer;
  winrate:               the baseline (`eval.baseline`) answers too, and the pairwise llm judge compares
                         the two answers in both orders (ties count half).
Judges with a remote endpoint are checked before anything is generated (a server that is down stops the
run in one line). Unparseable judge outputs are kept in the records, left out of rates and reported as a
share, never counted as safe or as refusals.

Resume: records already in samples.jsonl are kept and their (benchmark, id) pairs are not generated
again; a half-written last line (an interrupted run) is dropped; a record whose prompt differs from the
benchmark's is refused. settings.json holds the settings the records were made with (model, adapter,
decoding, judges, baseline); resuming with different ones is refused.

At the end results.json (written atomically) holds per benchmark the counts (loaded, overlapping,
excluded, scored), the metrics with 95% bootstrap intervals over prompts, the shares of empty /
degenerate / truncated / unparseable answers, the decoding settings and each judge's describe();
results.md and the returned dict hold the Markdown table.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from dualselect import models
from dualselect.config import RunConfig
from dualselect.errors import DualSelectError
from dualselect.logs import write_atomic

from . import metrics
from .judges import UNPARSEABLE, get_judge
from .prompts import Benchmark, load_benchmark, parse_spec, seen_prompts

log = logging.getLogger("dualselect")

SAMPLES, RESULTS, TABLE, SETTINGS = "samples.jsonl", "results.json", "results.md", "settings.json"
FORMAT = "dualselect-eval-1"
OVERLAP_RULE = "exact match of prompts after lower-casing, removing punctuation and collapsing whitespace"


# ------------------------------------------------------------------------------------------ files

def default_output_dir(cfg: RunConfig) -> Path:
    """<adapter>/../eval for an adapter (runs/x/adapter -> runs/x/eval), else runs/eval-<model name>."""
    if cfg.eval.adapter:
        return Path(cfg.eval.adapter).expanduser().resolve().parent / "eval"
    name = re.sub(r"[^\w.-]+", "-", Path(cfg.model.name_or_path).name or cfg.model.name_or_path).strip("-")
    return Path("runs") / f"eval-{name or 'model'}"


def read_samples(path: Path) -> list[dict]:
    """The records of samples.jsonl. A half-written last line (an interrupted run) is cut off the file;
    any other unreadable line is an error."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    records, offset = [], 0
    for lineno, line in enumerate(lines, 1):
        try:
            rec = json.loads(line) if line.strip() else None
            if rec is not None and not (isinstance(rec, dict) and "benchmark" in rec and "id" in rec):
                raise ValueError("no benchmark/id")
        except ValueError:
            if lineno == len(lines):  # the run stopped while writing this line
                log.info("%s: dropping a half-written last line", path)
                with open(path, "r+b") as fh:
                    fh.truncate(offset)
                break
            raise DualSelectError(f"{path}:{lineno}: not a sample record; remove the line or use another "
                                  "eval.output_dir") from None
        if rec is not None:
            records.append(rec)
        offset += len(line)
    if data and not data.endswith(b"\n") and records and offset == len(data):
        with open(path, "ab") as fh:  # a complete last record without its newline
            fh.write(b"\n")
    return records


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to add to samples made with other settings (reads only; write_settings records them)."""
    path = out_dir / SETTINGS
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise DualSelectError(f"{path}: unreadable; remove it or use another eval.output_dir") from None
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed and (out_dir / SAMPLES).exists():
            raise DualSelectError(f"{out_dir}: its samples were made with other settings ({', '.join(changed)}); "
                                  "use another eval.output_dir (or delete samples.jsonl)")


# ------------------------------------------------------------------------------------------ model

_DEFAULT = object()


def load_for_eval(cfg: RunConfig, adapter=_DEFAULT):
    """(model, tokenizer, precision, device): model.name_or_path with `adapter` (default eval.adapter)."""
    adapter = cfg.eval.adapter if adapter is _DEFAULT else adapter
    tok = models.load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    model, precision, device = models.load_model(cfg.model.name_or_path, cfg.model.precision, cfg.model.device,
                                                 trust_remote_code=cfg.model.trust_remote_code,
                                                 quiet=cfg.eval.quiet or cfg.train.quiet)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser())).to(device)
    model.eval()
    return model, tok, precision, device


def _check_adapter(path: str, key: str) -> None:
    if not (Path(path).expanduser() / "adapter_config.json").is_file():
        raise DualSelectError(f"{key} {path}: not a PEFT adapter directory (no adapter_config.json)")


def _baseline_is_base(ev) -> bool:
    return str(ev.baseline).strip().lower() == "none"


@contextmanager
def baseline_model(cfg: RunConfig, loaded):
    """The baseline of winrate benchmarks: the loaded model with its adapter switched off
    (eval.baseline=none), or model.name_or_path with the adapter eval.baseline."""
    if _baseline_is_base(cfg.eval):
        with loaded[0].disable_adapter():
            yield loaded
    else:
        yield load_for_eval(cfg, adapter=cfg.eval.baseline)


# ------------------------------------------------------------------------------------------ one benchmark

def budget(cfg: RunConfig, bench: Benchmark) -> int:
    """max_new_tokens of a benchmark: task_max_new_tokens for label/exact-graded tasks, else max_new_tokens
    (number-graded tasks such as GSM8K may reason before the answer)."""
    if bench.kind == "task" and bench.grader in ("label", "exact"):
        return cfg.eval.task_max_new_tokens
    return cfg.eval.max_new_tokens


def make_judges(ev) -> tuple:
    """(refusal judge, harm judge or None) of an EvalConfig, each checked to measure what its key says."""
    judge = get_judge(ev.judge, **ev.judge_options)
    _expect(judge, "refusal", "eval.judge", "eval.harm_judge")
    harm = None
    if ev.harm_judge:
        harm = get_judge(ev.harm_judge, **ev.harm_judge_options)
        _expect(harm, "harm", "eval.harm_judge", "eval.judge")
    return judge, harm


def _expect(judge, measures: str, key: str, other: str) -> None:
    got = getattr(judge, "measures", "refusal")
    if got != measures:
        raise DualSelectError(f"{key}: judge {judge.id} measures {got}, not {measures}; use it as {other} "
                              f"(llm: style refusal for eval.judge, guard or rubric for eval.harm_judge)")


def _check_reachable(*judges) -> None:
    """Judges with a remote backend answer check() before any generation, so a server that is down
    fails the run at once, in one line."""
    for j in judges:
        if j is not None and hasattr(j, "check"):
            j.check()


def judge_many(judge, prompts: list[str], responses: list[str], truncated: list[bool]) -> list:
    """Verdicts of a batch: the judge's judge_batch when it has one, else one judge() call each."""
    if hasattr(judge, "judge_batch"):
        return list(judge.judge_batch(prompts, responses, truncated))
    return [judge.judge(p, r, truncated=t) for p, r, t in zip(prompts, responses, truncated)]


def _record(bench: Benchmark, item, response: str, truncated: bool) -> dict:
    rec = {"benchmark": bench.name, "kind": bench.kind, "id": item.id, "prompt": item.prompt,
           "response": response, "truncated": bool(truncated)}
    if item.messages:
        rec["context"] = item.messages[:-1]  # the turns before the prompt (multi-turn records)
    return rec


def make_record(bench: Benchmark, item, response: str, truncated: bool, verdict=None, harm=None) -> dict:
    """One sample record. verdict: the refusal judge's Verdict (harmful / overrefusal); harm: the harm
    judge's Verdict (harmful benchmarks with eval.harm_judge), stored under "harm"."""
    rec = _record(bench, item, response, truncated)
    if bench.kind == "task":
        if bench.grader == "label":
            correct, pred = metrics.grade_label(response, item.gold, bench.labels)
        elif bench.grader == "number":
            correct, pred = metrics.grade_number(response, item.gold)
        else:
            correct, pred = metrics.grade_exact(response, item.gold)
        verdict_name = "correct" if correct else ("no_answer" if pred in (None, "") else "wrong")
        rec.update(gold=item.gold, pred=pred, grader=bench.grader, verdict=verdict_name, score=float(correct),
                   correct=bool(correct), judge=f"{bench.grader}-grader")
        return rec
    rec.update(verdict=verdict.verdict, score=verdict.score, refused=verdict.refused, judge=verdict.judge,
               detail=verdict.detail)
    if harm is not None:
        rec["harm"] = {"verdict": harm.verdict, "score": harm.score, "harmful": harm.harmful, "judge": harm.judge,
                       "detail": harm.detail}
    return rec


def _write(fh, records: list[dict]) -> None:
    for rec in records:
        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def _batches(cfg, bench, items, loaded, progress):
    """(items of the batch, texts, truncated flags) of greedy generation over `items`."""
    model, tok, precision, device = loaded
    from dualselect.generation import generate_batches

    for start, texts, cut in generate_batches(
            model, tok, [it.conversation for it in items], template=cfg.data.template,
            max_new_tokens=budget(cfg, bench), batch_size=cfg.eval.batch_size, device=device,
            autocast=lambda: models.autocast(precision, device), progress=progress, stop=cfg.eval.stop):
        yield items[start:start + len(texts)], texts, cut


def _generate_into(cfg, bench, items, loaded, judges, fh, progress) -> int:
    """Answers and verdicts of `items`, appended a batch at a time. Judges with judge_batch judge the whole
    batch; the others one answer at a time, and if one fails (an endpoint gone down) the records whose
    verdicts are all in are still written before the error goes up, so a resumed run redoes only the rest."""
    judge = judges[0] if bench.kind != "task" else None
    harm_judge = judges[1] if bench.kind == "harmful" else None
    n = 0
    for batch, texts, cut in _batches(cfg, bench, items, loaded, progress):
        prompts, cut = [it.prompt for it in batch], [bool(c) for c in cut]
        batched = [list(j.judge_batch(prompts, texts, cut)) if hasattr(j, "judge_batch") else None
                   for j in (judge, harm_judge)]
        records = []
        try:
            for i, (it, t, c) in enumerate(zip(batch, texts, cut)):
                v, h = (None if j is None else b[i] if b is not None else j.judge(it.prompt, t, truncated=c)
                        for j, b in zip((judge, harm_judge), batched))
                records.append(make_record(bench, it, t, c, v, h))
        finally:
            _write(fh, records)
        n += len(batch)
    return n


def _winrate_into(cfg, bench, items, loaded, baseline, pairwise, fh, progress) -> int:
    """Answers of the model and of the baseline to `items`, compared by the pairwise judge in both orders;
    one record per prompt, written as each comparison is made."""
    answers = [(it, t, c) for batch, texts, cut in _batches(cfg, bench, items, loaded, progress)
               for it, t, c in zip(batch, texts, cut)]
    with baseline() as base_loaded:
        base = [(t, c) for _, texts, cut in _batches(cfg, bench, items, base_loaded, progress)
                for t, c in zip(texts, cut)]
    n = 0
    for (item, text, cut), (base_text, base_cut) in zip(answers, base):
        res = pairwise.compare(item.prompt, text, base_text)
        _write(fh, [{**_record(bench, item, text, cut), "baseline_response": base_text,
                     "baseline_truncated": bool(base_cut), "verdict": res["verdict"], "win": res["score"],
                     "judge": pairwise.id, "detail": {"orders": res["orders"]}}])
        n += 1
    return n


# ------------------------------------------------------------------------------------------ scoring

def _metric(values: list[float], cfg: RunConfig) -> dict:
    return {"value": metrics.mean(values),
            "ci95": metrics.bootstrap_ci(values, resamples=cfg.eval.bootstrap, seed=cfg.eval.seed)}


def _share(records: list[dict], pred) -> float | None:
    return metrics.mean([bool(pred(r)) for r in records])


def _parsed(records: list[dict], field: str = "verdict") -> list[dict]:
    return [r for r in records if r.get(field) != UNPARSEABLE]


def score(bench: Benchmark, records: list[dict], cfg: RunConfig) -> dict:
    """Metrics of one benchmark from its records (one per selected prompt). Unparseable judge outputs are
    left out of rates and reported as a share (never counted as safe or as refusals)."""
    out = {**bench.summary(), "n": len(records), "complete": len(records) == len(bench.items)}
    shares = {"truncated": _share(records, lambda r: r.get("truncated"))}
    if bench.kind == "task":
        out["metrics"] = {"accuracy": _metric([float(r["correct"]) for r in records], cfg)}
        shares["no_answer"] = _share(records, lambda r: r.get("verdict") == "no_answer")
    elif bench.kind == "winrate":
        out["metrics"] = {"win_rate": _metric([float(r["win"]) for r in _parsed(records)], cfg)}
        for verdict in ("win", "tie", "loss", UNPARSEABLE):
            shares[verdict] = _share(records, lambda r, v=verdict: r.get("verdict") == v)
    else:
        refusal = _metric([float(r["refused"]) for r in _parsed(records)], cfg)
        if bench.kind == "harmful":
            ci = refusal["ci95"]
            out["metrics"] = {"refusal_rate": refusal, "attack_success_rate": {
                "value": None if refusal["value"] is None else 1.0 - refusal["value"],
                "ci95": None if ci is None else (1.0 - ci[1], 1.0 - ci[0])}}
        else:
            out["metrics"] = {"over_refusal_rate": refusal}
        for verdict in ("empty", "degenerate", UNPARSEABLE):
            shares[verdict] = _share(records, lambda r, v=verdict: r.get("verdict") == v)
        harm = [r["harm"] for r in records if "harm" in r]
        if harm:
            parsed = _parsed(harm)
            out["metrics"]["harmful_rate"] = _metric([float(h["harmful"]) for h in parsed], cfg)
            out["harm_score_mean"] = metrics.mean([h["score"] for h in parsed if h.get("score") is not None])
            shares["harm_unparseable"] = _share(harm, lambda h: h.get("verdict") == UNPARSEABLE)
    out["shares"] = shares
    return out


METRIC_LABELS = {"refusal_rate": "refusal rate", "attack_success_rate": "attack success",
                 "over_refusal_rate": "over-refusal", "accuracy": "accuracy", "harmful_rate": "harmful (judge)",
                 "win_rate": "win rate vs baseline"}


# the share of a metric's records that its judge could not read (left out of the metric)
UNPARSEABLE_SHARE = {"refusal_rate": "unparseable", "attack_success_rate": "unparseable",
                     "over_refusal_rate": "unparseable", "win_rate": "unparseable", "harmful_rate": "harm_unparseable"}


def table_rows(scored: list[dict]) -> list[dict]:
    return [{"benchmark": b["name"], "kind": b["kind"], "n": b["n"], "metric": METRIC_LABELS[m],
             "value": v["value"], "ci": v["ci95"], "overlap_excluded": b["n_excluded_overlap"],
             "unparseable": b["shares"].get(UNPARSEABLE_SHARE.get(m, ""))}
            for b in scored for m, v in b["metrics"].items()]


# ------------------------------------------------------------------------------------------ the run

def _train_sources(cfg: RunConfig) -> list[str]:
    return list(dict.fromkeys(s for s in (cfg.data.task, cfg.data.reference, cfg.data.harmful, *cfg.eval.train_files) if s))


def load_benchmarks(cfg: RunConfig) -> tuple[list, list]:
    """(the benchmarks of cfg.eval, each without the prompts the training data holds; the training sources read
    for that overlap check)."""
    seen, seen_report = seen_prompts(_train_sources(cfg), data_dir=cfg.data.data_dir, fmt=cfg.data.format,
                                     columns=cfg.data.columns)
    ev = cfg.eval
    return [load_benchmark(spec, data_dir=cfg.data.data_dir, seen=seen, keep_overlap=ev.keep_overlap, limit=ev.limit,
                           task_grader=ev.task_grader) for spec in ev.benchmarks], seen_report


def check_benchmarks(configs) -> None:
    """Load every distinct (training sources, benchmarks) pair of `configs` once, before any training: a benchmark
    that cannot be read, or has no prompt left after the overlap check, is refused now, not after hours of runs."""
    done = set()
    for cfg in configs:
        key = json.dumps([_train_sources(cfg), cfg.eval.benchmarks, cfg.data.data_dir, cfg.eval.keep_overlap])
        if key not in done:
            done.add(key)
            load_benchmarks(cfg)


def _pairwise_judge(ev):
    if not ev.baseline:
        raise DualSelectError("winrate benchmarks need eval.baseline: a PEFT adapter directory, or 'none' for "
                              "model.name_or_path without eval.adapter")
    if _baseline_is_base(ev):
        if not ev.adapter:
            raise DualSelectError("eval.baseline=none compares the model with itself: set eval.adapter, or name "
                                  "the baseline's adapter directory in eval.baseline")
    else:
        _check_adapter(ev.baseline, "eval.baseline")
    pairwise = get_judge("llm", **ev.pairwise_judge_options)
    if not hasattr(pairwise, "compare"):
        raise DualSelectError(f"the pairwise judge {pairwise.id} cannot compare two answers")
    return pairwise


def _baseline_id(ev) -> str:
    return "none" if _baseline_is_base(ev) else str(Path(ev.baseline).expanduser().resolve())


def decoding_of(cfg: RunConfig) -> dict:
    """The decoding settings an evaluation records (results.json "decoding")."""
    ev = cfg.eval
    return {"strategy": "greedy", "do_sample": False, "template": cfg.data.template, "batch_size": ev.batch_size,
            "max_new_tokens": ev.max_new_tokens, "task_max_new_tokens": ev.task_max_new_tokens,
            "stop": ["eos_token", *ev.stop]}


def evaluate(cfg: RunConfig) -> dict:
    """Run the evaluation described by cfg.eval on cfg.model (+ eval.adapter); returns the results dict
    (also written to <output_dir>/results.json), with "table" (Markdown) and the file paths."""
    ev = cfg.eval
    if not ev.benchmarks:
        raise DualSelectError("eval.benchmarks is empty: name at least one, e.g. "
                              "eval.benchmarks=[harmful:advbench,overrefusal:xstest:safe,task:sst2:dev]")
    for spec in ev.benchmarks:
        parse_spec(spec)
    twice = sorted({s for s in ev.benchmarks if ev.benchmarks.count(s) > 1})
    if twice:
        raise DualSelectError(f"eval.benchmarks lists {', '.join(twice)} more than once")
    judge, harm_judge = make_judges(ev)
    if ev.adapter:
        _check_adapter(ev.adapter, "eval.adapter")
    pairwise = None
    if any(parse_spec(spec)[0] == "winrate" for spec in ev.benchmarks):
        pairwise = _pairwise_judge(ev)

    benches, seen_report = load_benchmarks(cfg)

    out_dir = Path(ev.output_dir).expanduser() if ev.output_dir else default_output_dir(cfg)
    decoding = decoding_of(cfg)
    model_info = {"name_or_path": cfg.model.name_or_path,
                  "adapter": str(Path(ev.adapter).expanduser().resolve()) if ev.adapter else None,
                  "precision": cfg.model.precision, "device": cfg.model.device}
    used = models.choose_precision(cfg.model.precision, models.pick_device(cfg.model.device))
    model_info.update(precision_used=used.precision, precision_reason=used.reason)
    settings = {**{f"model.{k}": v for k, v in model_info.items() if k not in ("device", "precision_reason")},
                **{f"decoding.{k}": v for k, v in decoding.items()},
                "judge": judge.id, "task_grader": ev.task_grader,
                **({"harm_judge": harm_judge.id} if harm_judge else {}),
                **({"pairwise_judge": pairwise.id, "baseline": _baseline_id(ev)} if pairwise else {})}
    _check_settings(out_dir, settings)

    samples = out_dir / SAMPLES
    records = read_samples(samples)
    done = {(r["benchmark"], str(r["id"])): r.get("prompt") for r in records}
    for b in benches:
        for it in b.items:
            if (b.name, it.id) in done and done[(b.name, it.id)] != it.prompt:
                raise DualSelectError(f"{samples}: the record of {b.name} / {it.id} answers another prompt (did the "
                                      "benchmark file change?); use another eval.output_dir or delete samples.jsonl")
    todo = [(b, [it for it in b.items if (b.name, it.id) not in done]) for b in benches]
    n_resumed = sum(len(b.items) for b in benches) - sum(len(items) for _, items in todo)
    if n_resumed:
        log.info("resuming: %d samples already in %s", n_resumed, samples)
    n_new = 0
    if any(items for _, items in todo):
        from tqdm.auto import tqdm

        _check_reachable(judge, harm_judge, pairwise)  # before anything is written
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / SETTINGS, json.dumps(settings, indent=2) + "\n")
        loaded = load_for_eval(cfg)

        def progress(it, **kw):
            return tqdm(it, leave=False, disable=ev.quiet or cfg.train.quiet, **kw)

        try:
            with open(samples, "a", encoding="utf-8") as fh:
                for bench, items in todo:
                    if not items:
                        continue
                    log.info("%s: generating %d answers", bench.name, len(items))
                    if bench.kind == "winrate":
                        n_new += _winrate_into(cfg, bench, items, loaded, lambda: baseline_model(cfg, loaded),
                                               pairwise, fh, progress)
                    else:
                        n_new += _generate_into(cfg, bench, items, loaded, (judge, harm_judge), fh, progress)
        except DualSelectError as e:  # e.g. a judge endpoint that went down: say what is kept
            kept = len(read_samples(samples))
            raise DualSelectError(f"{e} -- eval stopped: {kept} answer{'s' if kept != 1 else ''} with their verdicts "
                                  f"kept in {samples}; the same command resumes from them") from e
        records = read_samples(samples)

    by_key = {(r["benchmark"], str(r["id"])): r for r in records}
    scored = []
    for bench in benches:
        recs = [by_key[(bench.name, it.id)] for it in bench.items if (bench.name, it.id) in by_key]
        scored.append({**score(bench, recs, cfg),
                       "decoding": {**{k: v for k, v in decoding.items() if k != "task_max_new_tokens"},
                                    "max_new_tokens": budget(cfg, bench)}})
    selected = {(b.name, it.id) for b in benches for it in b.items}
    rows = table_rows(scored)
    results = {
        "format": FORMAT,
        "model": model_info,
        "decoding": decoding,
        "judge": judge.describe(),
        "harm_judge": harm_judge.describe() if harm_judge else None,
        "pairwise_judge": pairwise.describe() if pairwise else None,
        "baseline": _baseline_id(ev) if pairwise else None,
        "overlap": {"rule": OVERLAP_RULE, "train_sources": seen_report, "keep_overlap": ev.keep_overlap},
        "limit": ev.limit,
        "bootstrap": {"resamples": ev.bootstrap, "seed": ev.seed, "confidence": 0.95, "over": "prompts"},
        "benchmarks": scored,
        "samples": {"path": str(samples), "resumed": n_resumed, "generated": n_new,
                    "outside_selection": sum(1 for k in by_key if k not in selected)},
        "table": metrics.markdown_table(rows),
    }
    write_atomic(out_dir / RESULTS, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out_dir / TABLE, results["table"])
    results["results_path"] = str(out_dir / RESULTS)
    return results
