"""Prompted evaluation speed: prefix key/value cache vs concatenated embeddings vs PEFT vs no prompt.

Evaluates the same model on the same lm-eval tasks four ways, in one process on one loaded model:
``cpt`` unprompted, ``cpt`` with a soft prompt and the prefix cache, ``cpt`` with the prompt concatenated
to every batch (``prefix_cache=false``), and plain ``hf`` with the prompt exported as a PEFT PromptTuning
adapter. The prompt is the untrained ``vocab`` initialisation (speed does not depend on its values).
Each variant runs ``--repeats`` times in rotating order; the fastest run counts. Prints seconds, the
ratio to unprompted (target for the cached prompt: <= 1.15) and the scores, which must agree across
the three prompted variants.

    nice -n 10 python benchmarks/prompt_cache_speed.py --tasks cpt_piqa --limit 100 --n-tokens 100
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate


def build_prompt(model, tokenizer, name: str, n_tokens: int, folder: Path) -> tuple[Path, Path]:
    """An untrained prompt folder and its PEFT export (also used by ``generation_speed.py``)."""
    from cpt_bench.recovery.artifact import export_peft, save_prompt
    from cpt_bench.recovery.soft import initial_prompt
    from cpt_bench.recovery.target import describe_target
    from cpt_bench.recovery.training import SoftPromptConfig

    config = SoftPromptConfig(n_virtual_tokens=n_tokens)
    training = {"source": {"corpus": "none"}, "hyperparameters": {"seed": 0}, "curve": [], "train_seconds": 0.0}
    prompt = save_prompt(folder / "prompt", initial_prompt(model, tokenizer, config),
                         describe_target(model, tokenizer, name), "dense", training)
    return prompt, export_peft(prompt, folder / "peft")


def _variants(args: argparse.Namespace, folder: Path) -> dict:
    """Label -> lm-eval LM, all sharing one loaded model (PEFT wraps a deep copy)."""
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel

    from cpt_bench.lmeval.adapter import CptLM
    from cpt_bench.models import load_model

    loaded = load_model(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt, peft = build_prompt(model, tokenizer, args.model, args.n_tokens, folder)
    common = {"tokenizer": tokenizer, "batch_size": args.batch_size, "device": args.device}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(peft)).eval()
    unprompted = CptLM(pretrained=model, **common)
    return {
        "unprompted": unprompted,
        "prompt, prefix cache": CptLM(pretrained=model, soft_prompt=str(prompt), **common),
        "prompt, concatenated": CptLM(pretrained=model, soft_prompt=str(prompt), prefix_cache=False, **common),
        "prompt, PEFT (hf)": HFLM(pretrained=peft_model, max_length=unprompted.max_length - args.n_tokens,
                                  **common),
    }


def _evaluate(lm, tasks: list[str], args: argparse.Namespace) -> tuple[float, dict]:
    """Seconds for one ``simple_evaluate`` and the first metric of each task."""
    import lm_eval

    from cpt_bench.lmeval.tasks import task_manager

    manager = task_manager(args.model, args.seqlen)
    started = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=args.limit, task_manager=manager, verbosity="ERROR")
    seconds = time.perf_counter() - started
    scores = {task: next(v for k, v in metrics.items() if "," in k and "stderr" not in k)
              for task, metrics in out["results"].items()}
    return seconds, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--tasks", default="cpt_piqa", help="comma-separated lm-eval tasks")
    parser.add_argument("--limit", type=int, default=100, help="items (documents) per task")
    parser.add_argument("--n-tokens", type=int, default=100, help="prompt length in virtual tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=1024, help="window length of cpt_ppl_* tasks")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    with tempfile.TemporaryDirectory() as tmp:
        variants = _variants(args, Path(tmp))
        seconds = {label: float("inf") for label in variants}
        scores = {}
        for repeat in range(args.repeats):
            labels = list(variants)
            for label in labels[repeat % len(labels):] + labels[: repeat % len(labels)]:
                elapsed, scores[label] = _evaluate(variants[label], tasks, args)
                seconds[label] = min(seconds[label], elapsed)
    base = seconds["unprompted"]
    rows = [[label, f"{s:.2f}", f"{s / base:.3f}", *(f"{scores[label][t]:.6g}" for t in tasks)]
            for label, s in seconds.items()]
    print(f"model {args.model}, tasks {tasks}, limit {args.limit}, prompt {args.n_tokens} tokens, batch "
          f"{args.batch_size}, device {args.device}, torch threads {torch.get_num_threads()}")
    print(tabulate(rows, headers=["variant", "seconds (best)", "x unprompted", *tasks]))


if __name__ == "__main__":
    main()
