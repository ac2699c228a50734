"""The one way to load a model: ``load_model(name, compression, mode, dtype, device)``.

``name`` is ``embedded`` (the cached default), a model folder or a Hugging Face id. ``compression`` is what
``parse_compression`` makes of a user's value, wherever it comes in (CLI ``--compression``, lm-eval
``compression=``, a matrix's checkpoints):

- nothing, ``""`` or ``dense``: the dense model;
- a spec (``gptq-w4g64``, grammar in ``compress.spec``): the cache's checkpoint, compressed on first use with the
  given (or default) calibration;
- a folder holding ``compression.json``: a checkpoint written by ``cpt-bench compress --out``. It must have been
  compressed from ``name``: the base model's weight fingerprint recorded in ``compression.json`` is compared
  with ``name``'s, and another model is refused in one line;
- a GPTQ-format folder written by another tool (auto-gptq, GPTQModel, ``--export-gptq``; ``quantize_config.json``
  or a ``config.json`` with a gptq ``quantization_config``): converted over ``name`` into a cached checkpoint on
  first use (``compress.gptq_import``), its shapes checked against ``name``'s.

A value that is both a valid spec and an existing path is refused by name (write ``./gptq-w4g64`` for the
folder); a folder without ``compression.json`` and a value that is neither are refused with the grammar.

The ``cpt`` lm-eval model (``lmeval.adapter``) is this loader plus prompting; dense models it leaves to lm-eval's
HFLM, so that every ``hf`` model_arg keeps working.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpt_bench.assets.model import ModelError, load_causal_lm, load_tokenizer, model_fingerprint
from cpt_bench.compress.checkpoints import cached_checkpoint, check_mode, default_dtype, load_checkpoint
from cpt_bench.compress.gptq_import import imported_checkpoint, is_gptq_folder
from cpt_bench.compress.spec import CalibrationSettings, Spec, SpecError
from cpt_bench.compress.storage import MANIFEST_FILE, read_manifest

log = logging.getLogger(__name__)

DENSE = "dense"


@dataclass(frozen=True)
class CheckpointFolder:
    """A compressed checkpoint folder (holds ``compression.json``) given in place of a spec."""

    path: Path


@dataclass(frozen=True)
class GptqFolder:
    """A GPTQ-format folder written by another tool (``compress.gptq_import``) given in place of a spec."""

    path: Path


Compression = Spec | CheckpointFolder | GptqFolder | None


def parse_compression(value: str | os.PathLike | Spec | CheckpointFolder | GptqFolder | None,
                      what: str = "compression") -> Compression:
    """A user's compression value as a ``Spec``, a ``CheckpointFolder``, a ``GptqFolder`` or None (dense); see the
    module docstring.

    ``what`` names the argument in errors (e.g. ``--compression``). Raises ``SpecError`` (one line).
    """
    if value is None or isinstance(value, Spec | CheckpointFolder | GptqFolder):
        return None if isinstance(value, Spec) and value.is_dense else value
    text = str(value)
    if text in ("", DENSE):
        return None
    path = Path(text).expanduser()
    try:
        spec = Spec.parse(text)
    except SpecError as error:
        spec_error = error
    else:
        if path.exists():
            raise SpecError(f"{what} {text!r} is both a compression spec and an existing path; write "
                            f"./{text} for the folder, or move the folder")
        return spec
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        return CheckpointFolder(path.resolve())
    if is_gptq_folder(path):
        return GptqFolder(path.resolve())
    if path.is_dir():
        raise SpecError(f"{what} {text!r} is a folder without {MANIFEST_FILE} or GPTQ quantization settings; expected "
                        "a compressed checkpoint folder (cpt-bench compress --out DIR), a GPTQ-format folder or a "
                        "spec")
    raise SpecError(f"{what} {text!r} is neither a compressed checkpoint folder nor a valid spec: {spec_error}")


def default_device() -> str:
    """``cuda`` when a CUDA device is available, else ``cpu`` (what lm-eval's ``hf`` model ends up using)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None, what: str = "device") -> str:
    """``device`` as given, ``default_device()`` when None / ``auto``; a CUDA device without CUDA is refused."""
    if device in (None, "", "auto"):
        return default_device()
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ModelError(f"{what} {device!r} is not a torch device; expected cpu, cuda, cuda:N or auto") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"{what} {device!r}: CUDA is not available on this machine; use cpu (or auto)")
    return str(device)


