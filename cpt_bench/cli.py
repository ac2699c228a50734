"""``cpt-bench``: thin command line over the package (parse, call one function, print)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tabulate import tabulate
from tqdm import tqdm

import cpt_bench.lmeval  # noqa: F401  (registers the lmeval: corpus kind that corpus options accept)
from cpt_bench.assets.model import EMBEDDED_MODELS, EMBEDDED_NAME, MODEL_HELP
from cpt_bench.compress.cli_commands import add_compress_parser, add_import_parser
from cpt_bench.errors import run_command
from cpt_bench.matrix.cli_commands import add_matrix_parser
from cpt_bench.recovery.cli_commands import add_prompt_parser
from cpt_bench.recovery.eora_cli import EORA_OUTPUT, add_eora_parser
from cpt_bench.report.cli_commands import add_report_parser


def cmd_assets(args: argparse.Namespace) -> None:
    """Prepare (download, convert, split) every embedded asset; already cached ones are only verified."""
    from cpt_bench.assets import asset_builders, asset_status
    from cpt_bench.assets.cache import cache_root

    rows = []
    builders = asset_builders(tuple(dict.fromkeys([EMBEDDED_NAME, *(args.model or [])])))
    for name, build in tqdm(builders.items(), desc="assets", unit="asset"):
        status = asset_status(name)
        started = time.perf_counter()
        path = build()
        action = "cached" if status == "cached" else f"built ({status})"
        size_mb = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
        rows.append([name, action, f"{size_mb:.1f}", f"{time.perf_counter() - started:.1f}"])
    print(f"cache: {cache_root()}")
    print(tabulate(rows, headers=["asset", "status", "MB", "seconds"]))


def cmd_corpus(args: argparse.Namespace) -> None:
    """Prepare a corpus spec and print its splits (documents, words, and tokens of ``--model``'s tokenizer);
    ``--export DIR`` writes every document as a text file."""
    from cpt_bench.corpus import TEXT_EXPORT_KIND, export_text, load_split, parse_corpus
    from cpt_bench.files import ensure_replaceable
    from cpt_bench.tokens import corpus_stream

    spec = parse_corpus(args.spec, "corpus")
    if args.export:  # before the corpus is prepared
        ensure_replaceable(args.export, TEXT_EXPORT_KIND, "--export")
    tokenizer = None
    if args.model:
        from cpt_bench.assets.model import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    rows = []
    for split in ("train", "validation", "test"):
        docs = load_split(spec, split)
        tokens = len(corpus_stream(spec, split, tokenizer)) if tokenizer else "-"
        rows.append([split, len(docs), sum(len(doc["text"].split()) for doc in docs), tokens])
    print(f"corpus {spec} (documents joined with {spec.separator!r})")
    print(tabulate(rows, headers=["split", "documents", "words", "tokens"]))
    if args.export:
        print(f"wrote {export_text(spec, args.export)} text files to {args.export}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Evaluate one model on cpt_bench tasks and write a run folder."""
    from lm_eval.utils import make_table

    from cpt_bench.evaluate import EVALUATION_KIND, EvalSettings, run_evaluation, write_run
    from cpt_bench.files import ensure_replaceable

    tasks = [name for name in args.tasks.split(",") if name.strip()]
    settings = EvalSettings(model=args.model, tasks=tasks, limit_items=args.limit, limit_windows=args.ppl_limit,
                            seqlen_tokens=args.seqlen, batch_size=args.batch_size, device=args.device)
    out = args.out or Path("runs") / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    ensure_replaceable(out, EVALUATION_KIND, "--out")  # before the model loads
    results = run_evaluation(settings)
    path = write_run(results, out)
    print(make_table(results))
    meta = results["cpt_bench"]
    peak = f"{meta['peak_memory_bytes'] / 2**30:.2f} GiB ({meta['peak_memory_kind']})"
    print(f"wall time {meta['wall_seconds']} s, peak memory {peak}; wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpt-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    assets = commands.add_parser("assets", help="download and prepare the embedded model and data (idempotent)")
    assets.add_argument("--model", action="append", choices=list(EMBEDDED_MODELS),
                        help=f"also prepare this embedded model (repeatable; {EMBEDDED_NAME} always is)")
    assets.set_defaults(run=cmd_assets)

    evaluate = commands.add_parser("evaluate", help="evaluate a model on cpt_bench tasks through lm-eval")
    evaluate.add_argument("--model", default="embedded", help=MODEL_HELP)
    evaluate.add_argument("--tasks", default="cpt_ppl,cpt_zeroshot", help="comma-separated tasks or groups")
    evaluate.add_argument("--limit", type=int, default=None, help="items per zero-shot task (default: all)")
    evaluate.add_argument("--ppl-limit", type=int, default=None, help="windows per perplexity task (default: all)")
    evaluate.add_argument("--seqlen", type=int, default=1024, help="perplexity window length in tokens")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    evaluate.add_argument("--out", type=Path, default=None, help="run folder (default: runs/evaluate-<time>)")
    evaluate.set_defaults(run=cmd_evaluate)

    corpus = commands.add_parser("corpus", help="check a corpus spec: its splits and sizes (and export it as text)")
    corpus.add_argument("spec", help="a corpus spec: wikipedia, c4, text:DIR, jsonl:FILE?field=body, hf:DATASET, "
                        "lmeval:TASK (see cpt_bench.corpus)")
    corpus.add_argument("--model", default=None, help="count tokens with this model's tokenizer ('embedded', ...)")
    corpus.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="write every document as DIR/<split>/<n>.txt (a text: corpus of your own to edit); "
                        "DIR is new or empty, or an earlier export (replaced)")
    corpus.set_defaults(run=cmd_corpus)

    add_compress_parser(commands, EORA_OUTPUT)
    add_import_parser(commands)
    add_eora_parser(commands)
    add_prompt_parser(commands)
    add_matrix_parser(commands, report_run=_write_run_report)
    add_report_parser(commands)
    return parser


def _write_run_report(run_dir: Path) -> list[Path]:
    """The report of a finished run: the command line composes a matrix run and its report (``cpt_bench.report``,
    imported on use: it loads matplotlib)."""
    from cpt_bench.report import write_run_report

    return write_run_report(run_dir)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command under ``errors.run_command``'s policy; the exit status."""
    args = build_parser().parse_args(argv)
    return run_command("cpt-bench", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
