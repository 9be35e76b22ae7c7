"""The `dualselect` command: one verb per stage, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DualSelectError

VERBS = {
    "train": "fine-tune with a method (sft, dualselect, ...) from a YAML config and key=value overrides",
    "methods": "list the training methods: what each does, its paper, the data it needs",
    "select": "score a task set against a reference pool with DualSelect and write the kept records",
    "demo": "the embedded offline demo: align SmolLM2, fine-tune it with SFT and DualSelect, evaluate, table and plot",
    "eval": "evaluate a model (+ adapter): refusal rate on harmful prompts, over-refusal, task accuracy",
    "bench": "a grid of train + eval cells (methods x seeds x any config key), resumable, one report at the end",
    "report": "compare methods over seeds: means with 95% intervals, paired tests vs a baseline, a plot",
    "continual": "fine-tune one adapter on a sequence of tasks (methods x seeds), resumable per stage; accuracy "
                 "matrix, forgetting and safety after every stage",
}


def _config_parser(verb: str, description: str, extra: str = "") -> argparse.ArgumentParser:
    from .config import describe
    from .data.named import NAMED_DATASETS
    from .methods import method_configs

    named = "\n".join(f"  {name:24s} {text}" for name, text in NAMED_DATASETS.items())
    epilog = (
        "Every option is a config key, set in the YAML file or as key=value on the command line\n"
        "(later wins), e.g.  dualselect train run.yaml train.method=dualselect dualselect.k_task=4\n\n"
        f"{describe(method_configs())}\n\n"
        "Named datasets (data.task / data.reference), read from data.data_dir or $DUALSELECT_DATA_DIR:\n"
        f"{named}\n  hf:OWNER/NAME[:SPLIT]    a Hugging Face dataset (needs `datasets` and a reachable hub)\n"
        f"{extra}"
    )
    p = argparse.ArgumentParser(prog=f"dualselect {verb}", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML run config (optional: defaults plus overrides)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    p.add_argument("--quiet", action="store_true", help=f"no progress bars (same as {_quiet_key(verb)}=true)")
    p.set_defaults(verb=verb)
    return p


@contextlib.contextmanager
def _no_partial_output(out: Path, keep: Callable[[Path], bool] = lambda out: False) -> Iterator[None]:
    """A command that fails (an exception, not an interrupt) removes what it created in `out`: the directory and
    the parents it made, or the new entries of a directory that was there before. Left alone when keep(out) says
    the command got far enough to be resumed (e.g. a training run that wrote its config.yaml)."""
    out = Path(out).expanduser()
    created = None  # the topmost directory of `out`'s path that does not exist yet
    for d in (out, *out.parents):
        if d.exists():
            break
        created = d
    before = {e.name for e in out.iterdir()} if created is None and out.is_dir() else set()
    try:
        yield
    except Exception:
        if not keep(out):
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif out.is_dir():
                for entry in out.iterdir():
                    if entry.name not in before:
                        if entry.is_dir() and not entry.is_symlink():
                            shutil.rmtree(entry, ignore_errors=True)
                        else:
                            entry.unlink(missing_ok=True)
        raise


def _quiet_key(verb: str) -> str:
    return "eval.quiet" if verb == "eval" else "train.quiet"


def _load(args):
    from .config import load_config
    from .methods import method_configs

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    if args.quiet:
        overrides.append(f"{_quiet_key(args.verb)}=true")
    return load_config(config, overrides, method_configs())


def cmd_train(argv: list[str]) -> int:
    p = _config_parser("train", VERBS["train"])
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.output_dir from its latest checkpoint (same config)")
    args = p.parse_intermixed_args(argv)
    from .distributed import launched_rank, launched_world_size
    from .train import default_run_dir, train

    cfg = _load(args)
    if launched_world_size() > 1 and not cfg.train.output_dir:  # each process would name its own
        raise DualSelectError("a run in several processes (accelerate launch) needs train.output_dir")
    if not cfg.train.output_dir:  # name the run dir here, so that a failed start can be cleaned up
        cfg.train.output_dir = str(default_run_dir(cfg))
    # a run that wrote its config.yaml has started (or is resumed): it stays, --resume continues it; of several
    # processes the main one writes the run dir and cleans it up
    main_process = launched_rank() == 0
    with (_no_partial_output(Path(cfg.train.output_dir), keep=lambda out: (out / "config.yaml").exists())
          if main_process else contextlib.nullcontext()):
        result = train(cfg, resume=args.resume)
    if not main_process:
        return 0
    print(f"adapter: {result.adapter_dir}")
    print(f"run dir: {result.run_dir}  ({result.steps} steps, {result.seconds:.0f} s, peak RSS "
          f"{result.peak_rss_mb:.0f} MB)")
    return 0


def cmd_methods(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dualselect methods", description=VERBS["methods"],
                                epilog="Each method's options: dualselect train --help (the section named after it).")
    p.parse_args(argv)
    from .methods import listing

    print(listing(), end="")
    return 0


def cmd_select(argv: list[str]) -> int:
    p = _config_parser("select", VERBS["select"])
    p.add_argument("--keep", type=float, default=0.5,
                   help="fraction of the task set to keep, lowest scores first (default 0.5)")
    args = p.parse_intermixed_args(argv)
    args.overrides.insert(0, "train.method=dualselect")
    from .select import select
    from .train import default_run_dir

    cfg = _load(args)
    if not cfg.train.output_dir:
        cfg.train.output_dir = str(default_run_dir(cfg))
    with _no_partial_output(Path(cfg.train.output_dir)):
        out = select(cfg, keep=args.keep)
    print(f"kept {out.n_kept} of {out.n_scored} task records -> {out.kept_path}")
    print(f"scores: {out.scores_path}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from .eval.prompts import KINDS

    kinds = "\n".join(f"  {kind:24s} {text}" for kind, text in KINDS.items())
    p = _config_parser("eval", VERBS["eval"], extra=(
        "\nBenchmark kinds (eval.benchmarks=[KIND:SOURCE,...], SOURCE a named dataset above or a file;\n"
        "task files need an `answer` column):\n" + kinds + "\n\n"
        "e.g.  dualselect eval eval.adapter=runs/x/adapter data.data_dir=../shared/data \\\n"
        "          'eval.benchmarks=[harmful:advbench,overrefusal:xstest:safe,task:sst2:dev]' eval.limit=100\n"))
    args = p.parse_intermixed_args(argv)
    from .eval.run import SAMPLES, default_output_dir, evaluate

    cfg = _load(args)
    out = Path(cfg.eval.output_dir).expanduser() if cfg.eval.output_dir else default_output_dir(cfg)

    def has_answers(out: Path) -> bool:  # answers already in samples.jsonl stay: the same command resumes
        return (out / SAMPLES).is_file() and (out / SAMPLES).stat().st_size > 0

    with _no_partial_output(out, keep=has_answers):
        results = evaluate(cfg)
    print(results["table"], end="")
    print(f"results: {results['results_path']}")
    print(f"samples: {results['samples']['path']}  ({results['samples']['resumed']} resumed, "
          f"{results['samples']['generated']} generated)")
    return 0


def cmd_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dualselect report", description=VERBS["report"], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each method's seeds are `dualselect eval` output dirs (results.json + samples.jsonl), evaluated\n"
               "with one judge and the same decoding settings, e.g.\n"
               "  dualselect report sft=runs/sft-s1/eval,runs/sft-s2/eval,runs/sft-s3/eval \\\n"
               "      dualselect=runs/ds-s1/eval,runs/ds-s2/eval,runs/ds-s3/eval --baseline sft --out runs/report\n")
    p.add_argument("runs", nargs="+", metavar="METHOD=DIR[,DIR...]", help="a method and its eval dirs, one per seed")
    p.add_argument("--baseline", help="the method the others are compared with (default: the first)")
    p.add_argument("--out", default="runs/report", help="directory for report.json, report.md, report.html and the PNG figures "
                   "(default runs/report)")
    p.add_argument("--plot", metavar="X,Y", help="plot axes as BENCHMARK/METRIC or METRIC, e.g. accuracy,refusal_rate "
                   "(default: the task accuracy and the harmful refusal rate when there is one of each)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--permutations", type=int, default=10000, help="sign-flip test permutations (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_intermixed_args(argv)
    from .eval.report import compare, markdown, parse_runs, write_report

    x = y = None
    if args.plot:
        x, sep, y = args.plot.partition(",")
        if not (sep and x.strip() and y.strip()) or "," in y:
            raise DualSelectError(f"--plot {args.plot!r}: expected X,Y, e.g. accuracy,refusal_rate")
        x, y = x.strip(), y.strip()
    report = compare(parse_runs(args.runs), baseline=args.baseline, resamples=args.resamples,
                     permutations=args.permutations, seed=args.seed)
    with _no_partial_output(Path(args.out)):
        written = write_report(report, args.out, x=x, y=y)
    print(markdown(written["report"]), end="")
    print(f"report: {written['json']}")
    print(f"table:  {written['markdown']}")
    print(f"page:   {written['html']} (tables and figures)")
    print(f"plot:   {written['plot']}" if written["plot"] else
          f"plot:   none ({written['report']['plot']['skipped']})")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from . import bench

    p = argparse.ArgumentParser(prog="dualselect bench", description=VERBS["bench"],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=bench.__doc__.split("\n", 2)[2] + "\nRecipes: configs/ in the repository.")
    p.add_argument("config", help="bench YAML: a run config plus a bench section")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of every cell (bench.KEY=VALUE sets the bench section)")
    p.add_argument("--only", action="append", default=[], metavar="AXIS=LABEL[,LABEL...]",
                   help="run and report only the cells with these labels on an axis (repeatable), e.g. "
                        "--only data.harmful_ratio=0.1 --only method=sft,dualselect")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--status", action="store_true",
                   help="print what the grid has finished (here and in bench.archive) and the compute left, and "
                        "run nothing")
    p.add_argument("--align-only", action="store_true", help=ALIGN_ONLY_HELP)
    args = p.parse_intermixed_args(argv)
    only = _only(args.only, "data.harmful_ratio=0.1")
    if args.align_only:
        _refuse_with_align_only(args)
        print(bench.align_only(args.config, args.overrides), end="")
        return 0
    if args.status:
        from . import bench_status

        print(bench_status.markdown(bench_status.grid_status(args.config, args.overrides, only=only)))
        return 0
    result = bench.run_bench(args.config, args.overrides, quiet=args.quiet, only=only)
    print(result["markdown"], end="" if result["markdown"].endswith("\n") else "\n")
    if result["path"] is not None:
        print(f"report: {result['path']}")
    return 0


ALIGN_ONLY_HELP = ("run the alignment stage alone (with every core the process may use) and print the aligned "
                   "model's weights hash and thread count; the thread count changes float rounding, so align "
                   "with the thread count the archive records before starting one-core processes")


def _refuse_with_align_only(args) -> None:
    given = [name for name, on in (("--status", args.status), ("--only", args.only), ("--quiet", args.quiet)) if on]
    if given:
        raise DualSelectError(f"--align-only runs the alignment stage alone; it takes no {given[0]}")


def _only(specs: list[str], example: str) -> dict[str, list[str]]:
    """--only AXIS=LABEL[,LABEL...] options (repeatable) -> {axis: [labels]}."""
    only: dict[str, list[str]] = {}
    for spec in specs:
        axis, sep, labels = spec.partition("=")
        if not sep or not axis.strip() or not labels.strip():
            raise DualSelectError(f"--only {spec!r}: expected AXIS=LABEL[,LABEL...], e.g. {example}")
        only.setdefault(axis.strip(), []).extend(x.strip() for x in labels.split(",") if x.strip())
    return only


def cmd_continual(argv: list[str]) -> int:
    from . import continual

    p = argparse.ArgumentParser(prog="dualselect continual", description=VERBS["continual"],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=continual.__doc__.split("\n", 2)[2] + "\nRecipes: configs/continual-*.yaml.")
    p.add_argument("config", help="continual YAML: a run config plus a continual section")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of every stage run (continual.KEY=VALUE sets the continual section)")
    p.add_argument("--only", action="append", default=[], metavar="method|seed=LABEL[,LABEL...]",
                   help="run and report only these methods or seeds (repeatable), e.g. --only method=sft,replay "
                        "--only seed=0: several processes on disjoint methods use the cores of one machine")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--status", action="store_true",
                   help="print the stage runs finished (here and in continual.archive) and the compute left, and "
                        "run nothing")
    p.add_argument("--align-only", action="store_true", help=ALIGN_ONLY_HELP)
    args = p.parse_intermixed_args(argv)
    only = _only(args.only, "method=sft,replay")
    if args.align_only:
        _refuse_with_align_only(args)
        print(continual.align_only(args.config, args.overrides), end="")
        return 0
    if args.status:
        from .bench_status import markdown

        print(markdown(continual.continual_status(args.config, args.overrides, only=only)))
        return 0
    result = continual.run_continual(args.config, args.overrides, quiet=args.quiet, only=only)
    print(result["markdown"], end="")
    print(f"results: {result['path']}")
    print(f"report:  {result['report']}")
    print(f"page:    {result['html']} (tables and figures)")
    return 0


def cmd_demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dualselect demo", description=VERBS["demo"])
    p.add_argument("--out", default="runs/demo", help="directory for data, adapters and logs (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (smoke test)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16-autocast", "bf16"],
                   help="model.precision of every stage (default auto: fp32 on a CPU without native bf16)")
    p.add_argument("--n-task", type=int, help="task training rows (default 128; --quick 24)")
    p.add_argument("--harmful-fraction", type=float, help="share of harmful -> compliance rows in the task data "
                   "(default 0.25)")
    p.add_argument("--eval-limit", type=int, help="held-out prompts per benchmark (default 100; --quick 4)")
    p.add_argument("--generation-batch-size", type=int, help="prompts per generation batch (default 64)")
    args = p.parse_intermixed_args(argv)
    from .demo import run_demo

    changes = {k: getattr(args, k) for k in ("precision", "n_task", "harmful_fraction", "eval_limit",
                                             "generation_batch_size") if getattr(args, k) is not None}
    run_demo(args.out, seed=args.seed, quick=args.quick, quiet=args.quiet, **changes)
    return 0


COMMANDS = {"train": cmd_train, "methods": cmd_methods, "select": cmd_select, "eval": cmd_eval, "report": cmd_report, "bench": cmd_bench,
            "continual": cmd_continual, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: dualselect VERB [options]   (dualselect VERB --help explains every option)\n")
        for verb, text in VERBS.items():
            print(f"  {verb:8s} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown verb '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[argv[0]](argv[1:])
    except DualSelectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = {"train": "a run with checkpoints continues with --resume",
                "eval": "the answers so far are kept in samples.jsonl; the same command resumes",
                "bench": "finished cells are kept; the same command resumes",
                "continual": "finished stages are kept; the same command resumes"}.get(argv[0], "")
        print(f"interrupted{f' ({hint})' if hint else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
