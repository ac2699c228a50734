"""The ``cpt-bench matrix`` and ``cpt-bench merge`` subcommands; ``cpt_bench.cli`` registers them."""

from __future__ import annotations

import argparse
from pathlib import Path

from cpt_bench.matrix.run import EXECUTORS


def cmd_matrix(args: argparse.Namespace) -> None:
    """Run the matrix (or print its plan) and say where the results went."""
    from cpt_bench.matrix.run import run_matrix

    run_dir = run_matrix(args.config, args.out, args.resume, args.shard, args.executor, args.dry_run, args.plan_only)
    if run_dir is not None:
        summary = run_dir / "summary.json"
        done = f"summary {summary}, report {run_dir / 'report'}" if summary.is_file() else "not complete"
        print(f"run folder {run_dir}: {done}")


def cmd_merge(args: argparse.Namespace) -> None:
    """Merge shard run folders and say whether the merged run is complete."""
    from cpt_bench.matrix.run import merge_runs

    summary = merge_runs(args.out, args.shards)
    print(f"merged {len(args.shards)} run folders into {args.out}: "
          f"{f'summary {summary}' if summary else 'cells still missing, no summary'}")


def add_matrix_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``matrix`` and ``merge`` to ``cpt-bench``; each parser's ``run`` default runs it."""
    matrix = subparsers.add_parser("matrix", help="evaluate every compression x prompt x target cell of a config")
    matrix.add_argument("config", type=Path, help="YAML config, e.g. configs/default.yaml")
    matrix.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<config name>)")
    matrix.add_argument("--resume", action="store_true",
                        help="continue the run in --out (same config); starts it when there is none")
    matrix.add_argument("--shard", default=None, help="i/n: run the i-th of n disjoint parts (array jobs)")
    matrix.add_argument("--executor", choices=EXECUTORS, default="local", help="local (default) or ray")
    matrix.add_argument("--dry-run", action="store_true", help="check the plan as the run does first (model, tasks, "
                        "windows against the context, corpora), then print it with a time estimate")
    matrix.add_argument("--plan-only", action="store_true", help="print the plan without looking anything up "
                        "(for a config meant for another machine, e.g. configs/paper.yaml offline)")
    matrix.set_defaults(run=cmd_matrix)

    merge = subparsers.add_parser("merge", help="merge shard run folders of one config into one run")
    merge.add_argument("out", type=Path, help="the merged run folder")
    merge.add_argument("shards", type=Path, nargs="+", help="shard run folders")
    merge.set_defaults(run=cmd_merge)
