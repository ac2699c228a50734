"""The ``cpt-bench compress`` and ``cpt-bench import-gptq`` subcommands; ``cpt_bench.cli`` registers them with
``add_compress_parser`` and ``add_import_parser``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cpt_bench.assets.model import MODEL_HELP
from cpt_bench.compress.spec import CalibrationSettings

if TYPE_CHECKING:  # torch-heavy: loaded when a command runs
    from cpt_bench.compress.eora import Compensator
    from cpt_bench.compress.spec import Spec

_DEFAULTS = CalibrationSettings()


def cmd_compress(args: argparse.Namespace) -> None:
    """Compress a model (cached unless ``--out``), print the memory account, optionally export GPTQ format."""
    from cpt_bench.assets.model import check_fits_context, context_tokens, model_folder
    from cpt_bench.compress.checkpoints import cached_checkpoint, compress_to_folder
    from cpt_bench.compress.export import GPTQ_EXPORT_KIND, check_checkpoint_format, export_gptq
    from cpt_bench.compress.spec import Spec
    from cpt_bench.compress.storage import memory_table, read_manifest
    from cpt_bench.files import ensure_replaceable

    spec = Spec.parse(args.spec)
    settings = calibration_settings(args)
    check_checkpoint_format(args.checkpoint_format, "--checkpoint-format")
    compensator = _eora_request(args, spec)
    if spec.is_dense:
        print(f"spec dense: nothing to compress; the model is {model_folder(args.model)}")
        return
    if spec.needs_calibration or compensator is not None:
        check_fits_context(settings.seqlen, "--seqlen", args.model, context_tokens(str(model_folder(args.model))))
    if args.export_gptq is not None:  # checked before compressing, not after (compress_to_folder checks --out)
        ensure_replaceable(args.export_gptq, GPTQ_EXPORT_KIND, "--export-gptq")
    if args.out:
        compress_to_folder(args.model, spec, settings, args.out, compensator=compensator)
        folder = args.out
    else:
        folder = cached_checkpoint(args.model, spec, settings)
    print(memory_table(read_manifest(folder)))
    print(f"compressed checkpoint: {folder}")
    if args.export_gptq is not None:
        print(f"GPTQ-format export: {export_gptq(folder, args.export_gptq, args.checkpoint_format)}")
    if compensator is not None:
        args.eora_output.write(args.eora_out, compensator, folder, settings)


def calibration_settings(args: argparse.Namespace) -> CalibrationSettings:
    """The ``CalibrationSettings`` of ``add_calibration_args``' flags, the corpus checked first (one line)."""
    from cpt_bench.corpus import parse_corpus

    parse_corpus(args.corpus, "--corpus")
    return CalibrationSettings(n_windows=args.n_windows, seqlen=args.seqlen, seed=args.seed,
                               true_sequential=args.true_sequential, corpus=args.corpus)


@dataclass(frozen=True)
class EoraOutput:
    """How ``compress --eora-out DIR`` checks its folder before compressing (``check(DIR, flag)``) and writes it
    after (``write(DIR, compensator, checkpoint folder, settings)``): the EoRA folder is a recovery artifact, so the
    command line supplies both (``recovery.eora_cli``)."""

    check: Callable[[Path, str], None]
    write: Callable[[Path, Compensator, Path, CalibrationSettings], None]


