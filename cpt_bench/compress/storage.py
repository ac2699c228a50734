"""Save and load a compressed model as a deployment would store it, with an honest memory account.

``out_dir/model.safetensors`` holds, for each compressed Linear weight ``<w>`` (``<module name>.weight``, a
prefix no state-dict tensor can have), in the ``[rows = out, cols = in]`` orientation of ``nn.Linear`` also for
GPT-2's ``Conv1D`` (whose own state-dict weight is ``[in, out]``; loading transposes it back, ``layers.state_weight``):

* ``<w>.codes``: integer codes bit-packed little-endian into uint8 (8-bit codes are plain uint8);
  for a pruned layer only the kept weights' codes, in row-major order;
* ``<w>.scales`` fp16 ``[rows, n_groups]`` and ``<w>.zeros`` (bit-packed like the codes);
* ``<w>.g_idx`` int32 ``[cols]`` when act-order made groups non-contiguous;
* ``<w>.mask``: the keep mask ``[rows, cols]`` bit-packed, 1 bit per weight (as compact as N:M index
  metadata for 2:4 and more compact for 4:8);
* ``<w>.values``: for a pruned, unquantized layer, its kept weights in 16-bit floats.

Every other state-dict tensor (embeddings, norms, ``lm_head``; tied tensors once) is stored under its own
name in 16-bit floats: fp16, or bf16 if the model is bf16. ``out_dir/compression.json`` records the spec,
calibration settings, per-layer error and seconds, the memory account (counted from the tensors written)
and the sha256 of ``model.safetensors``, verified on load together with what the record claims (spec, each layer's
bits, group size and sparsity) against the stored tensors (``check_record``); ``out_dir/config.json`` is the model's
config, so the folder builds its model without the base model's files.

Loading (``checkpoints.load_checkpoint``) rebuilds quantized weights bit-exactly; 16-bit stored tensors are exact
when the model is fp16/bf16.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tabulate import tabulate
from torch import nn

from cpt_bench.compress.quant import CompressedLinear, QuantizedWeight
from cpt_bench.compress.spec import CompressionResult, LayerReport, Spec
from cpt_bench.errors import UserError
from cpt_bench.files import OutputKind, write_files_atomic

FORMAT = "cpt_bench.compressed/1"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "compression.json"
CONFIG_FILE = "config.json"  # the model's transformers config, as ``save_pretrained`` writes it
REQUIRED_FIELDS = ("spec", "calibration", "layers", "tied", "memory", "files")
_SPARSITY_ROUNDING = 1e-4  # a layer's recorded sparsity against the one its mask gives (float32 mean, JSON)
CHECKPOINT_KIND = OutputKind("a compressed checkpoint", MANIFEST_FILE, (("format", FORMAT),))


class StorageError(UserError):
    """A compressed checkpoint that is missing, corrupted or does not match the model; one-line message."""


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` into a little-endian bit stream.

    Args:
        values: any-shape integer tensor, read in row-major order.
        bits: bits per value, 1 to 8.

    Returns:
        ``[ceil(numel * bits / 8)]`` uint8.
    """
    flat = values.reshape(-1).to(torch.uint8)
    stream = ((flat[:, None] >> torch.arange(bits, dtype=torch.uint8, device=flat.device)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    return (stream.reshape(-1, 8) << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(
        1, dtype=torch.uint8
    )


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` values, ``[count]`` uint8."""
    stream = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: count * bits].reshape(count, bits)
    return (stream << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(1, dtype=torch.uint8)


def save_compressed(model: nn.Module, result: CompressionResult, out_dir: str | os.PathLike,
                    base_model: dict[str, str] | None = None, imported: dict | None = None) -> Path:
    """Write ``model`` compressed as in ``result`` to ``out_dir``; returns the path of ``compression.json``.

    ``base_model``: the ``{"name", "fingerprint"}`` of the model it was compressed from (``assets.model``'s
    ``model_fingerprint``), recorded so that loading can refuse another base model. ``imported``: where a checkpoint
    read from another tool's files came from (``gptq_import``), recorded as ``compression.json``'s ``imported``. Both
    files are written
    atomically and together with the model's ``config.json`` (``write_files_atomic``): a failure keeps the old
    files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, aliases = unique_state(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    reports = {report.name: report for report in result.reports}
    for name, layer in result.layers.items():
        weight = state.pop(f"{name}.weight")
        layer_tensors = _layer_tensors(f"{name}.weight", layer, _storage_dtype(weight.dtype))
        tensors.update(layer_tensors)
        layers[name] = _layer_meta(layer, layer_tensors, reports[name])
    for name, tensor in state.items():
        tensors[name] = tensor.detach().to("cpu", _storage_dtype(tensor.dtype)).contiguous()
    data = save_safetensors(tensors, metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "spec": str(result.spec),
        "base_model": base_model,
        "calibration": result.settings_dict(),
        "total_seconds": result.seconds,
        "phase_seconds": result.phase_seconds,
        "layers": layers,
        "tied": aliases,
        "memory": _memory_account(model, tensors, layers),
        "files": {WEIGHTS_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
    }
    if imported is not None:
        manifest["imported"] = imported
    write_files_atomic(out, {WEIGHTS_FILE: data, CONFIG_FILE: model.config.to_json_string(use_diff=True).encode(),
                             MANIFEST_FILE: (json.dumps(manifest, indent=2) + "\n").encode()})
    return out / MANIFEST_FILE


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """The parsed ``compression.json`` of a compressed checkpoint."""
    path = Path(out_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StorageError(f"cannot read compressed checkpoint manifest {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StorageError(f"{path} has format {found!r}, expected {FORMAT!r}")
    missing = [name for name in REQUIRED_FIELDS if name not in manifest]
    record = manifest.get("files")
    record = record.get(WEIGHTS_FILE) if isinstance(record, dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)):
        missing.append(f"files.{WEIGHTS_FILE}.sha256")
    if missing:
        raise StorageError(f"{path} lacks {', '.join(missing)}; expected a compression.json written by cpt_bench")
    return manifest


@dataclass
class StoredCheckpoint:
    """The verified contents of a compressed checkpoint.

    Attributes:
        manifest: the parsed ``compression.json``.
        layers: the compressed form of each compressed Linear, by module name.
        tensors: every other stored state-dict tensor (16-bit floats), by state-dict name.
    """

    manifest: dict
    layers: dict[str, CompressedLinear]
    tensors: dict[str, torch.Tensor]


def read_checkpoint(out_dir: str | os.PathLike) -> StoredCheckpoint:
    """Read and verify a checkpoint written by ``save_compressed`` (sha256, and its record against its weights:
    ``check_record``); raises ``StorageError``."""
    manifest = read_manifest(out_dir)
    tensors = load_safetensors(_read_verified(Path(out_dir), manifest))
    check_record(Path(out_dir), manifest, tensors)
    layers = {name: _load_layer(f"{name}.weight", meta, tensors) for name, meta in manifest["layers"].items()}
    prefixes = tuple(f"{name}.weight." for name in layers)
    others = {name: tensor for name, tensor in tensors.items() if not name.startswith(prefixes)}
    return StoredCheckpoint(manifest, layers, others)


def check_record(where: Path, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose record says other than its weights hold (``StorageError`` naming the field, what
    the record says and what the weights show): a 4-bit checkpoint relabelled 3-bit, another group size, a sparsity
    or N:M pattern that is not there. Checked for every compressed Linear, against both the spec and the layer's
    own ``bits`` / ``group_size`` / ``sparsity``: the sha256 alone cannot catch an edited ``compression.json``."""
    spec = Spec.parse(manifest["spec"])
    for name, meta in manifest["layers"].items():
        keep = _stored_keep(f"{name}.weight", meta["shape"], tensors)
        found = next(chain(_pruning_mismatches(spec, name, meta, keep),
                           _quantization_mismatches(spec, name, meta, keep, tensors)), None)
        if found:
            field, says, shows = found
            raise StorageError(f"checkpoint {where}: {field}: {MANIFEST_FILE} says {says}, but the weights of {name} "
                               f"show {shows}; the record does not describe these weights")


Mismatch = tuple[str, str, str]  # (field, what the record says, what the weights show)


def _stored_keep(prefix: str, shape: list[int], tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The stored keep mask ``[rows, cols]`` bool of a compressed weight, None when it has none (not pruned)."""
    rows, cols = shape
    if f"{prefix}.mask" not in tensors:
        return None
    return unpack_bits(tensors[f"{prefix}.mask"], 1, rows * cols).bool().reshape(rows, cols)


def _pruning_mismatches(spec: Spec, name: str, meta: dict, keep: torch.Tensor | None) -> Iterator[Mismatch]:
    """Where the spec's pruning (none, a percent, N:M) or the layer's ``sparsity`` differs from the keep mask."""
    pruning, cols = spec.pruning, meta["shape"][1]
    if (pruning is None) != (keep is None):
        yield "pruning", f"spec {spec}", "a keep mask" if keep is not None else "no keep mask (nothing pruned)"
        return
    pruned = 0.0 if keep is None else 1.0 - keep.float().mean().item()
    if pruning is not None and pruning.m:
        per_window = (~keep).reshape(keep.shape[0], cols // pruning.m, pruning.m).sum(-1)
        if not bool((per_window == pruning.m - pruning.n).all()):
            yield ("sparsity", f"{pruning.n}:{pruning.m} (spec {spec})",
                   f"windows of {pruning.m} with {int(per_window.min())} to {int(per_window.max())} pruned")
    elif pruning is not None and abs(pruned - pruning.fraction) > 1 / cols:  # whole weights per row or block
        yield "sparsity", f"{pruning.fraction:.1%} (spec {spec})", f"{pruned:.1%} pruned"
    if abs(pruned - meta["sparsity"]) > _SPARSITY_ROUNDING:
        yield "sparsity", f"{meta['sparsity']:.1%} (layers.{name}.sparsity)", f"{pruned:.1%} pruned"


def _quantization_mismatches(spec: Spec, name: str, meta: dict, keep: torch.Tensor | None,
                             tensors: dict[str, torch.Tensor]) -> Iterator[Mismatch]:
    """Where the spec's or the layer's bits and group size differ from the stored codes and scales: the bit width
    is the one whose packing of the stored codes gives their byte count, the groups per row the scales' width."""
    quant, prefix, (rows, cols) = spec.quantization, f"{name}.weight", meta["shape"]
    if (quant is None) != (f"{prefix}.codes" not in tensors):
        yield "quantization", f"spec {spec}", "no codes" if quant is not None else "quantized codes"
        return
    if quant is None:
        return
    n_codes = rows * cols if keep is None else int(keep.sum())
    n_bytes = tensors[f"{prefix}.codes"].numel()
    widths = [bits for bits in range(1, 9) if math.ceil(n_codes * bits / 8) == n_bytes]
    shows = f"{widths[0]}-bit codes" if len(widths) == 1 else f"{n_bytes} bytes of codes for {n_codes} weights"
    for says, bits in ((f"spec {spec}", quant.bits), (f"layers.{name}.bits", meta["bits"])):
        if widths != [bits]:
            yield "bits", f"{bits} ({says})", shows
    groups = tensors[f"{prefix}.scales"].shape[-1]
    for says, size in ((f"spec {spec}", quant.group_size), (f"layers.{name}.group_size", meta["group_size"])):
        if groups != (math.ceil(cols / size) if size else 1):
            yield ("group size", f"{size or 'none (one grid per row)'} ({says})",
                   f"{groups} groups per row of {cols} columns")


def check_fits(checkpoint: StoredCheckpoint, model: nn.Module, where: str) -> None:
    """Refuse ``model`` unless its tied tensors and state-dict names match ``checkpoint`` (at ``where``)."""
    state, aliases = unique_state(model)
    if aliases != checkpoint.manifest["tied"]:
        raise StorageError(f"checkpoint {where} does not match {type(model).__name__}: tied tensors "
                           f"{checkpoint.manifest['tied']} in the checkpoint, {aliases} in the model")
    expected = set(state) - {f"{name}.weight" for name in checkpoint.layers}
    stored = set(checkpoint.tensors)
    if stored != expected:
        raise StorageError(
            f"checkpoint {where} does not match {type(model).__name__}: "
            f"missing {sorted(expected - stored)[:3]}, unexpected {sorted(stored - expected)[:3]}"
        )


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit floats stay as they are, wider floats become fp16, other dtypes are kept."""
    if dtype.is_floating_point and torch.empty((), dtype=dtype).element_size() > 2:
        return torch.float16
    return dtype


def unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict without tied duplicates, and each dropped name -> the name it is tied to."""
    state: dict[str, torch.Tensor] = {}
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        # Meta tensors (a model built without allocating its weights) all have address 0: tied ones are one object.
        address = id(tensor) if tensor.is_meta else tensor.data_ptr()
        key = (tensor.device, address, tuple(tensor.shape))
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            state[name] = tensor
    return state, aliases


def _layer_tensors(prefix: str, layer: CompressedLinear,
                   values_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors stored for one compressed weight, named ``<prefix>.<part>`` (see the module docstring)."""
    keep = None if layer.pruned is None else ~layer.pruned.cpu()
    tensors = {}
    if keep is not None:
        tensors[f"{prefix}.mask"] = pack_bits(keep, 1)
    quant = layer.quant
    if quant is None:
        tensors[f"{prefix}.values"] = layer.values.detach().cpu()[keep].to(values_dtype)
        return tensors
    codes = quant.codes.cpu()
    tensors[f"{prefix}.codes"] = pack_bits(codes if keep is None else codes[keep], quant.bits)
    tensors[f"{prefix}.scales"] = quant.scales.cpu().half().contiguous()
    tensors[f"{prefix}.zeros"] = pack_bits(quant.zeros.cpu(), quant.bits)
    if quant.g_idx is not None:
        tensors[f"{prefix}.g_idx"] = quant.g_idx.cpu().to(torch.int32)
    return tensors


def _layer_meta(layer: CompressedLinear, tensors: dict[str, torch.Tensor], report: LayerReport) -> dict:
    quant = layer.quant
    rows, cols = (quant.codes if quant is not None else layer.values).shape
    stored = sum(_nbytes(tensor) for tensor in tensors.values())
    return {
        "method": report.method,
        "error": report.error,
        "seconds": report.seconds,
        "shape": [rows, cols],
        "bits": quant.bits if quant is not None else None,
        "group_size": quant.group_size if quant is not None else None,
        "pruned": layer.pruned is not None,
        "sparsity": float(layer.pruned.float().mean()) if layer.pruned is not None else 0.0,
        "bytes": stored,
        "bits_per_weight": 8 * stored / (rows * cols),
    }


def _load_layer(prefix: str, meta: dict, tensors: dict[str, torch.Tensor]) -> CompressedLinear:
    rows, cols = meta["shape"]
    keep = None
    if meta["pruned"]:
        keep = unpack_bits(tensors[f"{prefix}.mask"], 1, rows * cols).bool().reshape(rows, cols)
    pruned = None if keep is None else ~keep
    if meta["bits"] is None:
        kept = tensors[f"{prefix}.values"]
        values = torch.zeros(rows, cols, dtype=kept.dtype).masked_scatter(keep, kept)
        return CompressedLinear(error=meta["error"], pruned=pruned, values=values)
    bits = meta["bits"]
    n_codes = rows * cols if keep is None else int(keep.sum())
    codes = unpack_bits(tensors[f"{prefix}.codes"], bits, n_codes)
    if keep is None:
        codes = codes.reshape(rows, cols)
    else:
        codes = torch.zeros(rows, cols, dtype=torch.uint8).masked_scatter(keep, codes)
    scales = tensors[f"{prefix}.scales"].float()
    zeros = unpack_bits(tensors[f"{prefix}.zeros"], bits, scales.numel()).reshape(scales.shape)
    quant = QuantizedWeight(codes, scales, zeros, bits, meta["group_size"], tensors.get(f"{prefix}.g_idx"))
    return CompressedLinear(error=meta["error"], quant=quant, pruned=pruned)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def dense_fp16_bytes(model: nn.Module) -> int:
    """Bytes of the model's dense fp16 checkpoint: every unique tensor, floats at 2 bytes per value."""
    state, _ = unique_state(model)
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in state.values())


def _memory_account(model: nn.Module, tensors: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict:
    """Bytes as stored (tensor contents, no file header) against the dense fp16 checkpoint."""
    stored = sum(_nbytes(tensor) for tensor in tensors.values())
    layer_bytes = sum(meta["bytes"] for meta in layers.values())
    layer_weights = sum(meta["shape"][0] * meta["shape"][1] for meta in layers.values())
    dense = dense_fp16_bytes(model)
    return {
        "stored_bytes": stored,
        "compressed_layer_bytes": layer_bytes,
        "other_bytes": stored - layer_bytes,
        "compressed_layer_weights": layer_weights,
        "compressed_bits_per_weight": 8 * layer_bytes / layer_weights if layer_weights else None,
        "dense_fp16_bytes": dense,
        "ratio_to_dense_fp16": stored / dense,
    }


def _read_verified(out: Path, manifest: dict) -> bytes:
    path = out / WEIGHTS_FILE
    try:
        data = path.read_bytes()
    except OSError as error:
        raise StorageError(f"cannot read compressed weights {path}: {error}") from None
    expected = manifest["files"][WEIGHTS_FILE]["sha256"]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise StorageError(f"{path} is corrupted: sha256 {actual[:16]}... differs from {expected[:16]}... "
                           f"recorded in {MANIFEST_FILE}")
    return data


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
