"""Real low-bit CPU kernels vs simulated compression: token perplexity, time and peak memory.

Compresses a model (cached: ``cached_checkpoint``), then evaluates it once per mode, each in a fresh
subprocess so that peak RSS (``ru_maxrss``) is comparable: token perplexity over the first ``--windows``
non-overlapping ``--seqlen``-token windows of the wikipedia test split (joined with "\\n\\n", GPTQ-style:
each window scores its ``seqlen - 1`` next-token predictions). Prints a table and the ratios real/simulated.

    nice -n 10 python benchmarks/kernels_memory.py --spec gptq-w4g64 --n-windows 32 --calib-seqlen 512
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
from tabulate import tabulate

from cpt_bench.provenance import peak_memory

MODES = {  # label -> (mode, dtype)
    "simulated fp32": ("simulated", "float32"),
    "simulated bf16": ("simulated", "bfloat16"),
    "real int4/int8 bf16": ("real", "bfloat16"),
    "real int4/int8 fp32": ("real", "float32"),  # exact but torch's fp32 int4 path is ~75x slower: not by default
}
DEFAULT_MODES = ("simulated fp32", "simulated bf16", "real int4/int8 bf16")


def evaluate(folder: str, mode: str, dtype_name: str, windows: int, seqlen: int) -> dict:
    """Load the compressed folder in ``mode`` and measure token perplexity; seconds and peak RSS in bytes."""
    from cpt_bench.assets.model import load_tokenizer
    from cpt_bench.compress import load_checkpoint
    from cpt_bench.tokens import corpus_stream

    started = time.perf_counter()
    model, modes = load_checkpoint(folder, mode, getattr(torch, dtype_name))
    load_seconds = time.perf_counter() - started
    ids = corpus_stream("wikipedia", "test", load_tokenizer(folder)).ids[: windows * seqlen].reshape(windows, seqlen)
    started = time.perf_counter()
    total_nll = 0.0
    with torch.inference_mode():
        for window in ids:
            logits = model(window[None]).logits[0, :-1].float()
            total_nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
    eval_seconds = time.perf_counter() - started
    return {"ppl": math.exp(total_nll / (windows * (seqlen - 1))), "load_seconds": load_seconds,
            "eval_seconds": eval_seconds, "peak_rss_bytes": peak_memory()["peak_memory_bytes"],
            "layer_modes": sorted(set(modes.values()))}


def run_child(folder: str, label: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", label, "--folder", folder, "--windows", str(args.windows),
               "--seqlen", str(args.seqlen), "--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--spec", default="gptq-w4g64")
    parser.add_argument("--n-windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="calibration window tokens")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows")
    parser.add_argument("--seqlen", type=int, default=1024, help="evaluation window tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated labels of MODES")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        mode, dtype_name = MODES[args.child]
        print(json.dumps(evaluate(args.folder, mode, dtype_name, args.windows, args.seqlen)))
        return

    from cpt_bench.compress import CalibrationSettings, Spec, cached_checkpoint, memory_table, read_manifest

    started = time.perf_counter()
    folder = cached_checkpoint(args.model, Spec.parse(args.spec), CalibrationSettings(args.n_windows,
                                                                                      args.calib_seqlen))
    manifest = read_manifest(folder)
    print(f"{folder}: ready in {time.perf_counter() - started:.1f} s "
          f"(compression itself took {manifest['total_seconds']:.1f} s when the entry was built)")
    print(memory_table(manifest))
    results = {label: run_child(str(folder), label, args) for label in args.modes.split(",")}
    rows = [[label, f"{r['ppl']:.3f}", f"{r['load_seconds']:.1f}", f"{r['eval_seconds']:.1f}",
             f"{r['peak_rss_bytes'] / 2**20:.0f}", ", ".join(r["layer_modes"])] for label, r in results.items()]
    print(tabulate(rows, headers=["mode", "token ppl", "load s", "eval s", "peak RSS MiB", "layers"]))
    for real, simulated in (("real int4/int8 bf16", "simulated bf16"), ("real int4/int8 bf16", "simulated fp32"),
                            ("real int4/int8 fp32", "simulated fp32")):
        if real in results and simulated in results:
            r, s = results[real], results[simulated]
            print(f"{real} / {simulated}: eval time x{r['eval_seconds'] / s['eval_seconds']:.2f}, "
                  f"peak RSS x{r['peak_rss_bytes'] / s['peak_rss_bytes']:.2f}, ppl {r['ppl']:.3f} vs {s['ppl']:.3f}")


if __name__ == "__main__":
    main()
