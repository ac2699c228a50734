"""Compressed checkpoints: one entry per job.

- ``compress_to_folder(model, spec, settings, out)``: compress a model into a self-contained checkpoint folder;
- ``cached_checkpoint(model, spec, settings)``: the cache's checkpoint of (model weights, spec, calibration),
  compressed on first use and reused thereafter;
- ``load_checkpoint(folder, mode, dtype, device)``: a runnable model from a checkpoint folder.

A checkpoint folder holds ``storage.save_compressed``'s ``model.safetensors`` + ``compression.json`` (which names
the base model and its weight fingerprint, ``assets.model.model_fingerprint``) and the base model's
``config.json`` and tokenizer files, so it loads without the original weights.

Cache entry ``<cache>/compressed/<model name>-<spec>-<12 hex>``: the hex is a sha256 over the model fingerprint,
the canonical spec text and the calibration settings (none for specs that read no calibration data). Entries are
built through ``assets.cache.ensure_entry``: atomically, with a sha256 manifest, rebuilt when corrupted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from cpt_bench.assets.cache import ensure_entry
from cpt_bench.assets.model import load_causal_lm, load_tokenizer, model_fingerprint, model_folder
from cpt_bench.compress.calibration import corpus_calibration_ids
from cpt_bench.compress.eora import Compensator
from cpt_bench.compress.kernels import swap_in_kernels
from cpt_bench.compress.layers import state_weight
from cpt_bench.compress.sequential import compensate_model, compress_model
from cpt_bench.compress.spec import CalibrationSettings, Spec, SpecError
from cpt_bench.compress.storage import CHECKPOINT_KIND, StorageError, check_fits, read_checkpoint, save_compressed
from cpt_bench.files import ensure_replaceable, replacing_folder

MODES = ("simulated", "real")
KEY_HEX_CHARS = 12


def compute_device() -> torch.device:
    """Where compression runs: the first CUDA device when there is one (as in the GPTQ paper), else the CPU.

    The algorithms run in fp32 on either; results agree to float rounding, not bit for bit.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(mode: str) -> torch.dtype:
    """fp32 for simulated models; bf16 for real kernels (torch 2.13's int4 CPU kernel also takes fp32 activations
    but is measured ~75x slower than a dense fp32 matmul at 1024 tokens, while bf16 is within 1.6x of dense)."""
    return torch.bfloat16 if mode == "real" else torch.float32


def check_mode(mode: str) -> None:
    """Refuse a load mode other than ``simulated`` / ``real`` (one line)."""
    if mode not in MODES:
        raise SpecError(f"compression mode must be one of {', '.join(MODES)}, got {mode!r}")


# --- compress a model --------------------------------------------------------------------------------------------

def compress_to_folder(model: str | os.PathLike, spec: Spec, settings: CalibrationSettings, out: Path,
                       progress: bool = True, compensator: Compensator | None = None) -> dict:
    """Compress the fp32 ``model`` (``embedded``, a folder or a Hugging Face id) by ``spec`` into folder ``out``.

    Calibration windows come from ``settings.corpus`` (train split) when the spec needs them. Shows a tqdm bar over
    decoder layers when ``progress``. The folder is built beside ``out`` and takes its place only when complete
    (``files.replacing_folder``): a failure (a bad spec, a full disk) leaves ``out`` as it was. A folder ``out``
    that exists must be empty or an earlier checkpoint (it is replaced whole), never a folder of other files
    (``files.OutputPathError``, before anything loads). With an EoRA ``compensator`` (``eora.Compensator``), each
    Linear is corrected in the same pass and later ones are calibrated on the corrected outputs (the checkpoint then
    differs from one compressed without it); its ``fit`` holds the corrections. Returns a summary (spec, seconds,
    base model).
    """
    out = Path(out)
    ensure_replaceable(out, CHECKPOINT_KIND, "--out")
    with replacing_folder(out) as staging:
        return _write_checkpoint(staging, model, spec, settings, progress, compensator)


def _write_checkpoint(folder: Path, model: str | os.PathLike, spec: Spec, settings: CalibrationSettings,
                      progress: bool, compensator: Compensator | None = None) -> dict:
    """Compress ``model`` and write the checkpoint, its config and its tokenizer into ``folder``; the summary."""
    source = model_folder(model)
    base_model = {"name": str(model), "fingerprint": model_fingerprint(source)}
    tokenizer = load_tokenizer(str(source))
    calibrated = spec.needs_calibration or compensator is not None
    ids = corpus_calibration_ids(tokenizer, settings) if calibrated else None
    network = load_causal_lm(str(source), dtype=torch.float32).to(compute_device())
    result = compress_model(network, spec, ids, settings, progress=progress, compensator=compensator)
    save_compressed(network, result, folder, base_model)
    tokenizer.save_pretrained(folder)
    return {"spec": str(spec), "seconds": result.seconds, "base_model": base_model}


