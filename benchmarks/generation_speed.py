"""Prompted generation speed: the prefix key/value cache against no prompt and against concatenated embeddings.

Generates for the same contexts three ways through the ``cpt`` adapter's ``generate_until``, in one process on one
loaded model: unprompted, with a soft prompt and its prefix cache, and with the prompt concatenated to every batch
(``prefix_cache=false``). The contexts are consecutive pieces of ``--min-context`` to ``--max-context`` tokens of
the Wikipedia test split (decoded to text; unequal lengths, so lm-eval left-pads each batch). Greedy, no stop string,
and ``min_new_tokens = max_gen_toks``: every row gets exactly ``--max-gen-toks`` new tokens in every variant, so the
variants do the same work whatever they generate. The prompt is the untrained ``vocab`` initialisation (speed does
not depend on its values). The variants run in turn (A B C A B C ...) ``--repeats`` times; the median counts. Prints
seconds, the ratio to unprompted (target for the cached prompt: <= 1.10), whether the cached and concatenated paths
generated the same strings, and the load average before and after::

    nice -n 0 python benchmarks/generation_speed.py --out results/benchmarks/generation-speed.json
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from prompt_cache_speed import build_prompt  # the sibling script (a script's folder is first on sys.path)
from tabulate import tabulate

UNPROMPTED, CACHED, CONCATENATED = "unprompted", "prompt, prefix cache", "prompt, concatenated"


def contexts(tokenizer, n: int, shortest: int, longest: int, seed: int = 0) -> list[str]:
    """``n`` consecutive pieces of the Wikipedia test split, each of a random length in [shortest, longest]
    tokens, decoded to text."""
    from cpt_bench.tokens import corpus_stream

    ids = corpus_stream("wikipedia", "test", tokenizer).ids.tolist()
    rng = random.Random(seed)
    pieces, start = [], 0
    for _ in range(n):
        length = rng.randint(shortest, longest)
        if start + length > len(ids):
            raise SystemExit(f"the Wikipedia test split has {len(ids)} tokens, too few for {n} contexts")
        pieces.append(tokenizer.decode(ids[start: start + length], skip_special_tokens=True))
        start += length
    return pieces


def variants(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Label -> ``CptLM``, all three on one loaded model."""
    from cpt_bench.lmeval.adapter import CptLM
    from cpt_bench.models import load_model

    loaded = load_model(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt, _ = build_prompt(model, tokenizer, args.model, args.n_tokens, folder)
    common = {"pretrained": model, "tokenizer": tokenizer, "batch_size": args.batch_size, "device": args.device}
    return {UNPROMPTED: CptLM(**common),
            CACHED: CptLM(soft_prompt=str(prompt), **common),
            CONCATENATED: CptLM(soft_prompt=str(prompt), prefix_cache=False, **common)}


def timed_generation(lm, texts: list[str], max_gen_toks: int) -> tuple[float, list[str]]:
    """Seconds for one ``generate_until`` over ``texts`` and the strings it generated."""
    from lm_eval.api.instance import Instance

    settings = {"until": [], "max_gen_toks": max_gen_toks, "min_new_tokens": max_gen_toks, "do_sample": False}
    requests = [Instance(request_type="generate_until", doc={}, arguments=(text, dict(settings)), idx=i)
                for i, text in enumerate(texts)]
    started = time.perf_counter()
    out = lm.generate_until(requests, disable_tqdm=True)
    return time.perf_counter() - started, out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every variant ``args.repeats`` times in turn; per-repeat seconds, medians, ratios of the medians and
    per repeat (each against the unprompted run of the same round), and the string checks."""
    with tempfile.TemporaryDirectory() as tmp:
        lms = variants(args, Path(tmp))
        texts = contexts(lms[UNPROMPTED].tokenizer, args.contexts, args.min_context, args.max_context)
        context_tokens = [len(lms[UNPROMPTED].tok_encode(text)) for text in texts]
        seconds: dict[str, list[float]] = {label: [] for label in lms}
        generated: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for label, lm in lms.items():
                elapsed, generated[label] = timed_generation(lm, texts, args.max_gen_toks)
                seconds[label].append(elapsed)
    medians = {label: statistics.median(values) for label, values in seconds.items()}
    return {"context_tokens": context_tokens, "seconds": seconds, "median_seconds": medians,
            "ratio_to_unprompted": {label: medians[label] / medians[UNPROMPTED] for label in medians},
            "ratio_to_unprompted_per_repeat": {
                label: [s / base for s, base in zip(values, seconds[UNPROMPTED], strict=True)]
                for label, values in seconds.items()},
            "cached_equals_concatenated": generated[CACHED] == generated[CONCATENATED],
            "prompt_changes_output": generated[CACHED] != generated[UNPROMPTED],
            "examples": {label: strings[0] for label, strings in generated.items()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--n-tokens", type=int, default=100, help="prompt length in virtual tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--contexts", type=int, default=8, help="generation requests per measurement")
    parser.add_argument("--min-context", type=int, default=100, help="shortest context, tokens")
    parser.add_argument("--max-context", type=int, default=200, help="longest context, tokens")
    parser.add_argument("--max-gen-toks", type=int, default=64, help="new tokens per request (all of them made)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, which honours OMP_NUM_THREADS; "
                        "on cores shared with other jobs, fewer threads than cores avoids stalls)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the settings, timings and environment as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print the table and the checks, write ``--out``; returns the record written."""
    from cpt_bench.files import write_json_atomic
    from cpt_bench.provenance import environment_record

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    result = measure(args)
    load_after = os.getloadavg()
    rows = [[label, " ".join(f"{s:.2f}" for s in result["seconds"][label]), f"{median:.2f}",
             f"{result['ratio_to_unprompted'][label]:.3f}",
             " ".join(f"{r:.2f}" for r in result["ratio_to_unprompted_per_repeat"][label])]
            for label, median in result["median_seconds"].items()]
    print(f"model {args.model}, {args.contexts} contexts of {min(result['context_tokens'])}-"
          f"{max(result['context_tokens'])} tokens, batch {args.batch_size}, {args.max_gen_toks} new tokens each, "
          f"prompt {args.n_tokens} tokens, device {args.device}, torch threads {torch.get_num_threads()}")
    print(tabulate(rows, headers=["variant", "seconds per repeat", "median", "x unprompted", "x per repeat"]))
    print(f"prefix cache and concatenated generate the same strings: {result['cached_equals_concatenated']}; "
          f"the prompt changes the output: {result['prompt_changes_output']}")
    print("load average (1/5/15 min) before " + " ".join(f"{x:.2f}" for x in load_before) + ", after "
          + " ".join(f"{x:.2f}" for x in load_after))
    record = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
              "load_average_before": load_before, "load_average_after": load_after, **result,
              "environment": environment_record({"prompt_init": 0, "contexts": 0})}
    if args.out:
        write_json_atomic(args.out, record)
        print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
