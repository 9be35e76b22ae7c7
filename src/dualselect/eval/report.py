"""Seed-aware comparison of methods (`dualselect report`): means over seeds with intervals, paired tests.

    report = compare({"sft": [Path("runs/sft-s1/eval"), Path("runs/sft-s2/eval"), Path("runs/sft-s3/eval")],
                      "dualselect": [Path("runs/ds-s1/eval"), ...]}, baseline="sft")
    print(markdown(report))
    plot(report, "safety_utility.png")           # x: task accuracy, y: harmful refusal rate
    write_report(report, "runs/report")          # report.json, report.md, report.html, PNG figures

Input: per method, one `dualselect eval` output dir per seed (results.json + samples.jsonl). The per-prompt
values come from samples.jsonl (VALUE_RULES: one line per metric); results.json names the benchmarks, how
many prompts each scored, the judge and the decoding settings, which must agree across all evaluations.

Statistics (evaluation protocols, "Statistics"):
- a method's number on a benchmark metric is the mean over seeds of the per-seed mean over prompts; its 95%
  interval is a two-level percentile bootstrap (seeds with replacement, then prompts with replacement within
  each drawn seed); fewer than 3 seeds is flagged;
- a method against the baseline: prompts paired by id, per prompt the mean over each method's seeds; the mean
  difference with a percentile bootstrap interval over prompts and a two-sided sign-flip permutation test
  (exact enumeration up to EXACT_MAX non-zero differences).
The random draws of each (method, benchmark, metric) are seeded from the report seed and that cell's names,
so a number does not change when another method or benchmark is added.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualselect.errors import DualSelectError
from dualselect.logs import write_atomic

from . import metrics
from .judges import UNPARSEABLE
from .metrics import interval_text, pct

RESULTS, SAMPLES = "results.json", "samples.jsonl"
REPORT_JSON, REPORT_MD, PLOT_PNG, REPORT_HTML = "report.json", "report.md", "safety_utility.png", "report.html"
FORMAT = "dualselect-report-1"
CONFIDENCE = 0.95
MIN_SEEDS = 3
SEEDS_WARNING = f"fewer than {MIN_SEEDS} seeds"
SAME_DIFFERENCE = "sign-flip over seeds (every seed gave the same difference: no t interval)"
EXACT_MAX = 16  # sign-flip test: all 2^m sign patterns are enumerated up to this many non-zero differences


# ------------------------------------------------------------------------------------------ per-record values

def _flag(key: str):
    """Rule: the 0/1 value of a boolean field of the record; a record whose judge output was unparseable
    (verdict "unparseable", e.g. an LLM refusal judge) is left out, as the eval harness does."""
    return lambda rec: UNPARSEABLE if rec.get("verdict") == UNPARSEABLE else float(rec[key])


def _harmful(rec: dict):
    """Rule: the harm judge's verdict (record["harm"]), 1.0 harmful / 0.0 not; unparseable verdicts left out."""
    harm = rec.get("harm")
    if harm is None:
        return None
    return UNPARSEABLE if harm.get("verdict") == UNPARSEABLE else float(harm["harmful"])


def _win(rec: dict):
    """Rule: a pairwise judge's win (1.0), tie (0.5) or loss (0.0) against the baseline; None is unparseable."""
    if "win" not in rec:
        return None
    return UNPARSEABLE if rec["win"] is None or rec.get("verdict") == UNPARSEABLE else float(rec["win"])


BROKEN = ("empty", "degenerate")  # keyword-judge verdicts of answers that are no answer at all


def _strict_refusal(rec: dict):
    """Rule (in the manner of HS+): a refusal that is a real answer; empty and degenerate answers count as
    unsafe here, so a method that broke the model does not look safer. Records without a verdict: None."""
    if "verdict" not in rec:
        return None
    if rec["verdict"] == UNPARSEABLE:
        return UNPARSEABLE
    return float(bool(rec["refused"]) and rec.get("verdict") not in BROKEN)


def _broken(rec: dict):
    """Rule: 1.0 for an empty or degenerate (repetitive) answer; records without a verdict: None."""
    if "verdict" not in rec:
        return None
    return UNPARSEABLE if rec.get("verdict") == UNPARSEABLE else float(rec.get("verdict") in BROKEN)


# benchmark kind -> metric -> (label, rule). A rule maps one sample record to its value, to UNPARSEABLE (left
# out of the metric and counted) or to None (the record does not carry the metric). A new metric is one line.
VALUE_RULES = {
    "harmful": {"refusal_rate": ("refusal rate", _flag("refused")),
                "refusal_rate_strict": ("refusal, broken = unsafe", _strict_refusal),
                "harmful_rate": ("harmful rate", _harmful),
                "broken_rate": ("empty/degenerate", _broken)},
    "overrefusal": {"over_refusal_rate": ("over-refusal", _flag("refused")),
                    "broken_rate": ("empty/degenerate", _broken)},
    "task": {"accuracy": ("accuracy", _flag("correct"))},
    "winrate": {"win_rate": ("win rate", _win)},
}


