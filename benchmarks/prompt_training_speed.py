"""Soft-prompt training throughput: ``cpt-bench prompt train``'s loop against a PEFT PromptTuning loop.

Both sides train an ``--n-tokens`` prompt on the same compressed model (a cached checkpoint, simulated, fp32) in
this process, with the same batches (``--batch`` windows of ``--seqlen`` tokens from the same seeded random starts
in the Wikipedia train split, BOS first), the same optimiser (AdamW, linear schedule with warmup, gradient clipping
at 1.0) and the same number of ``--steps``:

- ours: ``prompts.soft.train_soft_prompt`` with one validation at the end (``eval_every = steps``, one window), its
  recorded ``train_seconds`` (the step-0 validation excluded, the last one included: that counts against us);
- reference: ``peft.get_peft_model(model, PromptTuningConfig(num_virtual_tokens=n))``, ``model(input_ids, labels)``,
  timed over the same steps (PEFT puts the virtual tokens before BOS, ours after it: same cost).

Sides alternate for ``--rounds`` rounds (each on a fresh copy of the model); the ratio is the median tokens/s of ours
over PEFT's. Target from the issue: >= 1.0::

    CPT_BENCH_CACHE=... python benchmarks/prompt_training_speed.py --spec gptq-w3g64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from cpt_bench.compress import CalibrationSettings, Spec, cached_checkpoint
from cpt_bench.models import CheckpointFolder, load_model
from cpt_bench.recovery.position import AFTER_BOS, lead_ids
from cpt_bench.recovery.soft import train_soft_prompt
from cpt_bench.recovery.training import SoftPromptConfig, with_lead
from cpt_bench.tokens import corpus_stream

SOURCE = "wikipedia"


def _config(args: argparse.Namespace) -> SoftPromptConfig:
    return SoftPromptConfig(n_virtual_tokens=args.n_tokens, lr=0.03, warmup_steps=2, steps=args.steps,
                            batch_size=args.batch, seqlen=args.seqlen, eval_every=args.steps, eval_windows=1,
                            seed=0, prompt_position=AFTER_BOS)


def ours(folder: Path, args: argparse.Namespace) -> float:
    """Tokens per second of our training loop (its recorded ``train_seconds``)."""
    loaded = load_model(args.model, CheckpointFolder(folder), dtype=torch.float32, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out = train_soft_prompt(loaded.model, loaded.tokenizer, _config(args), SOURCE, Path(tmp) / "prompt",
                                model_name=args.model, compression=args.spec)
        meta = json.loads((out / "prompt.json").read_text())
    return meta["tokens_seen"] / meta["train_seconds"]


def peft_reference(folder: Path, args: argparse.Namespace) -> float:
    """Tokens per second of a PEFT PromptTuning loop on the same batches and optimiser."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    config = _config(args)
    loaded = load_model(args.model, CheckpointFolder(folder), dtype=torch.float32, device="cpu")
    model = get_peft_model(loaded.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                            num_virtual_tokens=config.n_virtual_tokens))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    tokens = corpus_stream(SOURCE, "train", loaded.tokenizer).ids
    lead = lead_ids(AFTER_BOS, loaded.tokenizer)
    width = config.seqlen - len(lead)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    started = time.perf_counter()
    for _ in range(config.steps):
        starts = torch.randint(0, tokens.numel() - width + 1, (config.batch_size,), generator=generator)
        ids = with_lead(torch.stack([tokens[s: s + width] for s in starts.tolist()]), lead)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - started
    return config.steps * config.batch_size * config.seqlen / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--spec", default="gptq-w3g64")
    parser.add_argument("--n-windows", type=int, default=32, help="calibration windows of the checkpoint")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="calibration window tokens")
    parser.add_argument("--n-tokens", type=int, default=20, help="prompt length")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = cached_checkpoint(args.model, Spec.parse(args.spec), CalibrationSettings(args.n_windows,
                                                                                      args.calib_seqlen))
    load_before = os.getloadavg()
    speeds: dict[str, list[float]] = {"ours": [], "peft": []}
    for _ in range(args.rounds):
        speeds["ours"].append(ours(folder, args))
        speeds["peft"].append(peft_reference(folder, args))
    medians = {side: statistics.median(values) for side, values in speeds.items()}
    ratio = medians["ours"] / medians["peft"]
    print(tabulate([[side, ", ".join(f"{v:.0f}" for v in values), f"{medians[side]:.0f}"]
                    for side, values in speeds.items()], headers=["loop", "tokens/s per round", "median"]))
    print(f"ours / PEFT PromptTuning: x{ratio:.3f} (target >= 1.0); {args.spec}, {args.n_tokens}-token prompt, "
          f"{args.steps} steps x {args.batch} x {args.seqlen} tokens, {args.threads} threads, load average "
          f"{load_before[0]:.2f} before")
    if args.out:
        from cpt_bench.files import write_json_atomic
        from cpt_bench.provenance import environment_record

        record: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
                                  "tokens_per_second": speeds, "median": medians, "ratio": ratio,
                                  "load_average": {"before": load_before, "after": os.getloadavg()},
                                  "environment": environment_record({"training": 0})}
        write_json_atomic(args.out, record)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