def compensate_checkpoint(folder: str | os.PathLike, settings: CalibrationSettings, compensator: Compensator,
                          progress: bool = True) -> tuple[nn.Module, object, dict]:
    """Fit EoRA (``compensator``) for the compressed checkpoint ``folder`` on calibration windows drawn by
    ``settings`` from its base model's tokenizer, layer by layer as ``sequential.compensate_model`` does.

    The base model is the one the checkpoint records (``compression.json``'s ``base_model``); it must still have the
    recorded weight fingerprint (``StorageError`` otherwise, before the base weights load). Returns the base model
    (holding ``Ŵ + B A``), its tokenizer and the checkpoint's manifest.
    """
    checkpoint = read_checkpoint(folder)
    base = checkpoint.manifest.get("base_model") or {}
    if not base.get("name"):
        raise StorageError(f"checkpoint {folder} does not record its base model; compress it again")
    source = model_folder(base["name"])
    if model_fingerprint(source) != base.get("fingerprint"):
        raise StorageError(f"checkpoint {folder} was compressed from another version of model {base['name']!r} "
                           "(its weight fingerprint differs)")
    tokenizer = load_tokenizer(str(source))
    ids = corpus_calibration_ids(tokenizer, settings)
    network = load_causal_lm(str(source), dtype=torch.float32).to(compute_device())
    compensate_model(network, checkpoint.layers, Spec.parse(checkpoint.manifest["spec"]), ids, settings, compensator,
                     progress)
    return network, tokenizer, checkpoint.manifest


# --- look up or build the cached one -----------------------------------------------------------------------------

def cache_key(fingerprint: str, spec: Spec, settings: CalibrationSettings) -> str:
    """Hex sha256 of (model fingerprint, spec text, calibration settings if the spec reads calibration data)."""
    calibration = asdict(settings) if spec.needs_calibration else None
    payload = {"model": fingerprint, "spec": str(spec), "calibration": calibration}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def entry_name(folder: Path, spec: Spec, key: str) -> str:
    """``compressed/<model name>-<spec>-<short key>``, with characters unsafe in a file name replaced."""
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{folder.name}-{spec}")
    return f"compressed/{stem}-{key[:KEY_HEX_CHARS]}"


def cached_checkpoint(model: str | os.PathLike, spec: Spec, settings: CalibrationSettings | None = None,
                      progress: bool = True) -> Path:
    """The cached checkpoint folder of ``model`` compressed by ``spec`` (not dense), built on first use.

    Raises ``ModelError``, ``SpecError`` or ``CalibrationError`` (one-line messages).
    """
    if spec.is_dense:
        raise SpecError("spec dense: there is nothing to compress")
    settings = settings or CalibrationSettings()
    folder = model_folder(model)
    fingerprint = model_fingerprint(folder)
    key = cache_key(fingerprint, spec, settings)

    def build(tmp: Path) -> dict:
        summary = _write_checkpoint(tmp, model, spec, settings, progress)
        calibration = asdict(settings) if spec.needs_calibration else None
        return {"model": str(model), "model_fingerprint": fingerprint, "calibration": calibration, "key": key,
                **summary}

    return ensure_entry(entry_name(folder, spec, key), build)


# --- load one ----------------------------------------------------------------------------------------------------

def load_checkpoint(folder: str | os.PathLike, mode: str = "simulated", dtype: torch.dtype | None = None,
                    device: str = "cpu", fallback: bool = False) -> tuple[nn.Module, dict[str, str] | str]:
    """The model of a checkpoint folder in eval mode on ``device``, built without allocating dense weights first.

    Args:
        folder: a folder written by ``compress_to_folder`` or ``cached_checkpoint``.
        mode: ``"simulated"``: compressed Linears hold their dequantized (and pruned) weights in ``dtype``;
            ``"real"``: packed low-bit weights, torch's int4/int8 kernels on CPU (``kernels.swap_in_kernels``,
            activations in ``dtype``) or GPTQModel's on CUDA.
        dtype: the model's float dtype (None: ``default_dtype(mode)``).
        device: ``"cpu"`` or a CUDA device.
        fallback: real mode on CPU: run layers without a kernel simulated instead of raising.

    Returns:
        The model and the mode of each compressed Linear (``"gptqmodel"`` for the CUDA real path).
    """
    check_mode(mode)
    dtype = dtype or default_dtype(mode)
    kind = torch.device(device).type
    if mode == "real" and kind == "cuda":
        return _load_gptqmodel(Path(folder), dtype, device), "gptqmodel"
    if mode == "real" and kind != "cpu":
        raise SpecError(f"real low-bit kernels run on cpu (torch) or cuda (GPTQModel), not {device}")
    model, modes = _load_on_cpu(folder, mode, dtype, fallback)
    return model.to(device), modes


def _load_on_cpu(folder: str | os.PathLike, mode: str, dtype: torch.dtype,
                 fallback: bool) -> tuple[nn.Module, dict[str, str]]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = read_checkpoint(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    model.tie_weights()  # accelerate's meta patch replaces each registered Parameter, which unties them
    check_fits(checkpoint, model, str(folder))
    state = {name: _cast(tensor, dtype) for name, tensor in checkpoint.tensors.items()}
    if mode == "simulated":
        state |= {f"{name}.weight": state_weight(model.get_submodule(name), layer.weight().to(dtype))
                  for name, layer in checkpoint.layers.items()}
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


def _load_gptqmodel(folder: Path, dtype: torch.dtype, device: str) -> nn.Module:
    """Export the checkpoint in GPTQ format (cached beside it) and load it through transformers' GPTQ
    integration, which runs GPTQModel's CUDA kernels."""
    from transformers import AutoModelForCausalLM

    from cpt_bench.compress.export import export_gptq

    if importlib.util.find_spec("gptqmodel") is None:
        raise SpecError("real low-bit mode on CUDA needs GPTQModel (pip install gptqmodel); it is not installed")

    def build(tmp: Path) -> dict:
        export_gptq(folder, tmp)
        return {"exported_from": str(folder), "checkpoint_format": "gptq"}

    read_checkpoint(folder)  # its record checked against its weights on every load, a cached export too
    exported = ensure_entry(f"{folder.parent.name}/{folder.name}-gptq", build)
    return AutoModelForCausalLM.from_pretrained(exported, dtype=dtype, device_map=device).eval()