def _eora_request(args: argparse.Namespace, spec: Spec) -> Compensator | None:
    """The EoRA ``Compensator`` that ``--eora-rank`` / ``--eora-out`` ask for (None: neither), checked in one line
    before anything loads."""
    from cpt_bench.compress.eora import Compensator, EoraError, check_rank

    if args.eora_rank is None and args.eora_out is None:
        return None
    if args.eora_rank is None or args.eora_out is None:
        raise EoraError("--eora-rank and --eora-out go together: give both (e.g. --eora-rank 16 --eora-out DIR)")
    check_rank(args.eora_rank, "--eora-rank")
    if args.eora_output is None:
        raise EoraError("--eora-rank: this command line cannot write EoRA folders; use cpt-bench compress")
    if spec.is_dense:
        raise EoraError("--eora-rank: spec dense has no compression error to correct; give a compressing --spec")
    if args.out is None:
        raise EoraError("--eora-rank needs --out: the checkpoint it corrects is calibrated on corrected inputs, so it "
                        "goes to a folder of your own, not the cache")
    args.eora_output.check(args.eora_out, "--eora-out")
    return Compensator(args.eora_rank)


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """The calibration flags (``--corpus``, ``--n-windows``, ``--seqlen``, ``--seed``, ``--one-pass``)."""
    parser.add_argument("--corpus", default=_DEFAULTS.corpus, help="calibration corpus spec (train split), e.g. "
                        "wikipedia, c4, text:DIR, jsonl:FILE?field=body, hf:DATASET (see cpt_bench.corpus)")
    parser.add_argument("--n-windows", type=int, default=_DEFAULTS.n_windows, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=_DEFAULTS.seqlen, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed for drawing the windows")
    parser.add_argument("--one-pass", dest="true_sequential", action="store_false",
                        help="collect every Hessian of a decoder layer in one forward of the uncompressed layer "
                             "(faster; default: true-sequential, each group on the compressed earlier ones' outputs)")


def add_compress_parser(subparsers: argparse._SubParsersAction,
                        eora_output: EoraOutput | None = None) -> argparse.ArgumentParser:
    """Add ``compress`` to ``cpt-bench``'s subcommands; the parser's ``run`` default is ``cmd_compress``;
    ``eora_output``: how ``--eora-out`` is checked and written (None: ``--eora-rank`` is refused)."""
    parser = subparsers.add_parser("compress", help="compress a model by a spec (cached) and print its memory account")
    parser.add_argument("--model", default="embedded", help=MODEL_HELP)
    parser.add_argument("--spec", required=True, help="compression spec, e.g. gptq-w4g64 or sparsegpt-50+gptq-w4g64")
    parser.add_argument("--out", type=Path, default=None, help="write here instead of the cache: a new or empty "
                        "folder, or an earlier checkpoint (replaced)")
    add_calibration_args(parser)
    parser.add_argument("--eora-rank", type=int, default=None, metavar="R",
                        help="also fit EoRA of rank R in the same pass (needs --out and --eora-out); later layers are "
                             "calibrated on the corrected outputs")
    parser.add_argument("--eora-out", type=Path, default=None, metavar="DIR",
                        help="the EoRA folder (a PEFT LoRA adapter) that --eora-rank writes")
    parser.add_argument("--export-gptq", type=Path, default=None, metavar="DIR",
                        help="also write a GPTQ-format checkpoint (zero points as --checkpoint-format says) to DIR: "
                             "a new or empty folder, or an earlier export (replaced)")
    parser.add_argument("--checkpoint-format", default="gptq", metavar="FORMAT",
                        help="zero points of the --export-gptq checkpoint: gptq (auto-gptq v1, stored minus one, "
                             "read by vLLM and transformers; cannot hold a zero point of 0, common at 2-3 bits) or "
                             "gptq_v2 (GPTQModel's, stored as they are) (default: gptq)")
    parser.set_defaults(run=cmd_compress, eora_output=eora_output)
    return parser


def cmd_import_gptq(args: argparse.Namespace) -> None:
    """Read a GPTQ-format folder written elsewhere into a checkpoint folder over its dense base; print its memory
    account."""
    from cpt_bench.compress.gptq_import import import_gptq
    from cpt_bench.compress.storage import memory_table, read_manifest

    summary = import_gptq(args.folder, args.model, args.out)
    print(memory_table(read_manifest(args.out)))
    print(f"imported {summary['checkpoint_format']} folder {args.folder} (spec {summary['spec']}) as compressed "
          f"checkpoint: {args.out}")


def add_import_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``import-gptq`` to ``cpt-bench``'s subcommands (``run`` default: ``cmd_import_gptq``)."""
    parser = subparsers.add_parser("import-gptq", help="read a GPTQ-format folder written by another tool (auto-gptq, "
                                   "GPTQModel) into a compressed checkpoint over its dense base model")
    parser.add_argument("folder", type=Path, help="the GPTQ folder: quantize_config.json or config.json's "
                        "quantization_config, model.safetensors or shards with model.safetensors.index.json")
    parser.add_argument("--model", default="embedded", help=f"the dense base model it was quantized from: {MODEL_HELP}")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write: new, empty or an "
                        "earlier checkpoint (replaced)")
    parser.set_defaults(run=cmd_import_gptq)
    return parser
