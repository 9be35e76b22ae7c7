"""Which term decides DualSelect's task filter in finished runs (dualselect.eval.task_filter): the share of
harmful pairs and of other candidates each run kept, what loss-only and cosine-only ranking would have kept at
the same steps, and the terms' spread within a batch.

    DUALSELECT_DATA_DIR=../shared/data python benchmarks/task_filter.py docs/results/bench/hft-sst2

Arguments: train dirs, or directories searched for them (every */train with a DualSelect config.yaml: a bench
output dir or its archive). The data directory must hold the runs' task data (the harmful pairs' ids come from
it). Prints one Markdown row per run, and for runs on a label task the target mix of the kept samples; --json
writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from dualselect.errors import DualSelectError
from dualselect.eval import task_filter


def train_dirs(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        found = [p] if (p / "config.yaml").exists() and p.name == "train" else sorted(
            c.parent for c in p.rglob("train/config.yaml"))
        for d in found:
            method = ((yaml.safe_load((d / "config.yaml").read_text()) or {}).get("train") or {}).get("method")
            if method == "dualselect":
                out.append(d)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    dirs = train_dirs(args.paths)
    if not dirs:
        print(f"no DualSelect train dir under {', '.join(args.paths)}", file=sys.stderr)
        return 1
    try:
        runs = [task_filter.read_run(d) for d in dirs]
    except DualSelectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(task_filter.markdown(runs))
    by_target = task_filter.targets_markdown(runs)
    if by_target:  # label tasks: which labels the filter kept
        print("\n" + by_target)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