def lm_eval_device(device: str | None) -> str:
    """The device the ``cpt`` lm-eval model runs on, chosen as lm-eval's ``hf`` model does: lm-eval passes its
    default ``cuda:0`` unless ``--device`` is given, and on a machine without CUDA that means the CPU (logged)."""
    if device not in (None, "", "auto") and str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s: CUDA is not available on this machine; running on the CPU", device)
        return "cpu"
    return resolve_device(device)


@dataclass
class LoadedModel:
    """A loaded model with what produced it.

    Attributes:
        model: the causal LM in eval mode on its device.
        tokenizer: the base model's tokenizer.
        compression: the canonical spec text (``dense`` when uncompressed).
        checkpoint: the compressed checkpoint folder it was built from (None when dense).
        layer_modes: how each compressed Linear runs (``simulated``, ``int4 g64``, ...; ``gptqmodel``).
    """

    model: nn.Module
    tokenizer: Any
    compression: str = DENSE
    checkpoint: Path | None = None
    layer_modes: dict[str, str] | str | None = None


def load_model(name_or_path: str, compression: Compression | str = None, *, mode: str = "simulated",
               dtype: torch.dtype | None = None, device: str | None = None,
               calibration: CalibrationSettings | None = None, progress: bool = True,
               fallback: bool = False, tokenizer: Any = None) -> LoadedModel:
    """Load ``name_or_path``, compressed as ``compression`` (see the module docstring), in eval mode.

    Args:
        name_or_path: ``embedded``, a model folder or a Hugging Face id.
        compression: a ``Spec``, a ``CheckpointFolder``, a ``GptqFolder``, None (dense), or text for
            ``parse_compression``.
        mode: ``simulated`` (dequantized weights) or ``real`` (packed low-bit kernels); compressed models only.
        dtype: float dtype (None: fp32, or bf16 for real kernels; ``checkpoints.default_dtype``).
        device: torch device (None: cuda when available, else cpu).
        calibration: settings for compressing a spec on first use (None: the defaults).
        progress: show the compression's tqdm bar when a spec is compressed now.
        fallback: real mode on CPU: run layers without a kernel (2- and 3-bit codes) simulated instead of raising;
            ``layer_modes`` says which.
        tokenizer: the model's tokenizer when the caller holds it (``assets.model.shared_tokenizer``); None: read.
    """
    check_mode(mode)
    compression = parse_compression(compression)
    device = resolve_device(device)
    dtype = dtype or default_dtype(mode)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name_or_path)
    if compression is None:
        return LoadedModel(load_causal_lm(name_or_path, dtype=dtype).to(device).eval(), tokenizer)
    if isinstance(compression, Spec):
        folder = cached_checkpoint(name_or_path, compression, calibration, progress)
    elif isinstance(compression, GptqFolder):
        folder = imported_checkpoint(name_or_path, compression.path)
    else:
        folder = compression.path
        check_base_model(folder, name_or_path)
    model, layer_modes = load_checkpoint(folder, mode, dtype, device, fallback)
    return LoadedModel(model, tokenizer, read_manifest(folder)["spec"], Path(folder), layer_modes)


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors hold in memory: every parameter's and buffer's storage once (tied or viewed
    tensors share one), tensors on ``meta`` excluded. Packed codes, grids and masks count as stored in real mode,
    the dequantized weights in simulated mode: what a deployment keeps resident, not what the checkpoint stores."""
    storages: dict[tuple[str, int], int] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def weight_formats(layer_modes: dict[str, str] | str | None) -> dict[str, int]:
    """How many compressed Linears run in each format (``{"int4 g64": 210}``, ``{"simulated": 210}``; a fallback
    layer's reason is dropped: ``simulated``); ``{}`` for a dense model, ``{mode: 1}`` for a whole-model mode."""
    if layer_modes is None:
        return {}
    if isinstance(layer_modes, str):
        return {layer_modes: 1}
    return dict(Counter(mode.split(" (")[0] for mode in layer_modes.values()))


def check_base_model(folder: Path, name_or_path: str) -> None:
    """Refuse (one line) a checkpoint folder compressed from another model than ``name_or_path``.

    Checkpoints written before base models were recorded cannot be checked: a warning says so.
    """
    recorded = read_manifest(folder).get("base_model")
    if not recorded:
        log.warning("checkpoint %s does not record its base model; cannot check that it was compressed from %s",
                    folder, name_or_path)
        return
    if recorded["fingerprint"] != model_fingerprint(name_or_path):
        raise ModelError(f"checkpoint {folder} was compressed from model {recorded['name']!r} (weights "
                         f"{recorded['fingerprint'][:12]}), not from {name_or_path!r}; pass the model it was made "
                         "from, or compress this one")
