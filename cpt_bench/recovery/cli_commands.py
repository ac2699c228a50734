"""The ``cpt-bench prompt`` subcommands; ``cpt_bench.cli`` registers them with ``add_prompt_parser``.

``prompt train`` learns a soft prompt on a (possibly compressed) model; ``prompt export-peft`` writes
a learned prompt as a PEFT PromptTuning adapter for plain ``lm_eval --model hf ... peft=DIR``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from cpt_bench.assets.model import MODEL_HELP
from cpt_bench.recovery.position import POSITIONS
from cpt_bench.recovery.soft_init import INITIALISERS
from cpt_bench.recovery.training import OBJECTIVES, PRECISIONS, SoftPromptConfig

_DEFAULTS = SoftPromptConfig()
_TYPES_OF_NONE_DEFAULTS = {"patience": int, "init_text": str, "prompt_position": str}
_CHOICES = {"init": sorted(INITIALISERS), "precision": list(PRECISIONS), "prompt_position": list(POSITIONS),
            "objective": list(OBJECTIVES)}


def cmd_train(args: argparse.Namespace) -> None:
    """Load the model (compressed when asked; the dense one beside it as the teacher for ``--objective kd``), train,
    print where the prompt went and its best validation ppl."""
    from cpt_bench.assets.model import check_fits_context, context_tokens
    from cpt_bench.corpus import parse_corpus
    from cpt_bench.files import ensure_replaceable
    from cpt_bench.models import load_model, parse_compression, resolve_device
    from cpt_bench.recovery.artifact import read_prompt
    from cpt_bench.recovery.soft import SOFT_PROMPT_KIND, train_soft_prompt
    from cpt_bench.recovery.training import CHECKPOINT, SoftPromptError

    config = SoftPromptConfig(**{f.name: getattr(args, f.name) for f in fields(SoftPromptConfig)})
    source = str(parse_corpus(args.source, "--source"))
    compression = parse_compression(args.compression, "--compression")
    if args.resume and not (args.out / CHECKPOINT).is_file():
        raise SoftPromptError(f"--resume: no checkpoint at {args.out / CHECKPOINT}; start without --resume")
    ensure_replaceable(args.out, SOFT_PROMPT_KIND, "--out")
    device = resolve_device(args.device, "--device")
    check_fits_context(config.n_virtual_tokens + config.seqlen, f"--n-virtual-tokens {config.n_virtual_tokens} + "
                       f"--seqlen {config.seqlen}", args.model, context_tokens(args.model))
    loaded = load_model(args.model, compression, device=device)
    teacher = load_model(args.model, None, device=device).model if config.objective == "kd" else None  # dense
    folder = train_soft_prompt(loaded.model, loaded.tokenizer, config, source, args.out, model_name=args.model,
                               compression=loaded.compression, resume=args.resume, teacher=teacher)
    best = read_prompt(folder).meta["best"]
    print(f"soft prompt: {folder} (best validation token perplexity {best['val_ppl']:.3f} at step {best['step']})")


def cmd_export_peft(args: argparse.Namespace) -> None:
    """Write the PEFT adapter folder and print its path."""
    from cpt_bench.recovery.artifact import export_peft

    print(f"PEFT PromptTuning adapter: {export_peft(args.prompt_dir, args.out_dir, args.base_model)}")


def _add_hyperparameters(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ``SoftPromptConfig`` field, defaulting to the field's default."""
    for field in fields(SoftPromptConfig):
        default = getattr(_DEFAULTS, field.name)
        kind = _TYPES_OF_NONE_DEFAULTS.get(field.name, type(default))
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=kind, default=default,
                            choices=_CHOICES.get(field.name), help=f"(default: {default})")


def add_prompt_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``prompt train`` and ``prompt export-peft`` to ``cpt-bench``; each parser's ``run`` default runs it."""
    parser = subparsers.add_parser("prompt", help="learn soft prompts and export them")
    commands = parser.add_subparsers(dest="prompt_command", required=True)

    train = commands.add_parser("train", help="learn a soft prompt on a frozen (compressed) model")
    train.add_argument("--model", default="embedded", help=MODEL_HELP)
    train.add_argument("--compression", default=None, help="compression spec, e.g. gptq-w3g64 (default calibration, "
                       "cached), or a folder from 'cpt-bench compress --out' (default: dense)")
    train.add_argument("--source", required=True, help="training corpus spec, e.g. wikipedia, text:DIR, "
                       "jsonl:FILE, hf:DATASET, lmeval:TASK (see cpt_bench.corpus; train split; "
                       "validation on its validation split)")
    train.add_argument("--out", type=Path, required=True, help="folder for the prompt and its checkpoint")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same settings)")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_hyperparameters(train)
    train.set_defaults(run=cmd_train)

    export = commands.add_parser("export-peft", help="write a prompt as a PEFT PromptTuning adapter folder")
    export.add_argument("prompt_dir", type=Path, help="a folder written by 'prompt train'")
    export.add_argument("out_dir", type=Path, help="the adapter folder to write: new or empty, or an earlier "
                        "export (replaced)")
    export.add_argument("--base-model", default=None, help="base model recorded in adapter_config.json")
    export.set_defaults(run=cmd_export_peft)
    return parser
