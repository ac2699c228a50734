"""Export a GPTQ-quantized compressed folder in the standard GPTQ checkpoint format.

Per quantized Linear ``<m>`` with weight ``[out, in]``, ``bits`` per code and ``n_groups`` groups (GPT-2's
``Conv1D`` layers too: the format is the same for both, and GPTQ loaders replace either by a quantized Linear):

* ``<m>.qweight`` int32 ``[in * bits / 32, out]``: each output column's ``in`` codes packed along the input
  dimension, 32 codes per ``bits`` words, code ``i`` at bit ``bits * i`` of the little-endian bit stream
  (for 2/4/8 bits: ``32 / bits`` codes per word, code ``i`` at bits ``bits * (i % (32 / bits))``; 3-bit codes
  straddle words as auto-gptq packs them);
* ``<m>.qzeros`` int32 ``[n_groups, out * bits / 32]``: zero points packed the same way along the output dim;
* ``<m>.scales`` fp16 ``[n_groups, out]``; ``<m>.g_idx`` int32 ``[in]``: the group of each input column;
* ``<m>.bias`` when the Linear has one, and every unquantized tensor under its own name (16-bit floats).

Zero points: ``checkpoint_format="gptq"`` (default, auto-gptq v1, what vLLM and transformers/optimum read;
GPTQModel reads it for symmetric grids only, or files it wrote itself) stores ``zero - 1`` and loaders add 1 back,
so a zero point of 0 cannot be represented and is refused; ``"gptq_v2"`` (GPTQModel's format, which it loads on CPU:
``benchmarks/gptqmodel_interop.py``) stores ``zero`` itself. Dequantization: ``w[o, i] =
scales[g, o] * (q[i, o] - z[g, o])`` with ``g = g_idx[i]``, which reproduces our simulated weights exactly.
Pruned weights of a joint spec are stored as their group's zero point, i.e. as exact zeros.

With ``max_shard_bytes`` the tensors are split over ``model-0000k-of-0000n.safetensors`` files named by
``model.safetensors.index.json`` (its ``weight_map``), as ``save_pretrained`` shards a model.
``compress.gptq_import`` reads such folders (ours and other tools') back into a compressed checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from cpt_bench.compress.quant import CompressedLinear
from cpt_bench.compress.spec import Spec
from cpt_bench.compress.storage import pack_bits, read_checkpoint, unpack_bits
from cpt_bench.errors import UserError
from cpt_bench.files import EXPORT_MARKER, OutputKind, ensure_replaceable, json_bytes, write_files_atomic

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
EXPORT_FORMAT = "cpt_bench.gptq_export/1"
GPTQ_EXPORT_KIND = OutputKind("a GPTQ-format export", EXPORT_MARKER, (("format", EXPORT_FORMAT),))
_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "vocab.json", "merges.txt", "chat_template.jinja")


class ExportError(UserError):
    """A compressed checkpoint that the GPTQ format cannot hold exactly (one-line message)."""


def check_checkpoint_format(checkpoint_format: str, what: str = "checkpoint format") -> None:
    """Refuse in one line (``ExportError``) a format not in ``CHECKPOINT_FORMATS``; ``what`` names the setting."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ExportError(f"{what} must be one of {', '.join(CHECKPOINT_FORMATS)}, got {checkpoint_format!r}")


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each row of ``values [rows, cols]`` (integers in ``[0, 2**bits)``) into ``[rows, cols * bits / 32]``
    int32 words, as a little-endian bit stream per row; ``cols * bits`` must be a multiple of 32."""
    rows, cols = values.shape
    if (cols * bits) % 32:
        raise ExportError(f"cannot pack {cols} {bits}-bit values into whole int32 words")
    _check_little_endian()
    return pack_bits(values.contiguous(), bits).view(torch.int32).reshape(rows, cols * bits // 32)


def unpack_int32(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: each row of ``words [rows, count * bits / 32]`` int32 as a little-endian bit
    stream of ``count`` codes, ``[rows, count]`` uint8."""
    _check_little_endian()
    rows = words.shape[0]
    if 32 % bits == 0:  # 2, 4, 8 bits: whole codes per word, code i at bits * (i % per_word) of word i // per_word
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)
        codes = (words.contiguous()[..., None] >> shifts) & (2**bits - 1)
        return codes.reshape(rows, -1)[:, :count].to(torch.uint8)
    return unpack_bits(words.contiguous().view(torch.uint8).reshape(-1), bits, rows * count).reshape(rows, count)


def _check_little_endian() -> None:
    # GPTQ folders are little-endian int32 words; reinterpreting our byte streams as words needs the same order
    if sys.byteorder != "little":
        raise ExportError("GPTQ packing assumes a little-endian machine")


