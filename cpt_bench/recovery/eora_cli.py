"""``cpt-bench eora`` (EoRA for an existing compressed checkpoint) and the EoRA folder that ``cpt-bench compress
--eora-rank R --eora-out DIR`` writes (``EORA_OUTPUT``, handed to ``compress.cli_commands`` by ``cpt_bench.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cpt_bench.compress.cli_commands import EoraOutput, add_calibration_args, calibration_settings
from cpt_bench.compress.spec import CalibrationSettings

if TYPE_CHECKING:  # torch-heavy: loaded when a command runs
    from cpt_bench.compress.eora import Compensator


def check_eora_out(out: Path, flag: str) -> None:
    """Refuse (one line) an ``out`` that is neither new, empty nor an earlier EoRA folder."""
    from cpt_bench.files import ensure_replaceable
    from cpt_bench.recovery.eora import EORA_KIND

    ensure_replaceable(out, EORA_KIND, flag)


def write_eora(out: Path, compensator: Compensator, checkpoint: Path, settings: CalibrationSettings,
               model=None, tokenizer=None) -> None:
    """Write the EoRA folder of ``compensator.fit`` for ``checkpoint`` and print its error and memory tables.

    ``model`` / ``tokenizer``: the base model the fit ran on, for the folder's identity record (None: the
    checkpoint's own model and tokenizer, loaded here)."""
    from dataclasses import asdict

    from cpt_bench.assets.model import load_tokenizer
    from cpt_bench.compress.checkpoints import load_checkpoint
    from cpt_bench.compress.storage import read_manifest
    from cpt_bench.recovery.eora import checkpoint_record, describe, read_eora, save_eora
    from cpt_bench.recovery.target import describe_target

    manifest = read_manifest(checkpoint)
    if model is None:
        model, _ = load_checkpoint(checkpoint)
        tokenizer = load_tokenizer(str(checkpoint))
    base_name = (manifest.get("base_model") or {}).get("name") or str(checkpoint)
    save_eora(out, compensator.fit, model, describe_target(model, tokenizer, base_name),
              checkpoint_record(checkpoint, manifest), asdict(settings))
    print(describe(read_eora(out)))
    print(f"EoRA adapter (a PEFT LoRA folder, rank {compensator.fit.rank}): {out}")


EORA_OUTPUT = EoraOutput(check=check_eora_out, write=write_eora)


def cmd_eora(args: argparse.Namespace) -> None:
    """Fit EoRA for an existing compressed checkpoint and write it as a PEFT LoRA folder."""
    from cpt_bench.assets.model import check_fits_context, context_tokens
    from cpt_bench.compress.checkpoints import compensate_checkpoint
    from cpt_bench.compress.eora import Compensator, check_rank
    from cpt_bench.compress.storage import read_manifest

    settings = calibration_settings(args)
    compensator = Compensator(check_rank(args.rank, "--rank"))
    read_manifest(args.checkpoint)
    check_eora_out(args.out, "--out")
    check_fits_context(settings.seqlen, "--seqlen", str(args.checkpoint), context_tokens(str(args.checkpoint)))
    model, tokenizer, _ = compensate_checkpoint(args.checkpoint, settings, compensator)
    write_eora(args.out, compensator, args.checkpoint, settings, model, tokenizer)


def add_eora_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eora`` to ``cpt-bench``'s subcommands; the parser's ``run`` default is ``cmd_eora``."""
    parser = subparsers.add_parser("eora", help="fit EoRA (a training-free low-rank correction) for a compressed "
                                   "checkpoint; write it as a PEFT LoRA folder")
    parser.add_argument("checkpoint", type=Path, help="a compressed checkpoint folder (cpt-bench compress --out)")
    parser.add_argument("--rank", type=int, required=True, help="rank r of every Linear's correction, e.g. 16")
    parser.add_argument("--out", type=Path, required=True, help="the EoRA folder: a new or empty folder, or an "
                        "earlier EoRA folder (replaced)")
    add_calibration_args(parser)
    parser.set_defaults(run=cmd_eora)
    return parser
