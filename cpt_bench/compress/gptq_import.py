"""Read a GPTQ-format folder written by another tool into a compressed checkpoint of this suite.

Read: the layouts of auto-gptq (``checkpoint_format`` ``gptq``, "v1"), GPTQModel (``gptq_v2``) and this suite's
export (``compress.export``, whose docstring gives the tensor layout), as Hub GPTQ models are laid out:

* the settings from ``config.json``'s ``quantization_config`` and/or ``quantize_config.json`` (both present: they must
  agree): ``bits`` 2, 3, 4 or 8 (3-bit codes straddle int32 words as auto-gptq packs them), ``group_size`` 32, 64,
  128 or -1 (one grid per output channel; the suite's spec grammar has no other sizes), ``sym``, ``desc_act`` (act
  order: ``g_idx`` maps each input column to its group), ``checkpoint_format`` (older files: ``format``; absent:
  ``gptq``), ``quant_method`` ``gptq`` when given, ``pack_dtype`` ``int32`` when given;
* the tensors from ``model.safetensors``, from the shards named by ``model.safetensors.index.json``, or from the
  folder's one ``*.safetensors`` file (auto-gptq's ``gptq_model-4bit-128g.safetensors``). Per quantized Linear
  ``<m>``: ``<m>.qweight``, ``<m>.qzeros``, ``<m>.scales`` and ``<m>.g_idx`` (optional without act order); every
  other tensor of the base model's state dict under its own name.

Zero points: v1 files store ``zero - 1`` (loaders add 1 back), so a stored ``2**bits - 1`` would mean a zero point
outside the code range; it is refused. v2 files store the zero itself. A ``sym`` file must hold the middle code
``2**(bits - 1)`` as every zero point.

The dense base model (``base``: ``embedded``, a folder, a Hub id) gives the architecture, config and tokenizer:
every tensor's shape is checked against it (a mismatch names the tensor and both shapes), tensors it lacks or that
the folder lacks are refused by name. The result is an ordinary checkpoint folder (``storage.save_compressed``): its
``compression.json`` records the base model's name and fingerprint, the spec
``gptq-w<bits>[g<group>][-sym][-actorder]`` (the format does not say which algorithm chose the codes; the codes and
grids are what is evaluated) and ``imported`` (the source folder, its fingerprint, checkpoint format and the tool
named in its ``meta.quantizer``). Every non-quantized tensor is stored as the source stores it (16-bit floats kept,
wider floats rounded to fp16 as the suite's own checkpoints are). ``compression=<GPTQ folder>`` (``models``) loads
through ``imported_checkpoint``, which caches the conversion keyed by both fingerprints.

Every refusal is one line (``GptqImportError``), raised before the base model's weights are read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from cpt_bench.compress.export import CHECKPOINT_FORMATS, INDEX_FILE, QUANTIZE_CONFIG_FILE, WEIGHTS_FILE, unpack_int32
from cpt_bench.compress.layers import COMPRESSIBLE_TYPES, weight_of
from cpt_bench.compress.quant import CompressedLinear, QuantizedWeight
from cpt_bench.compress.spec import BITS, GROUP_SIZES, CompressionResult, LayerReport, Quantization, Spec
from cpt_bench.compress.storage import CHECKPOINT_KIND, save_compressed, unique_state
from cpt_bench.errors import UserError
from cpt_bench.files import ensure_replaceable, replacing_folder

IMPORT_VERSION = 1  # part of the cache key: bump when the conversion changes
PARTS = ("qweight", "qzeros", "scales", "g_idx")
_COMPARED = ("bits", "group_size", "desc_act", "sym", "checkpoint_format")


class GptqImportError(UserError):
    """A GPTQ folder that cannot be read as a compression of the given base model (one-line message)."""


@dataclass(frozen=True)
class GptqConfig:
    """The quantization settings of a GPTQ folder.

    Attributes:
        bits: code width (2, 3, 4, 8).
        group_size: input columns per grid; None: one grid per output channel (``-1`` in the file).
        desc_act: act order (``g_idx`` maps columns to groups).
        sym: zero points at the middle code.
        checkpoint_format: ``gptq`` (zero points stored minus one) or ``gptq_v2``.
        quantizer: the writing tool as its ``meta.quantizer`` names it (None when not recorded).
    """

    bits: int
    group_size: int | None
    desc_act: bool
    sym: bool
    checkpoint_format: str
    quantizer: str | None = None

    @property
    def spec(self) -> Spec:
        """The spec naming this quantization (method ``gptq``: the format's name, not a claim about the algorithm)."""
        return Spec(quantization=Quantization("gptq", self.bits, self.group_size, self.sym, self.desc_act))


def _raw_settings(folder: Path) -> dict[str, dict]:
    """The quantization settings the folder holds, by the file they were found in (``config.json``,
    ``quantize_config.json``)."""
    found = {}
    for name in ("config.json", QUANTIZE_CONFIG_FILE):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise GptqImportError(f"cannot read {path}: {error}") from None
        data = data.get("quantization_config") if name == "config.json" and isinstance(data, dict) else data
        if isinstance(data, dict):
            found[name] = data
    return found


def is_gptq_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder carrying GPTQ quantization settings (``quantize_config.json``, or a
    ``config.json`` whose ``quantization_config`` has ``quant_method`` gptq)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    if (folder / QUANTIZE_CONFIG_FILE).is_file():
        return True
    try:
        settings = _raw_settings(folder).get("config.json", {})
    except GptqImportError:
        return False
    return str(settings.get("quant_method", "")).lower() == "gptq"


def _parse_settings(raw: dict, where: str) -> GptqConfig:
    """One file's settings as a ``GptqConfig``; anything this module does not read is refused naming it."""
    method = str(raw.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise GptqImportError(f"{where}: quant_method {raw['quant_method']!r} is not gptq; only GPTQ-format folders "
                              "are read")
    if raw.get("is_marlin_format"):
        raise GptqImportError(f"{where}: is_marlin_format is set; Marlin-repacked weights are not read (expected "
                              f"checkpoint_format {' or '.join(CHECKPOINT_FORMATS)})")
    fmt = raw.get("checkpoint_format", raw.get("format", "gptq"))
    if fmt not in CHECKPOINT_FORMATS:
        raise GptqImportError(f"{where}: checkpoint_format {fmt!r} is not read; expected gptq (auto-gptq v1, zero "
                              "points stored minus one) or gptq_v2 (GPTQModel)")
    if raw.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise GptqImportError(f"{where}: pack_dtype {raw['pack_dtype']!r} is not read; expected int32")
    bits = raw.get("bits")
    if bits not in BITS:
        raise GptqImportError(f"{where}: bits {bits!r} is not read; expected one of {', '.join(map(str, BITS))}")
    group = raw.get("group_size", -1)
    if group not in (-1, *GROUP_SIZES):
        raise GptqImportError(f"{where}: group_size {group!r} is not read; expected -1 (per channel) or one of "
                              f"{', '.join(map(str, GROUP_SIZES))} (the suite's spec grammar)")
    flags = {}
    for key, default in (("desc_act", False), ("sym", True)):
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise GptqImportError(f"{where}: {key} {value!r} is not true or false")
        flags[key] = value
    meta = raw.get("meta")
    quantizer = meta.get("quantizer") if isinstance(meta, dict) else None
    quantizer = ", ".join(map(str, quantizer)) if isinstance(quantizer, list) else quantizer
    return GptqConfig(bits, None if group == -1 else group, flags["desc_act"], flags["sym"], fmt,
                      None if quantizer is None else str(quantizer))


def read_gptq_config(folder: str | os.PathLike) -> GptqConfig:
    """The quantization settings of GPTQ folder ``folder`` (see the module docstring); ``GptqImportError`` when it
    has none, when they are not read here, or when ``config.json`` and ``quantize_config.json`` disagree."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GptqImportError(f"GPTQ folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise GptqImportError(f"{folder} has no config.json; expected a GPTQ model folder (config.json, "
                              f"{QUANTIZE_CONFIG_FILE}, safetensors weights)")
    raw = _raw_settings(folder)
    if not raw:
        raise GptqImportError(f"{folder} has no GPTQ quantization settings: expected {QUANTIZE_CONFIG_FILE} or a "
                              "config.json with quantization_config")
    parsed = {name: _parse_settings(settings, str(folder / name)) for name, settings in raw.items()}
    configs = list(parsed.values())
    for key in _COMPARED:
        values = {name: getattr(config, key) for name, config in parsed.items()}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{value!r} in {name}" for name, value in values.items())
            raise GptqImportError(f"{folder}: {key} disagrees between its settings files ({shown})")
    return configs[0]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding ``folder``'s tensors: the shards its index names, ``model.safetensors``, or its
    one ``*.safetensors`` file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise GptqImportError(f"cannot read the weight_map of {index}: {error!r}") from None
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise GptqImportError(f"{index} names shards that are missing: {', '.join(missing[:3])}")
        return shards
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise GptqImportError(f"{folder} holds {len(found)} .safetensors files without {INDEX_FILE}; expected one "
                              "file or an index naming the shards")
    pickles = " (pickled .bin weights are not read)" if any(folder.glob("*.bin")) else ""
    raise GptqImportError(f"{folder} has no safetensors weights{pickles}; expected {WEIGHTS_FILE} or {INDEX_FILE}")


def read_gptq_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of GPTQ folder ``folder`` by name, from one file or all shards (``weight_files``)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(folder)):
        try:
            shard = load_file(path)
        except (OSError, SafetensorError) as error:
            raise GptqImportError(f"cannot read {path}: {error}") from None
        twice = sorted(set(shard) & set(tensors))
        if twice:
            raise GptqImportError(f"tensor {twice[0]} is stored twice in {folder} (again in {path.name})")
        tensors |= shard
    return tensors


def _check_shape(name: str, tensor: torch.Tensor | None, expected: tuple[int, ...], dtype: torch.dtype | None,
                 why: str) -> torch.Tensor:
    if tensor is None:
        raise GptqImportError(f"tensor {name} is missing from the GPTQ folder ({why})")
    if tuple(tensor.shape) != expected:
        raise GptqImportError(f"tensor {name} has shape {list(tensor.shape)}, but the base model's layer needs "
                              f"{list(expected)} ({why})")
    if dtype is not None and tensor.dtype != dtype:
        raise GptqImportError(f"tensor {name} is {tensor.dtype}, expected {dtype}")
    return tensor


def gptq_layer(name: str, parts: dict[str, torch.Tensor], config: GptqConfig,
               shape: tuple[int, int]) -> CompressedLinear:
    """The compressed form of GPTQ Linear ``name`` whose weight is ``shape = (out, in)``, from its ``parts``
    (``qweight``, ``qzeros``, ``scales``, ``g_idx``: module docstring); ``GptqImportError`` for anything that does
    not fit."""
    rows, cols = shape
    bits, maxq = config.bits, 2**config.bits - 1
    for what, width in (("input", cols), ("output", rows)):
        if (width * bits) % 32:
            raise GptqImportError(f"layer {name}: its {what} width {width} x {bits} bits is not a whole number of "
                                  "int32 words, which the GPTQ format needs")
    group = config.group_size or cols
    if cols % group:
        raise GptqImportError(f"layer {name}: group_size {group} does not divide its input width {cols}")
    n_groups = cols // group
    why = f"{bits}-bit, group_size {config.group_size or -1}, weight [{rows}, {cols}]"
    qweight = _check_shape(f"{name}.qweight", parts.get("qweight"), (cols * bits // 32, rows), torch.int32, why)
    qzeros = _check_shape(f"{name}.qzeros", parts.get("qzeros"), (n_groups, rows * bits // 32), torch.int32, why)
    scales = _check_shape(f"{name}.scales", parts.get("scales"), (n_groups, rows), None, why).float()
    codes = unpack_int32(qweight.t(), bits, cols)
    zeros = unpack_int32(qzeros, bits, rows).to(torch.int16)  # [n_groups, rows]
    if config.checkpoint_format == "gptq":
        zeros = zeros + 1
        if int(zeros.max()) > maxq:
            raise GptqImportError(f"layer {name}: a v1 (checkpoint_format gptq) zero point stored as {maxq} means "
                                  f"{maxq + 1}, outside the {bits}-bit code range (a zero point of 0 written by a v1 "
                                  "packer); this file cannot be read exactly")
    if config.sym and bool((zeros != 2 ** (bits - 1)).any()):
        raise GptqImportError(f"layer {name}: sym is true but its zero points are not all {2 ** (bits - 1)} "
                              f"(found {int(zeros.min())} to {int(zeros.max())})")
    if not torch.equal(scales.half().float(), scales) or not bool(torch.isfinite(scales).all()):
        raise GptqImportError(f"layer {name}: its scales are not all finite fp16 values")
    g_idx = _group_index(name, parts.get("g_idx"), config, cols, group, why)
    quant = QuantizedWeight(codes, scales.t().contiguous(), zeros.t().to(torch.uint8).contiguous(), bits, group,
                            g_idx)
    return CompressedLinear(quant=quant)


def _group_index(name: str, g_idx: torch.Tensor | None, config: GptqConfig, cols: int, group: int,
                 why: str) -> torch.Tensor | None:
    """``g_idx`` as ``QuantizedWeight`` holds it: None when it is the contiguous order, else ``[cols]`` int32 with
    ``group`` columns in every group."""
    if g_idx is None:
        if config.desc_act:
            _check_shape(f"{name}.g_idx", None, (cols,), None, "desc_act is true: act order needs it")
        return None
    g_idx = _check_shape(f"{name}.g_idx", g_idx, (cols,), None, why).long()
    if g_idx.is_floating_point() or int(g_idx.min()) < 0 or int(g_idx.max()) >= cols // group:
        raise GptqImportError(f"tensor {name}.g_idx holds groups outside 0..{cols // group - 1}")
    if torch.equal(g_idx, torch.arange(cols) // group):
        return None
    sizes = torch.bincount(g_idx, minlength=cols // group)
    if bool((sizes != group).any()):
        raise GptqImportError(f"tensor {name}.g_idx gives groups of {int(sizes.min())} to {int(sizes.max())} "
                              f"columns, expected {group} each")
    return g_idx.to(torch.int32)


def _empty_model(source: Path) -> nn.Module:
    """The base model's architecture with its weights on ``meta`` (nothing allocated), tied as the model ties them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.tie_weights()
    return model


def _split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The tensors of each quantized Linear (by module name: those with a ``qweight``) and all other tensors."""
    modules = {name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")}
    layers: dict[str, dict[str, torch.Tensor]] = {module: {} for module in modules}
    others = {}
    for name, tensor in tensors.items():
        module, _, part = name.rpartition(".")
        if module in layers and part in PARTS:
            layers[module][part] = tensor
        elif part in PARTS[1:]:
            raise GptqImportError(f"tensor {name} has no {module}.qweight beside it; the folder is incomplete")
        else:
            others[name] = tensor
    return layers, others


def _layers(model: nn.Module, parts: dict[str, dict[str, torch.Tensor]],
            config: GptqConfig, aliases: dict[str, str]) -> dict[str, CompressedLinear]:
    layers = {}
    for name in sorted(parts):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise GptqImportError(f"the GPTQ folder quantizes {name}, which the base model "
                                  f"{type(model).__name__} has no module of") from None
        if not isinstance(module, COMPRESSIBLE_TYPES):
            raise GptqImportError(f"the GPTQ folder quantizes {name}, a {type(module).__name__} in the base model; "
                                  "expected a Linear or Conv1D")
        if f"{name}.weight" in aliases or f"{name}.weight" in aliases.values():
            raise GptqImportError(f"the GPTQ folder quantizes {name}, whose weight the base model ties to another "
                                  "tensor; tied quantized weights are not read")
        layers[name] = gptq_layer(name, parts[name], config, tuple(weight_of(module).shape))
    return layers


def _plain_tensors(model: nn.Module, others: dict[str, torch.Tensor], layers: dict[str, CompressedLinear],
                   folder: Path) -> dict[str, torch.Tensor]:
    """The non-quantized tensors to load into the base model's architecture, each checked against its shape."""
    state, aliases = unique_state(model)
    quantized = {f"{name}.weight" for name in layers}
    expected = {name: tensor for name, tensor in state.items() if name not in quantized}
    for alias, target in aliases.items():  # a tied copy stored anyway must equal what it is tied to
        if alias in others:
            stored = others.pop(alias)
            if target in others and not torch.equal(stored, others[target]):
                raise GptqImportError(f"tensor {alias} differs from {target}, which the base model ties it to")
    missing = sorted(set(expected) - set(others))
    if missing:
        raise GptqImportError(f"{folder} lacks tensors of the base model: {', '.join(missing[:3])}"
                              f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
    unexpected = sorted(set(others) - set(expected))
    if unexpected:
        raise GptqImportError(f"{folder} holds tensors the base model {type(model).__name__} does not have: "
                              f"{', '.join(unexpected[:3])}")
    for name, tensor in others.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise GptqImportError(f"tensor {name} has shape {list(tensor.shape)} in the GPTQ folder but "
                                  f"{list(expected[name].shape)} in the base model")
    return others


def import_gptq(folder: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
                flag: str = "--out") -> dict:
    """Convert GPTQ folder ``folder`` (module docstring) into a compressed checkpoint of base model ``base`` in
    folder ``out`` (new, empty or an earlier checkpoint: ``files.OutputPathError`` naming ``flag`` otherwise; built
    beside it and swapped in whole). Returns the summary recorded as ``imported`` (source, fingerprint, format,
    quantizer, spec). Raises ``GptqImportError`` (one line) before the base weights are read, and ``ModelError``
    for a base model that is not there."""
    out = Path(out)
    ensure_replaceable(out, CHECKPOINT_KIND, flag)
    with replacing_folder(out) as staging:
        return _write_import(staging, Path(folder), base)


def _write_import(staging: Path, folder: Path, base: str | os.PathLike) -> dict:
    from cpt_bench.assets.model import load_tokenizer, model_fingerprint, model_folder

    config = read_gptq_config(folder)
    source = model_folder(base)
    model = _empty_model(source)
    parts, others = _split(read_gptq_tensors(folder))
    if not parts:
        raise GptqImportError(f"{folder} holds no quantized layer (no tensor named <module>.qweight)")
    _, aliases = unique_state(model)
    layers = _layers(model, parts, config, aliases)
    model.load_state_dict(_plain_tensors(model, others, layers, folder), strict=False, assign=True)
    model.tie_weights()
    spec = config.spec
    reports = [LayerReport(name, f"imported ({config.checkpoint_format})", None, 0.0) for name in layers]
    imported = {"source": str(folder.resolve()), "fingerprint": model_fingerprint(folder),
                "checkpoint_format": config.checkpoint_format, "quantizer": config.quantizer, "spec": str(spec)}
    base_model = {"name": str(base), "fingerprint": model_fingerprint(source)}
    save_compressed(model, CompressionResult(spec, None, layers, reports), staging, base_model, imported)
    load_tokenizer(str(source)).save_pretrained(staging)
    return imported


def imported_checkpoint(base: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """The cache's checkpoint of GPTQ folder ``folder`` over base model ``base``, converted on first use
    (``import_gptq``); keyed by both fingerprints (config and weight files) and ``quantize_config.json``."""
    from cpt_bench.assets.cache import ensure_entry
    from cpt_bench.assets.model import model_fingerprint, model_folder

    folder = Path(folder)
    config = read_gptq_config(folder)  # refuse before hashing weights
    settings = folder / QUANTIZE_CONFIG_FILE
    payload = {"version": IMPORT_VERSION, "gptq": model_fingerprint(folder),
               "settings": settings.read_text() if settings.is_file() else None,
               "base": model_fingerprint(model_folder(base))}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    stem = "".join(c if c.isalnum() or c in "._+-" else "_" for c in f"{folder.name}-{config.spec}")

    def build(tmp: Path) -> dict:
        return {"key": key, **_write_import(tmp, folder, base)}

    return ensure_entry(f"imported/{stem}-{key[:12]}", build)
