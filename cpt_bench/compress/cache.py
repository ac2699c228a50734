"""A cache of compressed checkpoints, keyed by what produced them: model weights, spec and calibration.

Entry ``<cache>/compressed/<model name>-<spec>-<12 hex>``: the hex is a sha256 over the model fingerprint
(config.json plus the sha256 of every weight file), the canonical spec text and the calibration settings
(none for specs that read no calibration data). Entries are built through ``assets.cache.ensure_entry``:
atomically, with a sha256 manifest, rebuilt when corrupted. The first request compresses; later ones load.
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
from cpt_bench.assets.model import ModelError, load_causal_lm, looks_like_path, resolve_model
from cpt_bench.compress.pipeline import MODES, compress_into, default_dtype, load_compressed_model
from cpt_bench.compress.sequential import CalibrationSettings
from cpt_bench.compress.spec import Spec
from cpt_bench.compress.storage import read_manifest
from cpt_bench.files import sha256_of

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
KEY_HEX_CHARS = 12


def model_folder(name_or_path: str | os.PathLike) -> Path:
    """The local folder of a model: ``embedded``, a folder, or a Hugging Face id already in the local hub cache
    (or downloadable when the Hub is reachable). Raises ``ModelError``."""
    resolved = resolve_model(str(name_or_path))
    if Path(resolved).is_dir():
        folder = Path(resolved)
    elif looks_like_path(resolved):
        raise ModelError(f"model folder {resolved} does not exist; expected 'embedded', a model folder or a Hugging "
                         "Face id")
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(resolved))
        except Exception as error:  # the hub raises several unrelated types for "not there"
            raise ModelError(f"model {str(name_or_path)!r} is neither a local folder nor an available Hugging Face "
                             f"model ({type(error).__name__})") from None
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json")
    return folder


def model_fingerprint(model: str | os.PathLike | nn.Module) -> str:
    """Hex sha256 identifying a model's weights and architecture.

    For a folder (or name): over ``config.json`` and the sha256 of each weight file (``*.safetensors``,
    ``*.bin``, by name). For an in-memory model: over its config (JSON) and every state-dict tensor's name,
    dtype, shape and bytes.
    """
    digest = hashlib.sha256()
    if isinstance(model, nn.Module):
        digest.update(model.config.to_json_string(use_diff=False).encode())
        for name, tensor in model.state_dict().items():
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
    folder = model_folder(model)
    weights = sorted({path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern)})
    if not weights:
        raise ModelError(f"model folder {folder} has no weight files ({', '.join(WEIGHT_PATTERNS)})")
    record = {"config.json": sha256_of(folder / "config.json")} | {path.name: sha256_of(path) for path in weights}
    digest.update(json.dumps(record, sort_keys=True).encode())
    return digest.hexdigest()


def cache_key(fingerprint: str, spec: Spec, settings: CalibrationSettings) -> str:
    """Hex sha256 of (model fingerprint, spec text, calibration settings if the spec reads calibration data)."""
    calibration = asdict(settings) if spec.needs_calibration else None
    payload = {"model": fingerprint, "spec": str(spec), "calibration": calibration}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def entry_name(folder: Path, spec: Spec, key: str) -> str:
    """``compressed/<model name>-<spec>-<short key>``, with characters unsafe in a file name replaced."""
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{folder.name}-{spec}")
    return f"compressed/{stem}-{key[:KEY_HEX_CHARS]}"


def compressed_checkpoint(model: str | os.PathLike, spec: Spec | str, settings: CalibrationSettings | None = None,
                          progress: bool = True) -> Path:
    """The cached compressed folder of ``model`` by ``spec`` (see ``pipeline.compress_into``), built on first use.

    ``spec`` must not be dense. Raises ``ModelError``, ``SpecError`` or ``CalibrationError`` (all ValueError).
    """
    spec = Spec.parse(spec) if isinstance(spec, str) else spec
    if spec.is_dense:
        raise ValueError("spec dense: there is nothing to compress")
    settings = settings or CalibrationSettings()
    folder = model_folder(model)
    fingerprint = model_fingerprint(folder)
    key = cache_key(fingerprint, spec, settings)

    def build(tmp: Path) -> dict:
        summary = compress_into(tmp, folder, spec, settings, progress)
        calibration = asdict(settings) if spec.needs_calibration else None
        return {"model": str(model), "model_fingerprint": fingerprint, "calibration": calibration, "key": key,
                **summary}

    return ensure_entry(entry_name(folder, spec, key), build)


def compress_to_dir(model: str, spec: str, out: Path | None = None,
                    settings: CalibrationSettings | None = None) -> Path:
    """Compress ``model`` by ``spec`` with tqdm progress per decoder layer; returns the compressed folder.

    ``out=None``: the cached entry (reused when present); otherwise ``out`` is (re)written. A dense spec returns
    the model's own folder. Errors are ValueErrors with one-line messages.
    """
    parsed = Spec.parse(spec)
    if parsed.is_dense:
        return model_folder(model)
    if out is None:
        return compressed_checkpoint(model, parsed, settings)
    compress_into(Path(out), model_folder(model), parsed, settings or CalibrationSettings())
    return Path(out)


def load_or_compress(model_name_or_path: str, spec: Spec | str, settings: CalibrationSettings | None = None,
                     mode: str = "simulated", dtype: torch.dtype | None = None, device: str = "cpu",
                     fallback: bool = False) -> tuple[nn.Module, dict]:
    """The model compressed by ``spec``, compressing it once into the cache and loading it thereafter.

    Args:
        model_name_or_path: ``embedded``, a folder or a Hugging Face id.
        spec: a spec or its text; ``dense`` returns the plain model.
        settings: calibration settings (defaults: the GPTQ protocol, 128 x 1024 wikipedia windows, seed 0).
        mode: ``"simulated"`` (dequantized weights in ``dtype``) or ``"real"`` (packed low-bit weights: torch's
            int4/int8 kernels on CPU with activations in ``dtype``; GPTQModel's kernels on CUDA).
        dtype: the model's float dtype (None: fp32 simulated, bf16 real; ``pipeline.default_dtype``).
        device: ``"cpu"`` or a CUDA device.
        fallback: real mode on CPU: run layers without a kernel simulated instead of raising.

    Returns:
        ``(model, manifest)``: the model in eval mode on ``device`` and the checkpoint's ``compression.json``
        plus ``folder`` and ``layer_modes`` (dense: only ``spec`` and ``folder``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    spec = Spec.parse(spec) if isinstance(spec, str) else spec
    dtype = dtype or default_dtype(mode)
    if spec.is_dense:
        folder = model_folder(model_name_or_path)
        model = load_causal_lm(str(folder), dtype=dtype).to(device).eval()
        return model, {"spec": "dense", "folder": str(folder)}
    folder = compressed_checkpoint(model_name_or_path, spec, settings)
    manifest = read_manifest(folder) | {"folder": str(folder)}
    if mode == "real" and torch.device(device).type == "cuda":
        return _load_gptqmodel(folder, dtype, device), manifest | {"layer_modes": "gptqmodel"}
    if mode == "real" and torch.device(device).type != "cpu":
        raise ValueError(f"real low-bit kernels run on cpu (torch) or cuda (GPTQModel), not {device}")
    model, modes = load_compressed_model(folder, mode, dtype, fallback)
    return model.to(device), manifest | {"layer_modes": modes}


def _load_gptqmodel(folder: Path, dtype: torch.dtype, device: str) -> nn.Module:
    """Export the checkpoint in GPTQ format (cached beside it) and load it through transformers' GPTQ
    integration, which runs GPTQModel's CUDA kernels."""
    from transformers import AutoModelForCausalLM

    from cpt_bench.compress.export import export_gptq

    if importlib.util.find_spec("gptqmodel") is None:
        raise ValueError("real low-bit mode on CUDA needs GPTQModel (pip install gptqmodel); it is not installed")
    def build(tmp: Path) -> dict:
        export_gptq(folder, tmp)
        return {"exported_from": str(folder), "checkpoint_format": "gptq"}

    exported = ensure_entry(f"{folder.parent.name}/{folder.name}-gptq", build)
    return AutoModelForCausalLM.from_pretrained(exported, dtype=dtype, device_map=device).eval()
