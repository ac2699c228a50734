"""From a model folder to a self-contained compressed checkpoint folder, and back to a runnable model.

A compressed folder holds ``save_compressed``'s ``model.safetensors`` + ``compression.json`` and the base
model's ``config.json`` and tokenizer files, so it loads without the original weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

from cpt_bench.assets.model import load_causal_lm, load_tokenizer
from cpt_bench.compress.calibration import corpus_calibration_ids
from cpt_bench.compress.kernels import swap_in_kernels
from cpt_bench.compress.sequential import CalibrationSettings, compress_model
from cpt_bench.compress.spec import Spec
from cpt_bench.compress.storage import StorageError, check_fits, read_checkpoint, save_compressed

MODES = ("simulated", "real")
STAGING_PREFIX = ".staging-"


def compress_into(out: Path, model_folder: str | os.PathLike, spec: Spec, settings: CalibrationSettings,
                  progress: bool = True) -> dict:
    """Compress the fp32 model in ``model_folder`` by ``spec`` and write the compressed folder ``out``.

    Calibration windows come from ``settings.corpus`` (train split) when the spec needs them. Shows a tqdm
    bar over decoder layers when ``progress``. ``out`` and a staging folder inside it are made first, so an
    unusable ``out`` fails before the work; every file is written into the staging folder and moved into place
    only once all are complete, so a failure (a bad spec, a full disk) leaves the files already in ``out`` as
    they were (and removes ``out`` if it was made here). Returns a summary (spec, seconds, memory account).
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIX))
    try:
        summary = _compress_files(staging, model_folder, spec, settings, progress)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == summary["manifest"]):  # the manifest last
            os.replace(path, out / path.name)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def compute_device() -> torch.device:
    """Where compression runs: the first CUDA device when there is one (as in the GPTQ paper), else the CPU.

    The algorithms run in fp32 on either; results agree to float rounding, not bit for bit.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _compress_files(folder: Path, model_folder: str | os.PathLike, spec: Spec, settings: CalibrationSettings,
                    progress: bool) -> dict:
    """Compress the model and write the checkpoint, its config and its tokenizer into ``folder``; the summary."""
    tokenizer = load_tokenizer(str(model_folder))
    ids = corpus_calibration_ids(tokenizer, settings) if spec.needs_calibration else None
    model = load_causal_lm(str(model_folder), dtype=torch.float32).to(compute_device())
    result = compress_model(model, spec, ids, settings, progress=progress)
    manifest_path = save_compressed(model, result, folder)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"spec": str(spec), "seconds": result.seconds, "manifest": manifest_path.name}


def default_dtype(mode: str) -> torch.dtype:
    """fp32 for simulated models; bf16 for real kernels (torch 2.13's int4 CPU kernel also takes fp32 activations
    but is measured ~75x slower than a dense fp32 matmul at 1024 tokens, while bf16 is within 1.6x of dense)."""
    return torch.bfloat16 if mode == "real" else torch.float32


def load_compressed_model(folder: str | os.PathLike, mode: str = "simulated", dtype: torch.dtype | None = None,
                          fallback: bool = False) -> tuple[nn.Module, dict[str, str]]:
    """Build the model of a compressed folder on CPU without allocating its dense weights first.

    Args:
        folder: a folder written by ``compress_into``.
        mode: ``"simulated"``: compressed Linears hold their dequantized (and pruned) weights in ``dtype``;
            ``"real"``: they become ``LowBitLinear`` (packed codes, torch's int4/int8 CPU kernels, activations
            in ``dtype``; ``kernels.swap_in_kernels``).
        dtype: dtype of the model's floating tensors and of the kernels' activations (``default_dtype(mode)``
            if None).
        fallback: real mode only: run layers without a kernel simulated instead of raising.

    Returns:
        The model in eval mode, and the mode of each compressed Linear.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    dtype = dtype or default_dtype(mode)
    checkpoint = read_checkpoint(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    model.tie_weights()  # accelerate's meta patch replaces each registered Parameter, which unties them
    check_fits(checkpoint, model, str(folder))
    state = {name: _cast(tensor, dtype) for name, tensor in checkpoint.tensors.items()}
    if mode == "simulated":
        state |= {f"{name}.weight": layer.weight().to(dtype) for name, layer in checkpoint.layers.items()}
        modes = dict.fromkeys(checkpoint.layers, "simulated")
    model.load_state_dict(state, strict=False, assign=True)
    if mode == "real":
        modes = swap_in_kernels(model, checkpoint.layers, dtype, fallback)
    model.tie_weights()
    _check_materialized(model, folder)
    return model.eval(), modes


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _check_materialized(model: nn.Module, folder: str | os.PathLike) -> None:
    missing = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    if missing:
        raise StorageError(f"checkpoint {folder} left tensors unloaded: {missing[:3]}")


def memory_table(manifest: dict) -> str:
    """The memory account of a compressed checkpoint (``compression.json``) as a text table.

    Rows: the compressed Linears, every other tensor (16-bit), the whole checkpoint; columns: stored MB,
    weights, bits per weight, and the ratio to the same tensors stored densely in fp16.
    """
    memory = manifest["memory"]
    weights = memory["compressed_layer_weights"]
    layer_dense = 2 * weights
    other_dense = memory["dense_fp16_bytes"] - layer_dense
    rows = [
        ["compressed Linears", memory["compressed_layer_bytes"], weights, layer_dense],
        ["other tensors", memory["other_bytes"], other_dense // 2, other_dense],
        ["total", memory["stored_bytes"], weights + other_dense // 2, memory["dense_fp16_bytes"]],
    ]
    table = [[label, f"{stored / 1e6:.2f}", f"{count:,}", f"{8 * stored / count:.2f}" if count else "-",
              f"{stored / dense:.3f}" if dense else "-"] for label, stored, count, dense in rows]
    headers = ["tensors", "stored MB", "weights", "bits/weight", "ratio to dense fp16"]
    return f"spec {manifest['spec']}\n" + tabulate(table, headers=headers, disable_numparse=True)