def gptq_tensors(name: str, layer: CompressedLinear, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` and ``g_idx`` of one quantized Linear, named ``<name>.<part>``."""
    quant = layer.quant
    if quant is None:
        raise ExportError(f"layer {name} is pruned without quantization; the GPTQ format holds quantized layers")
    rows, cols = quant.codes.shape
    zeros = quant.zeros.cpu().to(torch.int32)
    if checkpoint_format == "gptq":
        if torch.any(zeros == 0):
            raise ExportError(f"layer {name} has a zero point of 0, which the v1 'gptq' format (stored as zero - 1) "
                              "cannot hold; export with checkpoint_format 'gptq_v2' (cpt-bench compress "
                              "--checkpoint-format gptq_v2)")
        zeros = zeros - 1
    for what, width in (("input", cols), ("output", rows)):
        if (width * quant.bits) % 32:
            raise ExportError(f"layer {name}: {what} width {width} x {quant.bits} bits is not a whole number of "
                              "int32 words")
    return {
        f"{name}.qweight": pack_int32(layer.dense_codes().cpu(), quant.bits).t().contiguous(),
        f"{name}.qzeros": pack_int32(zeros.t(), quant.bits),
        f"{name}.scales": quant.scales.cpu().t().half().contiguous(),
        f"{name}.g_idx": quant.column_groups().cpu().to(torch.int32),
    }


def quantization_config(spec: Spec, calibration: dict | None, checkpoint_format: str) -> dict:
    """The ``quantization_config`` (config.json) / ``quantize_config.json`` of a GPTQ export of ``spec``."""
    quant = spec.quantization
    config = {
        "quant_method": "gptq",
        "bits": quant.bits,
        "group_size": quant.group_size or -1,
        "desc_act": quant.act_order,
        "sym": quant.symmetric,
        "checkpoint_format": checkpoint_format,
        "static_groups": False,
        "lm_head": False,
        "pack_dtype": "int32",
    }
    if calibration is not None:
        config |= {"damp_percent": calibration["dampening"], "true_sequential": calibration["true_sequential"]}
    return config


def export_gptq(compressed_dir: str | os.PathLike, out_dir: str | os.PathLike,
                checkpoint_format: str = "gptq", flag: str = "--export-gptq",
                max_shard_bytes: int | None = None) -> Path:
    """Write the GPTQ-format checkpoint of a compressed folder (``checkpoints.compress_to_folder``) to ``out_dir``.

    Writes ``model.safetensors``, ``config.json`` with ``quantization_config``, ``quantize_config.json``, the
    tokenizer files and ``files.EXPORT_MARKER`` (what it was exported from), all replaced together or not at all
    (``write_files_atomic``); with ``max_shard_bytes``, shards of at most that many tensor bytes and their index
    instead of ``model.safetensors`` (weight files of an earlier export that the new one lacks are removed).
    ``out_dir`` must be new, empty or an earlier GPTQ export (``files.OutputPathError`` naming ``flag`` otherwise).
    Raises ``ExportError`` for a spec without quantization or a layer the format cannot hold.
    """
    check_checkpoint_format(checkpoint_format)
    source, out = Path(compressed_dir), Path(out_dir)
    ensure_replaceable(out, GPTQ_EXPORT_KIND, flag)
    checkpoint = read_checkpoint(source)
    spec = Spec.parse(checkpoint.manifest["spec"])
    if spec.quantization is None:
        raise ExportError(f"spec {spec} does not quantize; the GPTQ format holds quantized checkpoints")
    tensors = dict(checkpoint.tensors)
    for name, layer in checkpoint.layers.items():
        tensors |= gptq_tensors(name, layer, checkpoint_format)
    qconfig = quantization_config(spec, checkpoint.manifest["calibration"], checkpoint_format)
    config = json.loads((source / "config.json").read_text())
    files = weight_files(tensors, max_shard_bytes)
    files |= {"config.json": json_bytes(config | {"quantization_config": qconfig}),
              QUANTIZE_CONFIG_FILE: json_bytes(qconfig)}
    files |= {name: (source / name).read_bytes() for name in _COPIED_FILES if (source / name).is_file()}
    files[EXPORT_MARKER] = json_bytes({"format": EXPORT_FORMAT, "source": str(source.resolve()),
                                       "spec": str(spec), "checkpoint_format": checkpoint_format})
    write_files_atomic(out, files)
    for stale in out.glob("model*.safetensors*"):
        if stale.name not in files:
            stale.unlink()
    return out


def weight_files(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None = None) -> dict[str, bytes]:
    """``{WEIGHTS_FILE: bytes}``, or with ``max_shard_bytes`` the safetensors shards of ``tensors`` and their
    ``INDEX_FILE`` (one shard when everything fits: then no index)."""
    if max_shard_bytes is None:
        return {WEIGHTS_FILE: save_safetensors(tensors, metadata={"format": "pt"})}
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_bytes)
    files = {name: save_safetensors({key: tensors[key] for key in keys}, metadata={"format": "pt"})
             for name, keys in split.filename_to_tensors.items()}
    if split.is_sharded:
        files[INDEX_FILE] = json_bytes({"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    return files
