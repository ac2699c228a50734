"""Memory and speed as a deployment sees them: dense vs real-kernel compressed models, with and without a prompt.

Each model variant runs in a fresh subprocess (so peak RSS belongs to it alone): dense in bf16 (the baseline every
ratio is taken against), then each ``--specs`` checkpoint loaded with real CPU kernels (``kernels.swap_in_kernels``,
bf16 activations; layers without a kernel, 2- and 3-bit codes, run simulated and the record says so per format).
In each subprocess, with no lm-eval, datasets or tokenizer work in the measured window:

1. memory: RSS before the model loads (torch and transformers imported, each kernel the loop uses run once on tiny
   tensors so that the libraries' pages count before, not after), the bytes its tensors hold
   (``models.resident_bytes``) and RSS once loaded (after handing the loader's freed temporaries back to the
   system: ``malloc_trim``); then the peak RSS of a plain loop: prefill ``--context`` tokens of
   Wikipedia test text at batch ``--batch`` and decode ``--decode`` tokens greedily with the key/value cache, logits
   of the last position only. "Model peak" is that peak minus the RSS before loading.
2. the prompt's serving cost, per ``--prompt-tokens`` length n (random embeddings of the embedding table's mean norm:
   cost depends on n only): the one-off prefill of the prompt (its key/value cache, shared by every request), the
   prefill of the context after it against without it, decode tokens/s after it against without it, and the bytes
   of its key/value cache per sequence. Times are medians of ``--repeats``.

Prints two tables and the ratios to dense, and writes everything (machine, versions, load average) as JSON::

    CPT_BENCH_CACHE=... python benchmarks/deployment.py --specs gptq-w4g64,gptq-w3g64 \\
        --out results/benchmarks/deployment.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

DENSE = "dense"


def _release_freed_memory() -> None:
    """Return the C heap's freed pages to the system (glibc ``malloc_trim``), so that RSS after loading counts what
    the model holds, not the loader's freed temporaries that the allocator kept; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _warm_up() -> None:
    """Run each kind of kernel the loop uses once on tiny tensors (bf16 matmul, the int4 and int8 weight-only
    kernels, attention), so that the libraries' code and workspaces they page in are in the RSS before the model
    loads, for every variant alike, and "model peak" counts the model, its activations and its cache only."""
    from cpt_bench.compress.kernels import INT4_OUT_MULTIPLE

    x = torch.randn(8, 64, dtype=torch.bfloat16)
    x @ torch.randn(64, 64, dtype=torch.bfloat16)
    codes = torch.randint(0, 16, (INT4_OUT_MULTIPLE * 4, 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, torch.ones(2, codes.shape[0], 2, dtype=torch.bfloat16))
    torch.ops.aten._weight_int8pack_mm(x, torch.ones(16, 64, dtype=torch.int8), torch.ones(16, dtype=torch.bfloat16))
    heads = torch.randn(1, 2, 8, 32, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(heads, heads, heads, is_causal=True)


def _load(model_name: str, spec: str, calibration: tuple[int, int]) -> tuple[torch.nn.Module, dict[str, int]]:
    """The dense model in bf16, or ``spec``'s cached checkpoint on real kernels (fallback: simulated), and the
    count of compressed Linears per format."""
    from cpt_bench.compress import CalibrationSettings
    from cpt_bench.models import load_model, weight_formats

    compression = None if spec == DENSE else spec
    loaded = load_model(model_name, compression, mode="simulated" if compression is None else "real",
                        dtype=torch.bfloat16, device="cpu", calibration=CalibrationSettings(*calibration),
                        progress=False, fallback=True)
    return loaded.model, weight_formats(loaded.layer_modes)


def _context_ids(model_name: str, batch: int, context: int) -> torch.Tensor:
    """``[batch, context]`` token ids: consecutive windows of the Wikipedia test split."""
    from cpt_bench.assets.model import load_tokenizer
    from cpt_bench.tokens import corpus_stream

    ids = corpus_stream("wikipedia", "test", load_tokenizer(model_name)).ids
    return ids[: batch * context].reshape(batch, context)


def _prompt_embeddings(model: torch.nn.Module, n: int) -> torch.Tensor:
    """``[n, hidden]`` bf16: the ``random`` control prompt's vectors (random directions, the embedding rows' mean
    norm)."""
    from cpt_bench.recovery.controls import random_prompt
    from cpt_bench.recovery.training import SoftPromptConfig

    return random_prompt(model, SoftPromptConfig(n_virtual_tokens=n)).to(torch.bfloat16)


def _cache_tensors(cache) -> list[torch.Tensor]:
    return [tensor for keys, values, *_ in cache for tensor in (keys, values)]


def _generate(model: torch.nn.Module, ids: torch.Tensor, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None,
              decode: int) -> tuple[float, float]:
    """Prefill ``ids [batch, context]`` after the cached ``prefix`` (per layer keys, values ``[1, heads, n, dim]``)
    and decode ``decode`` tokens greedily; seconds of the prefill and of the decode."""
    from transformers import DynamicCache

    batch = ids.shape[0]
    n_prefix = 0 if prefix is None else prefix[0][0].shape[2]
    data = None if prefix is None else [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix]
    cache = DynamicCache(ddp_cache_data=data, config=model.config)
    mask = torch.ones(batch, n_prefix + ids.shape[1], dtype=torch.long)
    started = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - started
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    started = time.perf_counter()
    for _ in range(decode):
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True,
                    logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, time.perf_counter() - started


def _prompt_cache(model: torch.nn.Module, n: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float, int]:
    """The key/value cache of an ``n``-token prompt, the seconds its prefill took and its bytes per sequence."""
    from transformers import DynamicCache

    cache = DynamicCache()
    started = time.perf_counter()
    model(inputs_embeds=_prompt_embeddings(model, n)[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - started
    pairs = [(keys, values) for keys, values, *_ in cache]
    return pairs, seconds, sum(t.numel() * t.element_size() for t in _cache_tensors(cache))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One variant's memory and per-prompt timings (run in a subprocess of its own)."""
    from cpt_bench.models import resident_bytes
    from cpt_bench.provenance import current_rss_bytes, peak_memory, reset_peak_memory

    torch.set_num_threads(args.threads)
    ids = _context_ids(args.model, args.batch, args.context)
    _warm_up()
    _release_freed_memory()
    rss_before = current_rss_bytes()
    model, formats = _load(args.model, args.child, (args.n_windows, args.calib_seqlen))
    _release_freed_memory()
    record: dict[str, Any] = {"spec": args.child, "weight_formats": formats, "rss_before_load_bytes": rss_before,
                              "resident_bytes": resident_bytes(model), "rss_loaded_bytes": current_rss_bytes()}
    with torch.inference_mode():
        reset_peak_memory()
        _generate(model, ids, None, args.decode)
        record["loop_peak_rss_bytes"] = peak_memory()["peak_memory_bytes"]
        record["model_peak_bytes"] = record["loop_peak_rss_bytes"] - rss_before
        record["prompts"] = []
        for n in args.prompt_tokens:
            runs, prompt_seconds, kv_bytes = [], [], 0
            for _ in range(args.repeats):
                prefix = None
                if n:
                    prefix, seconds, kv_bytes = _prompt_cache(model, n)
                    prompt_seconds.append(seconds)
                runs.append(_generate(model, ids, prefix, args.decode))
            prefill, decode = (statistics.median(values) for values in zip(*runs, strict=True))
            record["prompts"].append({"tokens": n, "prompt_prefill_seconds": statistics.median(prompt_seconds or [0]),
                                      "context_prefill_seconds": prefill, "decode_seconds": decode,
                                      "decode_tokens_per_second": args.batch * args.decode / decode,
                                      "kv_bytes_per_sequence": kv_bytes})
    return record


def _child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{variant}: the measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _report(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    dense = records[0]
    mib = 2**20
    rows = [[r["spec"], ", ".join(f"{k}: {v}" for k, v in r["weight_formats"].items()) or "bf16",
             f"{r['resident_bytes'] / mib:.1f}", f"{r['resident_bytes'] / dense['resident_bytes']:.2f}",
             f"{r['loop_peak_rss_bytes'] / mib:.0f}", f"{r['model_peak_bytes'] / mib:.0f}",
             f"{r['model_peak_bytes'] / dense['model_peak_bytes']:.2f}"] for r in records]
    print(f"\nMemory: plain prefill of {args.batch} x {args.context} tokens + {args.decode} decoded (bf16 activations)")
    print(tabulate(rows, headers=["model", "Linear formats", "resident MiB", "x dense", "loop peak RSS MiB",
                                  "model peak MiB (peak - before load)", "x dense"]))
    rows = []
    for record in records:
        base = record["prompts"][0] if record["prompts"][0]["tokens"] == 0 else None
        saved = dense["resident_bytes"] - record["resident_bytes"]
        for prompt in record["prompts"]:
            extra = (f"{prompt['context_prefill_seconds'] / base['context_prefill_seconds']:.3f}"
                     if base else "–")
            speed = (f"{prompt['decode_tokens_per_second'] / base['decode_tokens_per_second']:.3f}"
                     if base else "–")
            kv = args.batch * prompt["kv_bytes_per_sequence"]
            rows.append([record["spec"], prompt["tokens"], f"{prompt['prompt_prefill_seconds'] * 1e3:.0f}",
                         f"{prompt['context_prefill_seconds'] * 1e3:.0f}", extra,
                         f"{prompt['decode_tokens_per_second']:.1f}", speed, f"{kv / 1e3:.1f}",
                         f"{saved / 1e6:.1f}" if record["spec"] != DENSE else "–"])
    print(f"\nPrompt serving cost: context {args.context} tokens, batch {args.batch}, {args.decode} decoded tokens, "
          f"median of {args.repeats}")
    print(tabulate(rows, headers=["model", "prompt tokens", "prompt prefill ms (once)", "context prefill ms",
                                  "x unprompted", "decode tok/s", "x unprompted", "prompt KV KB (batch)",
                                  "resident MB saved vs dense"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--specs", default="gptq-w4g64,sparsegpt-50+gptq-w4g64,gptq-w3g64",
                        help="comma-separated checkpoints to load on real kernels (dense bf16 always runs first)")
    parser.add_argument("--n-windows", type=int, default=32, help="calibration windows of the checkpoints")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="calibration window tokens")
    parser.add_argument("--context", type=int, default=512, help="context tokens prefilled per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward")
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded after the prefill")
    parser.add_argument("--prompt-tokens", type=lambda text: [int(n) for n in text.split(",")], default=[0, 20, 100],
                        help="prompt lengths to time (0: unprompted, the ratios' baseline)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    from cpt_bench.files import write_json_atomic
    from cpt_bench.provenance import environment_record

    records = [_child(variant, args) for variant in [DENSE, *args.specs.split(",")]]
    _report(records, args)
    if args.out:
        write_json_atomic(args.out, {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
                                     "load_average": os.getloadavg(), "records": records,
                                     "environment": environment_record({"prompt_noise": 0})})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
