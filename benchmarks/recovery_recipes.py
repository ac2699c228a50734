"""Choose a recovery recipe on the validation split: train candidate soft prompts / LoRA adapters on a compressed model
and compare their best validation perplexity and the share of the validation gap to dense they close.

Everything here reads the source corpus's train split (training) and validation split (selection and the gap), never
a test split, so a recipe chosen from this table can be reported on test windows by a matrix without selection bias.
The model, compression calibration and base training settings come from a matrix config (``--config``); each
candidate overrides training settings::

    soft:n_virtual_tokens=100,lr=0.03,steps=150            # a soft prompt (any SoftPromptConfig field)
    soft:objective=kd,lr=0.03                              # imitating the dense model
    lora:lr=0.001,rank=1                                   # a LoRA adapter (LoraSettings fields, then training ones)

The validation gap closed is ``(C - P) / (C - D)`` of token perplexities on the same validation windows (the
candidate's ``seqlen`` and ``eval_windows``, BOS first where the tokenizer adds it): C the compressed model
without prompt, D the dense model, P the candidate's best. Prints one row per candidate and writes them (with the
machine, versions, seeds and load average) to ``--out`` as JSON; ``--keep DIR`` keeps the artifacts (``DIR/0``, ...)
for evaluating the chosen one on test windows afterwards::

    CPT_BENCH_CACHE=... python benchmarks/recovery_recipes.py --config configs/recovery.yaml --spec gptq-w3g64 \\
        --candidate soft:lr=0.03 --candidate lora:lr=0.001 --out results/benchmarks/recipes.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
import types
import typing
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from cpt_bench.compress.checkpoints import cached_checkpoint
from cpt_bench.compress.spec import Spec
from cpt_bench.files import write_json_atomic
from cpt_bench.matrix.config import MatrixConfig, load_config
from cpt_bench.models import CheckpointFolder, load_model
from cpt_bench.provenance import environment_record
from cpt_bench.recovery.lora import LoraSettings, read_lora, train_lora
from cpt_bench.recovery.position import lead_ids, resolve_position
from cpt_bench.recovery.soft import train_soft_prompt
from cpt_bench.recovery.training import Learner, SoftPromptConfig, validation_scores, validation_windows
from cpt_bench.tokens import corpus_stream

KINDS = ("soft", "lora")


def _value(hint: Any, text: str) -> Any:
    """``text`` as the type of a settings field (int, float, str, or those | None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() == "none":
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        return text.split("+")
    return hint(text)


def parse_candidate(text: str, base: SoftPromptConfig,
                    lora_base: LoraSettings | None) -> tuple[str, SoftPromptConfig, LoraSettings | None]:
    """``kind:key=value,...`` -> (kind, training settings, LoRA settings or None); ``SystemExit`` naming a bad key."""
    kind, _, settings = text.partition(":")
    if kind not in KINDS:
        raise SystemExit(f"candidate {text!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
    training_hints = typing.get_type_hints(SoftPromptConfig)
    lora_hints = typing.get_type_hints(LoraSettings)
    training, lora = {}, {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if kind == "lora" and key in lora_hints:
            lora[key] = _value(lora_hints[key], value)
        elif key in training_hints:
            training[key] = _value(training_hints[key], value)
        else:
            raise SystemExit(f"candidate {text!r}: unknown setting {key!r}")
    lora_settings = dataclasses.replace(lora_base or LoraSettings(), **lora) if kind == "lora" else None
    return kind, dataclasses.replace(base, **training), lora_settings


def _unprompted_val_ppl(model: torch.nn.Module, windows: torch.Tensor, config: SoftPromptConfig, n_lead: int) -> float:
    empty = torch.zeros(0, model.get_input_embeddings().weight.shape[1])
    return math.exp(validation_scores(Learner(model, {}, empty, "none"), windows, config, n_lead)["val_loss"])


def _train(kind: str, config: SoftPromptConfig, lora: LoraSettings | None, matrix: MatrixConfig, checkpoint: Path,
           spec: str, folder: Path) -> dict[str, Any]:
    """Train one candidate on a fresh copy of the compressed model; its training record."""
    dtype = getattr(torch, matrix.dtype)
    loaded = load_model(matrix.model, CheckpointFolder(checkpoint), dtype=dtype, device="cpu")
    teacher = load_model(matrix.model, None, dtype=dtype, device="cpu").model if config.objective == "kd" else None
    common = {"model_name": matrix.model, "compression": spec, "teacher": teacher}
    source = matrix.prompts.soft.sources[0]
    if kind == "lora":
        return read_lora(train_lora(loaded.model, loaded.tokenizer, config, lora, source, folder, **common))
    train_soft_prompt(loaded.model, loaded.tokenizer, config, source, folder, **common)
    return json.loads((folder / "prompt.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/recovery.yaml"))
    parser.add_argument("--spec", default="gptq-w3g64", help="the compression level to recover")
    parser.add_argument("--candidate", action="append", required=True, help="kind:key=value,... (repeatable)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--keep", type=Path, help="keep each candidate's artifact in KEEP/<number> (else discarded)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    matrix = load_config(args.config)
    base, lora_base = matrix.prompts.soft.training, matrix.prompts.lora
    candidates = [(text, *parse_candidate(text, base, lora_base)) for text in args.candidate]
    spec = str(Spec.parse(args.spec))
    checkpoint = cached_checkpoint(matrix.model, Spec.parse(spec), matrix.compression.calibration)
    dense = load_model(matrix.model, None, dtype=getattr(torch, matrix.dtype), device="cpu")
    compressed = load_model(matrix.model, CheckpointFolder(checkpoint), dtype=getattr(torch, matrix.dtype),
                            device="cpu")
    source = matrix.prompts.soft.sources[0]
    load_before = os.getloadavg()
    rows, references = [], {}
    for text, kind, config, lora in candidates:
        lead = lead_ids(resolve_position(config.prompt_position, dense.tokenizer), dense.tokenizer)
        windows = validation_windows(corpus_stream(source, "validation", dense.tokenizer).ids, config, lead)
        key = (config.seqlen, config.eval_windows, tuple(lead))
        if key not in references:
            references[key] = (_unprompted_val_ppl(dense.model, windows, config, len(lead)),
                               _unprompted_val_ppl(compressed.model, windows, config, len(lead)))
        dense_ppl, compressed_ppl = references[key]
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.keep / str(len(rows)) if args.keep else Path(tmp) / "artifact"
            meta = _train(kind, config, lora, matrix, checkpoint, spec, folder)
        best = meta["best"]["val_ppl"]
        rows.append({"candidate": text, "kind": kind, "objective": config.objective,
                     "trainable_parameters": meta["trainable_parameters"], "steps": config.steps,
                     "tokens_seen": meta["tokens_seen"], "train_seconds": round(meta["train_seconds"], 1),
                     "wall_seconds": round(time.perf_counter() - started, 1), "best_step": meta["best"]["step"],
                     "dense_val_ppl": dense_ppl, "compressed_val_ppl": compressed_ppl, "best_val_ppl": best,
                     "val_gap_closed": (compressed_ppl - best) / (compressed_ppl - dense_ppl)})
        row = rows[-1]
        print(f"{text}: best val ppl {best:.2f} (dense {dense_ppl:.2f}, {spec} {compressed_ppl:.2f}), gap closed "
              f"{row['val_gap_closed']:.0%} in {row['train_seconds']:.0f} s", flush=True)
    headers = ["candidate", "params", "steps", "tokens", "train s", "best step", "val ppl", "val gap closed"]
    table = [[r["candidate"], f"{r['trainable_parameters']:,}", r["steps"], f"{r['tokens_seen']:,}",
              f"{r['train_seconds']:.0f}", r["best_step"], f"{r['best_val_ppl']:.2f}", f"{r['val_gap_closed']:.0%}"]
             for r in rows]
    print(f"\n{spec} on {source} (validation split): dense {dense_ppl:.2f}, unprompted {compressed_ppl:.2f}")
    print(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True))
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load average before {load['before'][0]:.2f}, after {load['after'][0]:.2f}")
    if args.out:
        write_json_atomic(args.out, {"spec": spec, "source": source, "config": str(args.config), "rows": rows,
                                     "load_average": load, "environment": environment_record({"training": base.seed})})


if __name__ == "__main__":
    main()
