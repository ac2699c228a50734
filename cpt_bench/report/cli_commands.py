"""The ``cpt-bench report`` and ``cpt-bench leaderboard`` subcommands; ``cpt_bench.cli`` registers them with
``add_report_parser``.

``report RUN`` turns ``RUN/summary.json`` (written by the matrix runner) into tables and plots;
``leaderboard`` collects every ``results/*/summary.json`` into ``results/LEADERBOARD.md`` and ``.html``;
``leaderboard --add RUN_DIR`` first verifies a run folder made elsewhere and copies it in (``report.submit``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> None:
    """Write the report of one run and print each written path."""
    from cpt_bench.report import write_run_report

    for path in write_run_report(args.run_dir, args.out):
        print(path)


def cmd_leaderboard(args: argparse.Namespace) -> None:
    """Add ``--add`` run folders (verified), then write the leaderboard of every run under the results folder and
    print each written path."""
    from cpt_bench.report import write_leaderboard
    from cpt_bench.report.leaderboard import check_results_folder
    from cpt_bench.report.submit import add_run

    check_results_folder(args.results)  # before any run is verified and copied in
    for run_dir in args.add:
        print(add_run(run_dir, args.results))
    for path in write_leaderboard(args.results):
        print(path)


def add_report_parser(subparsers: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """Add ``report`` and ``leaderboard`` to ``cpt-bench``; each parser's ``run`` default runs it."""
    report = subparsers.add_parser("report", help="tables (md, LaTeX, HTML) and plots of one matrix run")
    report.add_argument("run_dir", type=Path, metavar="RUN", help="run folder holding summary.json")
    report.add_argument("--out", type=Path, default=None, help="report folder (default: RUN/report)")
    report.set_defaults(run=cmd_report)

    leaderboard = subparsers.add_parser("leaderboard", help="collect results/*/summary.json into LEADERBOARD.md/.html")
    leaderboard.add_argument("--results", type=Path, default=Path("results"),
                             help="folder of run folders (default: results)")
    leaderboard.add_argument("--add", type=Path, action="append", default=[], metavar="RUN_DIR",
                             help="verify a finished run folder (schema, cell checksums, protocol) and copy it into "
                                  "the results folder first; repeatable")
    leaderboard.set_defaults(run=cmd_leaderboard)
    return [report, leaderboard]
