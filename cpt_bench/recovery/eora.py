"""The EoRA kind: a compressed model's training-free low-rank correction (``compress.eora``), stored and applied as a
standard PEFT LoRA adapter.

Folder layout (a LoRA folder, so ``lora=DIR``, plain ``lm_eval --model hf --model_args pretrained=...,peft=DIR`` and
``PeftModel.from_pretrained`` load it too):

- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight [r, in]`` and ``.lora_B.weight [out, r]``
  in fp16, for every compressed Linear;
- ``adapter_config.json``: PEFT ``LORA``, ``r``, ``lora_alpha = r`` (scale 1, so the layer adds exactly ``B A``),
  the modules by full name (``fan_in_fan_out`` for GPT-2's ``Conv1D``);
- ``lora.json``: the LoRA record (``lora.FORMAT``: what it fits, the sha256 of the weights) with ``method: "eora"``
  and ``eora``: rank, the base model's fingerprint, the compressed checkpoint (path, spec, sha256), the calibration
  corpus and windows, the output error per Linear with no correction, a plain SVD of ``dW`` and EoRA, and the memory
  account: the adapter's stored bytes added to the checkpoint's, and bits per weight over the compressed Linears
  with and without it.

An EoRA adapter corrects one compressed checkpoint's errors: apply it with that checkpoint (``compression=DIR``).
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from tabulate import tabulate
from transformers.pytorch_utils import Conv1D

from cpt_bench.compress.eora import EoraFit, signature_mismatch
from cpt_bench.compress.layers import COMPRESSIBLE_TYPES, weight_of
from cpt_bench.compress.storage import WEIGHTS_FILE
from cpt_bench.files import OutputKind, json_bytes, replacing_folder, write_files_atomic
from cpt_bench.provenance import environment_record
from cpt_bench.recovery.kind import Applied, RecoveryKind
from cpt_bench.recovery.lora import (
    FORMAT,
    METADATA,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    LoraError,
    apply_lora,
    lora_parameters,
    read_lora,
)

METHOD = "eora"
EORA_KIND = OutputKind("an EoRA adapter", METADATA, (("format", FORMAT), ("method", METHOD)))
_STORED_DTYPE = torch.float16
REQUIRED_RECORD = ("rank", "checkpoint", "signature", "memory", "output_error")


class EoraArtifactError(LoraError):
    """An EoRA folder that is missing, damaged or not an EoRA adapter (one-line message)."""


def adapter_tensors(fit: EoraFit) -> dict[str, torch.Tensor]:
    """PEFT's state-dict keys -> fp16 ``lora_A [r, in]`` / ``lora_B [out, r]`` of every fitted Linear; refuses a
    correction that fp16 cannot hold (``EoraArtifactError``)."""
    tensors = {}
    for name, (a, b) in fit.adapters.items():
        for part, tensor in (("lora_A", a), ("lora_B", b)):
            stored = tensor.to(_STORED_DTYPE).contiguous()
            if not torch.isfinite(stored).all():
                raise EoraArtifactError(f"the EoRA {part} of {name} overflows fp16 (largest magnitude "
                                        f"{tensor.abs().max().item():.3g}); it cannot be stored")
            tensors[f"base_model.model.{name}.{part}.weight"] = stored
    return tensors


def _peft_config(fit: EoraFit, model: torch.nn.Module, base_name: str) -> bytes:
    from peft import LoraConfig, TaskType

    conv1d = any(isinstance(model.get_submodule(name), Conv1D) for name in fit.adapters)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=fit.rank, lora_alpha=fit.rank, lora_dropout=0.0,
                        target_modules=list(fit.adapters), fan_in_fan_out=conv1d, bias="none",
                        base_model_name_or_path=base_name, inference_mode=True)
    payload = config.to_dict()
    payload["target_modules"] = list(fit.adapters)  # PEFT keeps a set: the fitted order is easier to read
    return json_bytes({key: sorted(value) if isinstance(value, set) else value for key, value in payload.items()})


def memory_account(fit: EoraFit, adapter_bytes: int, checkpoint_memory: dict) -> dict[str, Any]:
    """The adapter's bytes (as stored, fp16) against the compressed checkpoint's memory account
    (``compression.json``'s ``memory``): stored totals and bits per weight over the compressed Linears."""
    weights = checkpoint_memory["compressed_layer_weights"]
    layer_bytes = checkpoint_memory["compressed_layer_bytes"]
    return {"adapter_bytes": adapter_bytes,
            "adapter_parameters": sum(a.numel() + b.numel() for a, b in fit.adapters.values()),
            "checkpoint_stored_bytes": checkpoint_memory["stored_bytes"],
            "stored_bytes": checkpoint_memory["stored_bytes"] + adapter_bytes,
            "compressed_layer_weights": weights,
            "compressed_bits_per_weight": 8 * layer_bytes / weights,
            "compressed_bits_per_weight_with_adapter": 8 * (layer_bytes + adapter_bytes) / weights,
            "dense_fp16_bytes": checkpoint_memory["dense_fp16_bytes"],
            "ratio_to_dense_fp16": (checkpoint_memory["stored_bytes"] + adapter_bytes)
            / checkpoint_memory["dense_fp16_bytes"]}


def save_eora(out: Path, fit: EoraFit, model: torch.nn.Module, target: dict[str, Any], checkpoint: dict[str, Any],
              calibration: dict[str, Any]) -> Path:
    """Write the EoRA folder (module docstring) to ``out``, built beside it and swapped in whole.

    ``model``: the base model (module names and types), ``target``: its identity (``target.describe_target``),
    ``checkpoint``: ``{"path", "spec", "sha256", "memory"}`` of the compressed checkpoint it corrects,
    ``calibration``: the calibration settings (corpus, windows, seqlen, seed, true_sequential). ``out`` must be new,
    empty or an earlier EoRA folder: the caller checks it (``files.ensure_replaceable(out, EORA_KIND, flag)``) before
    the fit.
    """
    tensors = adapter_tensors(fit)
    data = save_safetensors(tensors)
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    memory = memory_account(fit, adapter_bytes, checkpoint["memory"])
    record = {"rank": fit.rank, "base_model": checkpoint.get("base_model"), "signature": fit.signature,
              "checkpoint": {key: checkpoint[key] for key in ("path", "spec", "sha256")}, "calibration": calibration,
              "seconds": fit.seconds, "output_error": {"unit": "mean over calibration tokens of ||(W - W') x||^2",
                                                       "total": fit.totals(), "layers": fit.errors},
              "memory": memory}
    meta = {"format": FORMAT, "method": METHOD, **target, "compression": checkpoint["path"],
            "trainable_parameters": memory["adapter_parameters"], "eora": record,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "environment": environment_record(seeds={"calibration": calibration.get("seed", 0)}),
            "sha256": hashlib.sha256(data).hexdigest()}
    out = Path(out)
    with replacing_folder(out) as staging:
        write_files_atomic(staging, {PEFT_WEIGHTS: data, METADATA: json_bytes(meta),
                                     PEFT_CONFIG: _peft_config(fit, model, target["model"]["name"])})
    return out


def check_fitted_on(model: torch.nn.Module, where: str, meta: dict[str, Any]) -> None:
    """Refuse (one line) a ``model`` whose first corrected Linear does not hold the compressed weight the EoRA folder
    ``where`` (``meta``: its ``lora.json``) was fitted on: another compression, or none."""
    signature, checkpoint = meta["eora"]["signature"], meta["eora"]["checkpoint"]
    try:
        module = model.get_submodule(signature["module"])
    except AttributeError:
        raise EoraArtifactError(f"EoRA {where} corrects module {signature['module']}, which model has not") from None
    if not isinstance(module, COMPRESSIBLE_TYPES):  # a low-bit kernel (compression_mode=real): PEFT cannot wrap it
        raise EoraArtifactError(f"EoRA {where} applies through PEFT to a Linear, but {signature['module']} is a "
                                f"{type(module).__name__}; load the checkpoint with compression_mode=simulated")
    worst = signature_mismatch(signature, weight_of(module))
    if worst is not None:
        raise EoraArtifactError(f"EoRA {where} was fitted on checkpoint {checkpoint['path']} ({checkpoint['spec']}), "
                                f"but {signature['module']} of this model holds other weights (row sums off by "
                                f"{worst:.3g} of their scale); load that checkpoint with compression=DIR")


def read_eora(folder: Path) -> dict[str, Any]:
    """``lora.json`` of an EoRA folder, after the LoRA folder's checks (files, sha256); refuses a LoRA folder that
    is not an EoRA adapter."""
    meta = read_lora(Path(folder))
    if meta.get("method") != METHOD or not isinstance(meta.get("eora"), dict):
        raise EoraArtifactError(f"{folder} is a LoRA folder but not an EoRA adapter (no method {METHOD!r} in "
                                f"{METADATA}); apply it with lora= instead")
    missing = [key for key in REQUIRED_RECORD if key not in meta["eora"]]
    if missing:
        raise EoraArtifactError(f"{Path(folder) / METADATA} lacks eora.{', eora.'.join(missing)}; expected an EoRA "
                                "folder written by cpt_bench")
    return meta


def memory_table(meta: dict[str, Any]) -> str:
    """An EoRA folder's memory account (``read_eora``) as a text table: the checkpoint, the adapter and both."""
    memory, rank = meta["eora"]["memory"], meta["eora"]["rank"]
    weights = memory["compressed_layer_weights"]
    rows = [["checkpoint", memory["checkpoint_stored_bytes"], memory["compressed_bits_per_weight"]],
            [f"EoRA r{rank} (fp16)", memory["adapter_bytes"], 8 * memory["adapter_bytes"] / weights],
            ["checkpoint + EoRA", memory["stored_bytes"], memory["compressed_bits_per_weight_with_adapter"]]]
    table = [[label, f"{stored / 1e6:.2f}", f"{bits:.3f}", f"{stored / memory['dense_fp16_bytes']:.3f}"]
             for label, stored, bits in rows]
    return tabulate(table, headers=["stored", "MB", "bits/weight (compressed Linears)", "ratio to dense fp16"],
                    disable_numparse=True)


def error_table(meta: dict[str, Any]) -> str:
    """The summed output errors on the calibration inputs: no correction, plain SVD, EoRA."""
    total = meta["eora"]["output_error"]["total"]
    rows = [["none", total["none"]], [f"plain SVD r{meta['eora']['rank']}", total["svd"]],
            [f"EoRA r{meta['eora']['rank']}", total["eora"]]]
    return tabulate([[label, f"{value:.6g}"] for label, value in rows],
                    headers=["correction", "output error (sum over Linears)"], disable_numparse=True)


class EoraKind(RecoveryKind):
    """A fitted EoRA correction (``eora=DIR``): applied unmerged through PEFT on top of the compressed checkpoint it
    was fitted on, no prompt. Not trained: ``cpt-bench eora`` or ``cpt-bench compress --eora-rank`` fit it."""

    name = METHOD
    label = "EoRA adapter"
    colour = "#b2182b"
    model_arg = METHOD

    def check_arg(self, value: str) -> None:
        if value == "":
            raise EoraArtifactError("eora is empty: expected an EoRA folder (cpt-bench eora --out DIR)")

    def read(self, value: str) -> dict[str, Any]:
        return read_eora(Path(value))

    def apply(self, model: torch.nn.Module, tokenizer, value: str, artifact: dict[str, Any], model_name: str,
              allow_cross_model: bool) -> Applied:
        check_fitted_on(model, value, artifact)
        wrapped = apply_lora(model, tokenizer, Path(value), artifact, model_name, allow_cross_model)
        record = artifact["eora"]
        info = {"kind": self.name, "path": str(value), "sha256": artifact["sha256"], "rank": record["rank"],
                "fitted_on": record["checkpoint"], "stored_bytes": record["memory"]["adapter_bytes"],
                "bits_per_weight_with_adapter": record["memory"]["compressed_bits_per_weight_with_adapter"]}
        return Applied(wrapped, info=info, tensors=list(lora_parameters(wrapped).values()))


def describe(meta: dict[str, Any]) -> str:
    """Both tables of an EoRA folder, for the command line."""
    return f"{error_table(meta)}\n\n{memory_table(meta)}"


def checkpoint_record(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What an EoRA folder records of the compressed checkpoint ``folder`` (its ``compression.json``)."""
    return {"path": str(Path(folder).resolve()), "spec": manifest["spec"], "base_model": manifest.get("base_model"),
            "sha256": manifest["files"][WEIGHTS_FILE]["sha256"], "memory": manifest["memory"]}

