"""The ``cpt-bench report``, ``case-study`` and ``leaderboard`` subcommands; ``cpt_bench.cli`` registers them with
``add_report_parser``.

``report RUN`` turns ``RUN/summary.json`` (written by the matrix runner) into tables and plots;
``case-study RUN`` shows a generative target's questions answered by the dense, compressed and prompted models side
by side, with each prompt's fixes and breaks (``report.case_study``);
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


def cmd_case_study(args: argparse.Namespace) -> None:
    """Write the case study of one run (markdown and HTML) and print each written path."""
    from cpt_bench.report.case_study import write_case_study

    for path in write_case_study(args.run_dir, args.out, args.target, args.level, args.questions):
        print(path)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}, expected a positive number")
    return value


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
    """Add ``report``, ``case-study`` and ``leaderboard`` to ``cpt-bench``; each parser's ``run`` default runs it."""
    report = subparsers.add_parser("report", help="tables (md, LaTeX, HTML) and plots of one matrix run")
    report.add_argument("run_dir", type=Path, metavar="RUN", help="run folder holding summary.json")
    report.add_argument("--out", type=Path, default=None, help="report folder (default: RUN/report)")
    report.set_defaults(run=cmd_report)

    case_study = subparsers.add_parser(
        "case-study", help="a generative target's answers side by side: dense, compressed, compressed + each prompt, "
                           "with fixes, breaks and McNemar's test per prompt (md, HTML)")
    case_study.add_argument("run_dir", type=Path, metavar="RUN", help="finished matrix run folder")
    case_study.add_argument("--target", default=None,
                            help="a generative target of the run, e.g. cpt_coqa+max_gen_toks=32 or cpt_coqa when one "
                                 "(default: the run's first generative target)")
    case_study.add_argument("--level", default=None, metavar="SPEC",
                            help="the compressed level (default: the one of fewest bits per weight with prompts)")
    case_study.add_argument("--questions", type=_positive_int, default=8, metavar="N",  # case_study.DEFAULT_QUESTIONS
                            help="questions shown (default 8; which: see the report's selection rule)")
    case_study.add_argument("--out", type=Path, default=None, help="case-study folder (default: RUN/case-study)")
    case_study.set_defaults(run=cmd_case_study)

    leaderboard = subparsers.add_parser("leaderboard", help="collect results/*/summary.json into LEADERBOARD.md/.html")
    leaderboard.add_argument("--results", type=Path, default=Path("results"),
                             help="folder of run folders (default: results)")
    leaderboard.add_argument("--add", type=Path, action="append", default=[], metavar="RUN_DIR",
                             help="verify a finished run folder (schema, cell checksums, protocol) and copy it into "
                                  "the results folder first; repeatable")
    leaderboard.set_defaults(run=cmd_leaderboard)
    return [report, case_study, leaderboard]
