"""The ``cpt-bench compress`` subcommand; ``cpt_bench.cli`` registers it with ``add_compress_parser``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cpt_bench.assets.model import MODEL_HELP
from cpt_bench.compress.spec import CalibrationSettings

_DEFAULTS = CalibrationSettings()


def cmd_compress(args: argparse.Namespace) -> None:
    """Compress a model (cached unless ``--out``), print the memory account, optionally export GPTQ format."""
    from cpt_bench.assets.model import check_fits_context, context_tokens, model_folder
    from cpt_bench.compress.checkpoints import cached_checkpoint, compress_to_folder
    from cpt_bench.compress.export import GPTQ_EXPORT_KIND, check_checkpoint_format, export_gptq
    from cpt_bench.compress.spec import Spec
    from cpt_bench.compress.storage import memory_table, read_manifest
    from cpt_bench.corpus import parse_corpus
    from cpt_bench.files import ensure_replaceable

    spec = Spec.parse(args.spec)
    parse_corpus(args.corpus, "--corpus")
    check_checkpoint_format(args.checkpoint_format, "--checkpoint-format")
    settings = CalibrationSettings(n_windows=args.n_windows, seqlen=args.seqlen, seed=args.seed,
                                   true_sequential=args.true_sequential, corpus=args.corpus)
    if spec.is_dense:
        print(f"spec dense: nothing to compress; the model is {model_folder(args.model)}")
        return
    if spec.needs_calibration:
        check_fits_context(settings.seqlen, "--seqlen", args.model, context_tokens(str(model_folder(args.model))))
    if args.export_gptq is not None:  # checked before compressing, not after (compress_to_folder checks --out)
        ensure_replaceable(args.export_gptq, GPTQ_EXPORT_KIND, "--export-gptq")
    if args.out:
        compress_to_folder(args.model, spec, settings, args.out)
        folder = args.out
    else:
        folder = cached_checkpoint(args.model, spec, settings)
    print(memory_table(read_manifest(folder)))
    print(f"compressed checkpoint: {folder}")
    if args.export_gptq is not None:
        print(f"GPTQ-format export: {export_gptq(folder, args.export_gptq, args.checkpoint_format)}")


def add_compress_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``compress`` to ``cpt-bench``'s subcommands; the parser's ``run`` default is ``cmd_compress``."""
    parser = subparsers.add_parser("compress", help="compress a model by a spec (cached) and print its memory account")
    parser.add_argument("--model", default="embedded", help=MODEL_HELP)
    parser.add_argument("--spec", required=True, help="compression spec, e.g. gptq-w4g64 or sparsegpt-50+gptq-w4g64")
    parser.add_argument("--out", type=Path, default=None, help="write here instead of the cache: a new or empty "
                        "folder, or an earlier checkpoint (replaced)")
    parser.add_argument("--corpus", default=_DEFAULTS.corpus, help="calibration corpus spec (train split), e.g. "
                        "wikipedia, c4, text:DIR, jsonl:FILE?field=body, hf:DATASET (see cpt_bench.corpus)")
    parser.add_argument("--n-windows", type=int, default=_DEFAULTS.n_windows, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=_DEFAULTS.seqlen, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed for drawing the windows")
    parser.add_argument("--one-pass", dest="true_sequential", action="store_false",
                        help="collect every Hessian of a decoder layer in one forward of the uncompressed layer "
                             "(faster; default: true-sequential, each group on the compressed earlier ones' outputs)")
    parser.add_argument("--export-gptq", type=Path, default=None, metavar="DIR",
                        help="also write a GPTQ-format checkpoint (zero points as --checkpoint-format says) to DIR: "
                             "a new or empty folder, or an earlier export (replaced)")
    parser.add_argument("--checkpoint-format", default="gptq", metavar="FORMAT",
                        help="zero points of the --export-gptq checkpoint: gptq (auto-gptq v1, stored minus one, "
                             "read by vLLM and transformers; cannot hold a zero point of 0, common at 2-3 bits) or "
                             "gptq_v2 (GPTQModel's, stored as they are) (default: gptq)")
    parser.set_defaults(run=cmd_compress)
    return parser