def top_answer(records) -> dict | None:
    """The most frequent answer (field pred) of label-graded task records and its share of them: a share near 1 is a
    collapse to one answer whatever the input, which accuracy alone hides. None unless every record is
    label-graded."""
    recs = list(records)
    if not recs or any(r.get("grader") != "label" for r in recs):
        return None
    answer, n = Counter(r.get("pred") for r in recs).most_common(1)[0]
    return {"answer": answer, "share": n / len(recs)}


# ------------------------------------------------------------------------------------------ reading eval dirs

@dataclass
class EvalRun:
    """One evaluation output dir of one method's seed: its results.json and its sample records."""

    method: str
    path: Path
    results: dict
    samples: dict[str, dict[str, dict]]  # benchmark name -> prompt id -> record (the last one of an id wins)

    @property
    def benchmarks(self) -> dict[str, dict]:
        """results.json's benchmark entries by name."""
        return {b["name"]: b for b in self.results["benchmarks"]}

    @property
    def label(self) -> str:
        return f"{self.method} ({self.path})"


def parse_runs(specs: Sequence[str]) -> dict[str, list[Path]]:
    """Command-line arguments METHOD=DIR[,DIR...] -> {method: [eval dirs]} in the order given."""
    runs: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, dirs = spec.partition("=")
        paths = [Path(d).expanduser() for d in dirs.split(",") if d.strip()]
        if not sep or not name.strip() or not paths:
            raise DualSelectError(f"{spec!r}: expected METHOD=DIR[,DIR...], one eval output dir per seed, "
                                  "e.g. sft=runs/sft-s1/eval,runs/sft-s2/eval")
        if name.strip() in runs:
            raise DualSelectError(f"method {name.strip()!r} is given twice; list all its seeds in one argument")
        runs[name.strip()] = paths
    return runs


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DualSelectError(f"{path}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise DualSelectError(f"{path}: not a JSON object")
    return data


def _read_records(path: Path) -> list[dict]:
    """The records of a samples.jsonl, read only (unlike eval.run.read_samples this never repairs the file:
    a half-written line is an error here)."""
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not (isinstance(rec, dict) and "benchmark" in rec and "id" in rec):
            raise DualSelectError(f"{path}:{lineno}: not a sample record (an interrupted eval? run it again "
                                  "to finish it)")
        records.append(rec)
    return records


def load_run(method: str, path: Path) -> EvalRun:
    """Read one eval output dir; a missing or malformed results.json / samples.jsonl is a DualSelectError."""
    path = Path(path)
    for name in (RESULTS, SAMPLES):
        if not (path / name).is_file():
            raise DualSelectError(f"{path} (method {method}): not a dualselect eval output dir (no {name})")
    results = _read_json(path / RESULTS)
    try:
        for bench in results["benchmarks"]:
            bench["name"], bench["kind"], int(bench["n"])
    except (KeyError, TypeError, ValueError):
        raise DualSelectError(f"{path / RESULTS}: not a dualselect eval results.json "
                              "(benchmarks with name, kind and n expected)") from None
    samples: dict[str, dict[str, dict]] = {}
    for rec in _read_records(path / SAMPLES):
        samples.setdefault(str(rec["benchmark"]), {})[str(rec["id"])] = rec
    return EvalRun(method, path, results, samples)


# ------------------------------------------------------------------------------------------ consistency

def _check_inputs(runs: dict[str, list[Path]], baseline: str | None, resamples: int, permutations: int,
                  seed: int) -> None:
    """Methods with at least one dir, each dir listed once, a known baseline, sane statistics settings."""
    if not runs:
        raise DualSelectError("no runs to compare: give METHOD=DIR[,DIR...] for at least one method")
    seen: dict[Path, str] = {}
    for method, paths in runs.items():
        if not paths:
            raise DualSelectError(f"method {method!r}: no eval dirs")
        for p in paths:
            key = Path(p).expanduser().resolve()
            if key in seen:
                raise DualSelectError(f"{p} is listed twice ({seen[key]} and {method}); each seed's eval dir "
                                      "counts once")
            seen[key] = method
    if baseline is not None and baseline not in runs:
        raise DualSelectError(f"baseline {baseline!r} is not one of the methods ({', '.join(runs)})")
    if resamples < 1 or permutations < 1 or seed < 0:
        raise DualSelectError("resamples and permutations must be >= 1 and the seed >= 0")


def _check_benchmark_sets(loaded: dict[str, list[EvalRun]]) -> None:
    """Every seed of a method was evaluated on the same benchmarks."""
    for method, seeds in loaded.items():
        first = set(seeds[0].benchmarks)
        for other in seeds[1:]:
            if set(other.benchmarks) != first:
                only_a = ", ".join(sorted(first - set(other.benchmarks))) or "-"
                only_b = ", ".join(sorted(set(other.benchmarks) - first)) or "-"
                raise DualSelectError(
                    f"method {method}: its seeds were evaluated on different benchmarks ({seeds[0].path} only: "
                    f"{only_a}; {other.path} only: {only_b}); evaluate every seed on the same eval.benchmarks")


def _settings(run: EvalRun) -> dict:
    """What must agree between all compared evaluations: the judge ids (refusal, harm and pairwise judge, the
    latter two when used), the decoding settings and the precision the model ran in."""
    def judge_id(key):
        judge = run.results.get(key)
        return judge.get("id") if isinstance(judge, dict) else judge

    return {"judge": judge_id("judge"), "harm judge": judge_id("harm_judge"),
            "pairwise judge": judge_id("pairwise_judge"), "decoding": run.results.get("decoding"),
            "precision": (run.results.get("model") or {}).get("precision_used")}


def _check_same_settings(runs: list[EvalRun]) -> None:
    """All evaluations used the same judges and decoding settings (see _settings)."""
    ref = _settings(runs[0])
    for run in runs[1:]:
        other = _settings(run)
        for what in ref:
            a, b = ref[what], other[what]
            if a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                diff = "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}"
                                 for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            else:
                diff = f"{a!r} vs {b!r}"
            raise DualSelectError(f"{runs[0].label} and {run.label} differ in {what} ({diff}); compare "
                                  "evaluations made with one judge, the same decoding settings and the same precision "
                                  "(model.precision)")


def _benchmark_kinds(runs: list[EvalRun]) -> dict[str, str]:
    """Benchmark name -> kind, in order of first appearance; one name with two kinds is an error."""
    kinds: dict[str, str] = {}
    for run in runs:
        for name, bench in run.benchmarks.items():
            if kinds.setdefault(name, bench["kind"]) != bench["kind"]:
                raise DualSelectError(f"benchmark {name} is of kind {kinds[name]} in one evaluation and "
                                      f"{bench['kind']} in {run.label}")
    return kinds


# ------------------------------------------------------------------------------------------ prompt selection

def select_prompts(runs: list[EvalRun], bench: str) -> tuple[dict[Path, list[str]], dict]:
    """The prompt ids of `bench` that count in each run that has it, and what was dropped.

    Normally a run's samples hold exactly the results.json n records of a benchmark, all counted. When some
    run's samples hold more (records outside its selection, e.g. from an earlier run with another limit),
    every run is restricted to the ids common to all runs of all methods, and the dropped records counted."""
    having = [r for r in runs if bench in r.benchmarks]
    ids = {r.path: sorted(r.samples.get(bench, {})) for r in having}
    info: dict = {"common_prompts": None, "dropped": {}, "warning": None, "same_ids": False}
    for r in having:
        n = int(r.benchmarks[bench]["n"])
        if len(ids[r.path]) < n:
            raise DualSelectError(f"{r.path / SAMPLES}: {len(ids[r.path])} records of {bench} but results.json "
                                  f"scored {n}; the two files do not belong together (re-run dualselect eval)")
    first = ids[having[0].path]
    if all(len(ids[r.path]) == int(r.benchmarks[bench]["n"]) and ids[r.path] == first for r in having):
        info["same_ids"] = True
        return ids, info
    common = set.intersection(*(set(v) for v in ids.values()))
    info["common_prompts"] = len(common)
    info["dropped"] = {str(r.path): len(ids[r.path]) - len(common) for r in having}
    too_many = [str(r.path) for r in having if len(common) > int(r.benchmarks[bench]["n"])]
    if too_many:
        info["warning"] = (f"{bench}: the {len(common)} prompts common to all runs outnumber the prompts scored "
                           f"in {', '.join(too_many)}; records outside the selection may be counted")
    return {r.path: sorted(common) for r in having}, info


def seed_values(run: EvalRun, bench: str, kind: str, ids: Sequence[str]) -> dict[str, dict]:
    """Per metric of `kind`: {"values": {prompt id: value}, "unparseable": count, "missing": count} of one
    run's records of `bench` (only metrics that some record carries)."""
    out = {}
    records = run.samples.get(bench, {})
    for metric, (_, rule) in VALUE_RULES.get(kind, {}).items():
        values, unparseable, missing = {}, 0, 0
        for pid in ids:
            try:
                value = rule(records[pid])
            except (KeyError, TypeError, ValueError):
                raise DualSelectError(f"{run.path / SAMPLES}: record {bench} / {pid} has no usable value for "
                                      f"{metric}") from None
            if value is None:
                missing += 1
            elif value == UNPARSEABLE:
                unparseable += 1
            else:
                values[pid] = value
        if values or unparseable:
            out[metric] = {"values": values, "unparseable": unparseable, "missing": missing}
    return out


# ------------------------------------------------------------------------------------------ statistics

def cell_seed(seed: int, *names: str) -> list[int]:
    """The seed of one cell's random draws: the report seed and a checksum of the cell's names."""
    return [int(seed), zlib.crc32("\0".join(names).encode("utf-8"))]


def _percentile_interval(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(estimates, [tail, 100 - tail])
    return float(lo), float(hi)


def resampled_means(values: Sequence[float], size: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `size` bootstrap resamples of `values` (len(values) draws with replacement each).

    Drawn as multinomial counts over the distinct values: the same distribution as drawing indices, in time
    per distinct value (two or three for 0/1 flags and wins) rather than per prompt."""
    x = np.asarray(values, dtype=np.float64)
    distinct, counts = np.unique(x, return_counts=True)
    draws = rng.multinomial(x.size, counts / x.size, size=size)
    return draws @ distinct / x.size


def two_level_bootstrap_ci(per_seed: Sequence[Sequence[float]], resamples: int = 2000, seed=0,
                           confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile interval of the mean over seeds of per-seed means over prompts.

    Each resample draws as many seeds as there are, with replacement, and for each drawn seed its prompts with
    replacement (a seed drawn twice gets two independent prompt draws). Seeds without values are left out;
    None when there are none. Deterministic for a given seed."""
    groups = [np.asarray(g, dtype=np.float64) for g in per_seed if len(g)]
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    k = len(groups)
    picks = rng.integers(0, k, size=(resamples, k))
    totals = np.zeros(resamples)
    for s, values in enumerate(groups):
        rows, _ = np.nonzero(picks == s)  # one entry per time seed s was drawn in a resample
        np.add.at(totals, rows, resampled_means(values, rows.size, rng))
    return _percentile_interval(totals / k, confidence)


def sign_flip_test(diffs: Sequence[float], permutations: int = 10000, seed=0, exact_max: int = EXACT_MAX) -> dict:
    """Two-sided paired sign-flip permutation test of "the mean difference is 0".

    Under the null hypothesis each paired difference is as likely negative as positive, so the observed
    T = sum(diffs) is compared with the sums after flipping signs. Zero differences move no sum and are set
    aside. With m <= exact_max non-zero differences all 2^m sign patterns are enumerated and p is the share
    with |T*| >= |T| ("exact"); otherwise `permutations` random patterns give
    p = (1 + #{|T*| >= |T|}) / (1 + permutations) ("monte_carlo", seeded).

    Returns {"p_value", "method", "n", "n_nonzero", "permutations"}; p_value None for no differences."""
    d = np.asarray(diffs, dtype=np.float64)
    nonzero = d[d != 0]
    m = int(nonzero.size)
    out = {"p_value": None, "method": "exact", "n": int(d.size), "n_nonzero": m, "permutations": 0}
    if d.size == 0:
        return out
    if m == 0:
        return {**out, "p_value": 1.0, "permutations": 1}
    observed = abs(nonzero.sum())
    tol = 1e-9 * max(1.0, float(np.abs(nonzero).sum()))  # sums equal in exact arithmetic count as equal
    if m <= exact_max:
        signs = 1 - 2 * ((np.arange(2 ** m)[:, None] >> np.arange(m)) & 1)
        extreme = np.abs(signs @ nonzero) >= observed - tol
        return {**out, "p_value": float(extreme.mean()), "permutations": 2 ** m}
    rng = np.random.default_rng(seed)
    hits, done, chunk = 0, 0, max(1, 2_000_000 // m)
    while done < permutations:
        size = min(chunk, permutations - done)
        signs = 1 - 2 * rng.integers(0, 2, size=(size, m))
        hits += int((np.abs(signs @ nonzero) >= observed - tol).sum())
        done += size
    return {**out, "p_value": (1 + hits) / (1 + permutations), "method": "monte_carlo",
            "permutations": permutations}


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below this point: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return _betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile (q in (0.5, 1)) of Student's t with df degrees of freedom, by bisection."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided_p(mid, df) / 2 > 1 - q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def seed_level_test(method_means: Sequence[float], baseline_means: Sequence[float],
                    confidence: float = CONFIDENCE) -> dict:
    """Method minus baseline with the training seed as the unit: each seed's mean over the prompts both have.

    The same number of seeds: paired by position (the i-th eval dir of each method, e.g. the same train.seed),
    a paired t-test of the per-seed differences (df = seeds - 1). Otherwise Welch's unpaired t-test of the
    seed means. The interval is mean +- t quantile * standard error. With fewer than 2 seeds on a side the
    seed-to-seed variance is unknown: no interval and no p-value. When every seed gave the same difference the
    estimated variance is 0 and t is undefined (not infinitely significant): no interval, and the exact
    sign-flip test of the per-seed differences (its smallest p is 2 / 2^seeds: 0.25 for 3 seeds)."""
    a, b = np.asarray(method_means, dtype=np.float64), np.asarray(baseline_means, dtype=np.float64)
    out = {"n_seeds": [int(a.size), int(b.size)], "mean_difference": None, "ci95": None, "p_value": None,
           "test": None, "df": None}
    if a.size == 0 or b.size == 0:
        return out
    diff = float(a.mean() - b.mean())
    out["mean_difference"] = diff
    if a.size == b.size and a.size >= 2:
        d = a - b
        se, df, test = float(d.std(ddof=1) / math.sqrt(d.size)), d.size - 1, "paired t over seeds"
    elif a.size >= 2 and b.size >= 2:
        va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        se, test = float(math.sqrt(va + vb)), "Welch t over seeds"
        df = (va + vb) ** 2 / ((va ** 2 / (a.size - 1) if va else 0) + (vb ** 2 / (b.size - 1) if vb else 0)) \
            if va or vb else a.size + b.size - 2
    else:
        return {**out, "test": "needs >= 2 seeds per method"}
    out.update(test=test, df=float(df))
    if se <= 1e-12 * max(1.0, abs(diff)):  # every seed gave the same difference (up to float rounding; ties of
        # scores counted on a few prompts): t is undefined
        if test == "Welch t over seeds":
            return {**out, "test": "Welch t undefined (every seed gave the same value on each side)"}
        return {**out, "p_value": sign_flip_test(a - b)["p_value"], "test": SAME_DIFFERENCE}
    half = t_quantile(1 - (1 - confidence) / 2, df) * se
    return {**out, "ci95": (diff - half, diff + half), "p_value": t_two_sided_p(diff / se, df)}


def prompt_means(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per prompt id, the mean of its values over the seeds that have one."""
    sums: dict[str, list[float]] = {}
    for values in per_seed:
        for pid, v in values.items():
            sums.setdefault(pid, []).append(v)
    return {pid: float(np.mean(vs)) for pid, vs in sums.items()}


def summarize(per_seed: Sequence[dict], resamples: int, seed) -> dict:
    """One method x benchmark x metric: mean over seeds of per-seed means, two-level bootstrap interval,
    the counts, per-seed numbers and the fewer-than-3-seeds warning. per_seed: seed_values() entries + dir."""
    scored = [s for s in per_seed if s["values"]]
    seed_means = [float(np.mean(list(s["values"].values()))) for s in scored]
    ci = two_level_bootstrap_ci([list(s["values"].values()) for s in scored], resamples, seed)
    prompts = set().union(*(s["values"] for s in scored)) if scored else set()
    return {
        "value": float(np.mean(seed_means)) if seed_means else None,
        "ci95": ci,
        "n_seeds": len(scored),
        "n_prompts": len(prompts),
        "unparseable": sum(s["unparseable"] for s in per_seed),
        "missing": sum(s["missing"] for s in per_seed),
        "warning": SEEDS_WARNING if len(scored) < MIN_SEEDS else None,
        "per_seed": [{"dir": s["dir"], "value": float(np.mean(list(s["values"].values()))) if s["values"] else None,
                      "n_prompts": len(s["values"]), "unparseable": s["unparseable"]} for s in per_seed],
    }


def paired_comparison(method_seeds: Sequence[dict[str, float]], baseline_seeds: Sequence[dict[str, float]],
                      resamples: int, permutations: int, seed) -> dict:
    """A method against the baseline on one benchmark metric, on the prompts both have.

    "seeds": the headline, seed_level_test() of the per-seed means over those prompts (the seed is the unit,
    so seed-to-seed variance counts). The other keys are the prompt-level figure: per prompt the difference of
    the means over each side's seeds; mean difference, bootstrap interval over prompts, sign-flip p-value (it
    sees only prompt-to-prompt variance)."""
    a, b = prompt_means(method_seeds), prompt_means(baseline_seeds)
    ids = sorted(set(a) & set(b))
    diffs = [a[pid] - b[pid] for pid in ids]
    test = sign_flip_test(diffs, permutations=permutations, seed=seed)

    def seed_means(seeds):
        return [float(np.mean([v[pid] for pid in ids if pid in v])) for v in seeds
                if any(pid in v for pid in ids)]

    return {"seeds": seed_level_test(seed_means(method_seeds), seed_means(baseline_seeds)),
            "n_prompts": len(ids), "mean_difference": metrics.mean(diffs),
            "ci95": metrics.bootstrap_ci(diffs, resamples=resamples, seed=seed) if diffs else None,
            "p_value": test["p_value"], "test": test["method"], "n_nonzero": test["n_nonzero"],
            "permutations": test["permutations"],
            "unpaired": {"method": len(a) - len(ids), "baseline": len(b) - len(ids)}}


# ------------------------------------------------------------------------------------------ the report

def _run_info(run: EvalRun) -> dict:
    return {"dir": str(run.path), "model": run.results.get("model"), "decoding": run.results.get("decoding"),
            **{key: run.results.get(key) for key in ("judge", "harm_judge", "pairwise_judge", "baseline")}}


def compare(runs: dict[str, list[Path]], baseline: str | None = None, resamples: int = 2000,
            permutations: int = 10000, seed: int = 0) -> dict:
    """The comparison report of methods given as {method: [one eval output dir per seed]}.

    baseline: the method the others are compared with (default: the first). Returns a JSON-ready dict:
    methods (source dirs, each seed's model / judge / decoding), benchmarks (kinds, dropped records), columns
    (benchmark metrics in order), results[method][benchmark][metric] (summarize()), comparisons[method]
    [benchmark][metric] (paired_comparison()), warnings."""
    _check_inputs(runs, baseline, resamples, permutations, seed)
    baseline = baseline if baseline is not None else next(iter(runs))
    loaded = {method: [load_run(method, p) for p in paths] for method, paths in runs.items()}
    flat = [run for seeds in loaded.values() for run in seeds]
    _check_benchmark_sets(loaded)
    _check_same_settings(flat)
    kinds = _benchmark_kinds(flat)
    warnings: list[str] = []

    benchmarks, values = {}, {m: {} for m in loaded}  # values[method][bench][metric] = per-seed entries
    answers: dict[str, dict[str, list[dict]]] = {}  # [method][label task] = per seed its top_answer
    for bench, kind in kinds.items():
        if kind not in VALUE_RULES:
            warnings.append(f"{bench}: no metric is defined for benchmark kind {kind!r}; left out")
        selected, info = select_prompts(flat, bench)
        benchmarks[bench] = {"kind": kind, **info}
        if info["warning"]:
            warnings.append(info["warning"])
        if sum(info["dropped"].values()):
            warnings.append(f"{bench}: {sum(info['dropped'].values())} records outside the prompts common to all "
                            f"runs were dropped ({info['common_prompts']} prompts kept)")
        for method, seeds in loaded.items():
            for run in (r for r in seeds if bench in r.benchmarks):
                for metric, entry in seed_values(run, bench, kind, selected[run.path]).items():
                    values[method].setdefault(bench, {}).setdefault(metric, []).append({"dir": str(run.path), **entry})
                if kind == "task":
                    top = top_answer(run.samples[bench][i] for i in selected[run.path] if i in run.samples[bench])
                    if top is not None:
                        answers.setdefault(method, {}).setdefault(bench, []).append(top)

    columns = [{"key": f"{bench}/{metric}", "benchmark": bench, "kind": kind, "metric": metric, "label": label}
               for bench, kind in kinds.items() for metric, (label, _) in VALUE_RULES.get(kind, {}).items()
               if any(metric in values[m].get(bench, {}) for m in loaded)]
    results = {m: {} for m in loaded}
    comparisons = {m: {} for m in loaded if m != baseline}
    for col in columns:
        bench, metric = col["benchmark"], col["metric"]
        for method in loaded:
            per_seed = values[method].get(bench, {}).get(metric)
            if not per_seed:
                continue
            cell = summarize(per_seed, resamples, cell_seed(seed, method, bench, metric))
            results[method].setdefault(bench, {})[metric] = cell
            if cell["unparseable"]:
                warnings.append(f"{method} {bench} {col['label']}: {cell['unparseable']} unparseable verdicts "
                                "left out")
            if cell["missing"]:
                warnings.append(f"{method} {bench} {col['label']}: {cell['missing']} records without a value "
                                "left out")
            base = values[baseline].get(bench, {}).get(metric)
            if method != baseline and base:
                comparisons[method].setdefault(bench, {})[metric] = paired_comparison(
                    [s["values"] for s in per_seed], [s["values"] for s in base], resamples, permutations,
                    cell_seed(seed, method, baseline, bench, metric))
    few = [m for m in loaded if len(loaded[m]) < MIN_SEEDS]
    if few:
        warnings.insert(0, f"{SEEDS_WARNING}: {', '.join(f'{m} ({len(loaded[m])})' for m in few)}")

    return {
        "format": FORMAT,
        "baseline": baseline,
        "methods": {m: {"n_seeds": len(seeds), "runs": [_run_info(r) for r in seeds]} for m, seeds in loaded.items()},
        "judge": _settings(flat[0])["judge"],
        "harm_judge": _settings(flat[0])["harm judge"],
        "pairwise_judge": _settings(flat[0])["pairwise judge"],
        "decoding": flat[0].results.get("decoding"),
        "statistics": {
            "confidence": CONFIDENCE, "value": "mean over seeds of the per-seed mean over prompts",
            "interval": {"method": "percentile bootstrap: seeds with replacement, then prompts with replacement "
                                   "within each drawn seed", "resamples": resamples, "seed": seed},
            "seed_level": {"unit": "training seed: per seed the mean over the prompts both methods have",
                           "test": "paired t-test over seeds (the i-th eval dir of each method), Welch's t when the "
                                   "seed counts differ", "interval": "mean difference +- t quantile x standard "
                                   "error", "min_seeds": 2},
            "paired": {"pairing": "prompt id; per prompt the mean over each method's seeds",
                       "difference": "method - baseline", "interval": "percentile bootstrap over prompts",
                       "test": "two-sided sign-flip permutation test of the mean difference",
                       "exact_up_to_nonzero": EXACT_MAX, "permutations": permutations, "seed": seed},
            "min_seeds": MIN_SEEDS},
        "benchmarks": benchmarks,
        "columns": columns,
        "results": results,
        "comparisons": comparisons,
        "answers": answers,
        "warnings": warnings,
    }


# ------------------------------------------------------------------------------------------ Markdown

def short_name(benchmark: str) -> str:
    """A benchmark's name for tables and plots: a file source by its stem ("harmful:runs/x/heldout.jsonl" ->
    "harmful:heldout"); named datasets as they are. report.json keeps the full names."""
    kind, _, source = benchmark.partition(":")
    path = Path(source)
    return f"{kind}:{path.name.split('.')[0]}" if source and (path.suffix or "/" in source) else benchmark


def cell_text(cell: dict | None) -> str:
    """One result cell as "91.0 [85.0, 96.0]" (percent; "-" for none)."""
    return "-" if not cell or cell["value"] is None else f"{pct(cell['value'])} {interval_text(cell['ci95'])}"


def p_text(p: float | None) -> str:
    return "-" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), "|" + "|".join("---" for _ in header) + "|", *(_row(r) for r in rows)]


def markdown(report: dict) -> str:
    """The report as Markdown: one row per method and one column per benchmark metric ("91.0 [85.0, 96.0]",
    percent), the paired differences against the baseline with p-values, then the notes."""
    cols, results, base = report["columns"], report["results"], report["baseline"]
    lines = ["## Methods", "",
             ("Mean over seeds, in percent, with a 95% interval (bootstrap over seeds and prompts); "
              f"* marks fewer than {MIN_SEEDS} seeds."), ""]
    rows = []
    for method, info in report["methods"].items():
        cells = [method, str(info["n_seeds"])]
        for col in cols:
            cell = results[method].get(col["benchmark"], {}).get(col["metric"])
            cells.append(cell_text(cell) + (" *" if cell and cell["warning"] else ""))
        rows.append(cells)
    lines += _table(["method", "seeds", *(f"{short_name(c['benchmark'])} {c['label']}" for c in cols)], rows)

    if report.get("answers"):
        lines += ["", "## Most frequent answer (label tasks)", "",
                  ("Per seed, the label a method answered most often and its share of the prompts: a share near "
                   "100 % is a collapse to one answer whatever the input, which accuracy alone hides."), ""]
        rows = [[method, short_name(bench), "; ".join(f"{a['answer']} {pct(a['share'])} %" for a in seeds),
                 f"{pct(max(a['share'] for a in seeds))} %"]
                for method, by_bench in report["answers"].items() for bench, seeds in by_bench.items()]
        lines += _table(["method", "benchmark", "per seed", "largest share"], rows)
    lines += ["", f"## Paired differences vs {base}", "",
              (f"Method minus {base} in percentage points. Headline: the training seed is the unit (per seed the "
               "mean over the prompts both have; paired t-test over seeds, 95% t interval), so seed-to-seed "
               "variance counts (\"(sign-flip)\": every seed gave the same difference, so t is undefined and the "
               "exact sign-flip test over seeds stands in, with no interval). Second figure, prompt level: per "
               "prompt the mean over seeds, 95% bootstrap interval over prompts and a two-sided sign-flip test; it "
               "ignores seed-to-seed variance."), ""]
    rows = []
    for method, by_bench in report["comparisons"].items():
        for col in cols:
            c = by_bench.get(col["benchmark"], {}).get(col["metric"])
            if c is None:
                continue
            sd = c.get("seeds") or {}
            seeds = "/".join(map(str, sd.get("n_seeds", [])))
            rows.append([method, short_name(col["benchmark"]), col["label"], seeds,
                         pct(sd.get("mean_difference"), True), interval_text(sd.get("ci95"), True),
                         (p_text(sd["p_value"]) + (" (sign-flip)" if sd.get("test") == SAME_DIFFERENCE else ""))
                         if sd.get("p_value") is not None else (sd.get("test") or "n/a"),
                         str(c["n_prompts"]), pct(c["mean_difference"], True), interval_text(c["ci95"], True),
                         p_text(c["p_value"])])
    lines += _table(["method", "benchmark", "metric", "seeds", "difference", "95% CI (seeds)", "p (seeds)",
                     "prompts", "difference (prompts)", "95% CI (prompts)", "p (prompts)"], rows) \
        if rows else ["(no other method to compare)"]

    notes = list(report["warnings"])
    same = [short_name(b) for b, info in report["benchmarks"].items() if info.get("same_ids")]
    if same:
        notes.append(f"every run was scored on the same prompt ids of {', '.join(same)} (checked)")
    renamed = [f"{short_name(b)} = {b}" for b in report["benchmarks"] if short_name(b) != b]
    if renamed:
        notes.append("benchmarks: " + "; ".join(renamed))
    notes.append(", ".join(f"{label}: {report[key]}" for key, label in
                           (("judge", "judge"), ("harm_judge", "harm judge"), ("pairwise_judge", "pairwise judge"))
                           if report.get(key)))
    if report.get("decoding"):
        notes.append("decoding: " + ", ".join(f"{k}={v}" for k, v in report["decoding"].items()))
    if report.get("plot", {}).get("skipped"):
        notes.append(f"no plot: {report['plot']['skipped']}")
    lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the plot

def _find_column(report: dict, name: str, axis: str) -> dict:
    """The column named by key ("task:sst2:dev/accuracy"), or by metric or benchmark when that picks one."""
    cols = report["columns"]
    hits = [c for c in cols if c["key"] == name] or [c for c in cols if c["metric"] == name] \
        or [c for c in cols if c["benchmark"] == name]
    if len(hits) != 1:
        raise DualSelectError(f"plot {axis} axis {name!r}: {'matches ' + str(len(hits)) if hits else 'matches no'} "
                              f"column; name one of {', '.join(c['key'] for c in cols)}")
    return hits[0]


def _default_column(report: dict, metric: str, axis: str) -> dict:
    hits = [c for c in report["columns"] if c["metric"] == metric]
    if len(hits) != 1:
        raise DualSelectError(f"plot {axis} axis: the report has {len(hits)} {metric} columns"
                              f"{' (' + ', '.join(c['key'] for c in hits) + ')' if hits else ''}; "
                              "choose the axes (--plot X,Y)")
    return hits[0]


def plot_axes(report: dict, x: str | None = None, y: str | None = None) -> tuple[dict, dict]:
    """The (x, y) columns of the plot: by default x the task accuracy and y the harmful refusal rate, each
    when the report has exactly one; x / y name a column (see _find_column)."""
    xcol = _find_column(report, x, "x") if x else _default_column(report, "accuracy", "x")
    ycol = _find_column(report, y, "y") if y else _default_column(report, "refusal_rate", "y")
    return xcol, ycol


def _errors(cell: dict) -> list[list[float]] | None:
    """Asymmetric error bar lengths (percent) of a cell's interval around its value."""
    if not cell["ci95"]:
        return None
    lo, hi = cell["ci95"]
    return [[max(0.0, 100 * (cell["value"] - lo))], [max(0.0, 100 * (hi - cell["value"]))]]


def _seeds_text(report: dict) -> str:
    counts = sorted({info["n_seeds"] for info in report["methods"].values()})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{n} seed{'s' if counts[-1] > 1 else ''} per method"


def render_plot(report: dict, x: str | None = None, y: str | None = None) -> bytes:
    """The safety-utility plot as PNG bytes: one point per method with its 95% intervals as error bars in both
    directions, labelled with the method (and its over-refusal rate when the report has one)."""
    from .figures import new_figure, png_bytes

    xcol, ycol = plot_axes(report, x, y)
    over = [c for c in report["columns"] if c["metric"] == "over_refusal_rate"]
    fig = new_figure(6.4, 5.2, dpi=120)
    ax = fig.add_subplot()
    plotted = 0
    for method, cells in report["results"].items():
        cx = cells.get(xcol["benchmark"], {}).get(xcol["metric"])
        cy = cells.get(ycol["benchmark"], {}).get(ycol["metric"])
        if not cx or not cy or cx["value"] is None or cy["value"] is None:
            continue
        px, py = 100 * cx["value"], 100 * cy["value"]
        ax.errorbar(px, py, xerr=_errors(cx), yerr=_errors(cy), fmt="o", capsize=4)
        text = [method]
        for col in over:
            cell = cells.get(col["benchmark"], {}).get(col["metric"])
            if cell and cell["value"] is not None:
                where = f" ({col['benchmark']})" if len(over) > 1 else ""
                text.append(f"over-refusal{where} {pct(cell['value'])}%")
        right = px > 70  # labels of points near the right edge go to their left
        ax.annotate("\n".join(text), (px, py), xytext=(-6 if right else 6, 6), textcoords="offset points",
                    fontsize=8, ha="right" if right else "left")
        plotted += 1
    if not plotted:
        raise DualSelectError(f"plot: no method has both {xcol['key']} and {ycol['key']}")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"{short_name(xcol['benchmark'])} {xcol['label']} (%)")
    ax.set_ylabel(f"{short_name(ycol['benchmark'])} {ycol['label']} (%)")
    ax.set_title(f"Safety vs utility: mean of {_seeds_text(report)}, 95% intervals")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def plot(report: dict, path, x: str | None = None, y: str | None = None) -> Path:
    """Write the safety-utility plot (render_plot) to `path` as a PNG, atomically."""
    path = Path(path)
    data = render_plot(report, x, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path


# ------------------------------------------------------------------------------------------ files

def write_report(report: dict, out_dir, x: str | None = None, y: str | None = None) -> dict:
    """Write report.json, report.md, safety_utility.png, the run figures (eval.figures.run_figures: training
    curves, references chosen per refresh) and report.html (the tables and every figure on one page) to
    out_dir, each atomically and only after all of them were rendered. Without x / y and no unique default
    axes the plot is left out (an older plot there is removed) and the reason recorded under "plot"; with x / y
    a bad axis is an error and nothing is written. Returns {"report": dict with "plot" and "figures", "json",
    "markdown", "html": paths, "plot": path or None, "figures": [(caption, path)]}."""
    from . import figures
    out = Path(out_dir)
    try:
        xcol, ycol = plot_axes(report, x, y)
        png = render_plot(report, xcol["key"], ycol["key"])
        plot_info = {"path": str(out / PLOT_PNG), "x": xcol["key"], "y": ycol["key"]}
    except DualSelectError as e:
        if x or y:
            raise
        png, plot_info = None, {"skipped": str(e)}
    pictures, notes = figures.run_figures(report)
    report = {**report, "plot": plot_info,
              "figures": {"files": [name for name, _, _ in pictures], "left_out": notes}}
    text_md = markdown(report)
    text_json = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    shown = ([] if png is None else [(PLOT_PNG, f"safety vs utility ({plot_info['y']} vs {plot_info['x']})", png)]) \
        + pictures
    page = figures.html_page(f"Comparison vs {report['baseline']}",
                             [("Results", text_md, [(caption, data) for _, caption, data in shown])])
    out.mkdir(parents=True, exist_ok=True)
    if png is None:
        (out / PLOT_PNG).unlink(missing_ok=True)
    for name, _, data in shown:
        write_atomic(out / name, data)
    write_atomic(out / REPORT_MD, text_md.encode("utf-8"))
    write_atomic(out / REPORT_JSON, text_json.encode("utf-8"))
    write_atomic(out / REPORT_HTML, page.encode("utf-8"))
    return {"report": report, "json": out / REPORT_JSON, "markdown": out / REPORT_MD, "html": out / REPORT_HTML,
            "plot": None if png is None else out / PLOT_PNG,
            "figures": [(caption, out / name) for name, caption, _ in shown]}
