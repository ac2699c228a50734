"""The ``cpt-bench matrix``, ``merge`` and ``compare`` subcommands; ``cpt_bench.cli`` registers them, giving the
function that writes a finished run's report (the report package sits above the matrix)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

from cpt_bench.matrix.run import EXECUTORS

ReportRun = Callable[[Path], object]  # writes the report of a run folder holding summary.json


def cmd_matrix(args: argparse.Namespace, report_run: ReportRun) -> None:
    """Run the matrix (or print its plan); when complete, write its report; say where the results went."""
    from cpt_bench.matrix.run import run_matrix

    run_dir = run_matrix(args.config, args.out, args.resume, args.shard, args.executor, args.dry_run, args.plan_only)
    if run_dir is not None:
        summary = run_dir / "summary.json"
        if summary.is_file():
            report_run(run_dir)
        done = f"summary {summary}, report {run_dir / 'report'}" if summary.is_file() else "not complete"
        print(f"run folder {run_dir}: {done}")


def cmd_merge(args: argparse.Namespace, report_run: ReportRun) -> None:
    """Merge shard run folders; when the merged run is complete, write its report; say which it is."""
    from cpt_bench.matrix.run import merge_runs

    summary = merge_runs(args.out, args.shards)
    if summary:
        report_run(args.out)
    print(f"merged {len(args.shards)} run folders into {args.out}: "
          f"{f'summary {summary}' if summary else 'cells still missing, no summary'}")


def cmd_compare(args: argparse.Namespace) -> None:
    """Print the paired comparison of two cells of a run, with the unpaired one for contrast."""
    from cpt_bench.matrix.paired import describe_comparison
    from cpt_bench.matrix.store import read_run_cell

    first, second = (read_run_cell(args.run_dir, cell_id) for cell_id in (args.cell_a, args.cell_b))
    print(describe_comparison(first, second))


def add_matrix_parser(subparsers: argparse._SubParsersAction, report_run: ReportRun) -> None:
    """Add ``matrix``, ``merge`` and ``compare`` to ``cpt-bench``; each parser's ``run`` default runs it;
    ``report_run(run_dir)`` writes a complete run's report."""
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
    matrix.set_defaults(run=functools.partial(cmd_matrix, report_run=report_run))

    merge = subparsers.add_parser("merge", help="merge shard run folders of one config into one run")
    merge.add_argument("out", type=Path, help="the merged run folder")
    merge.add_argument("shards", type=Path, nargs="+", help="shard run folders")
    merge.set_defaults(run=functools.partial(cmd_merge, report_run=report_run))

    compare = subparsers.add_parser("compare", help="paired difference of two cells of a run (B - A), with its CI")
    compare.add_argument("run_dir", type=Path, metavar="RUN", help="run folder written by 'cpt-bench matrix'")
    compare.add_argument("cell_a", metavar="CELL_A", help="cell id, e.g. rtn-w3g64__none__cpt_ppl_wikipedia")
    compare.add_argument("cell_b", metavar="CELL_B", help="cell id of the same task")
    compare.set_defaults(run=cmd_compare)
