"""A learned soft prompt on disk, and its export as a PEFT PromptTuning adapter.

Folder layout:
- ``prompt.safetensors``: one tensor ``prompt`` of shape ``[n_virtual_tokens, hidden_size]``, float32;
- ``prompt.json``: what it fits (model / tokenizer names and fingerprints, hidden size), the compression
  spec it was trained on (``dense`` when none), where the prompt sits (``prompt_position``, see ``position``;
  absent in prompts written before it was recorded, which sit ``first``), the source corpus, hyperparameters,
  loss curve, training time, provenance, and the sha256 of ``prompt.safetensors`` (verified on every load).

Both files are replaced together or not at all (``write_files_atomic``), so a failed save keeps the old pair.

Loading refuses a prompt whose hidden size, tokenizer fingerprint or base model (config shape and
token embedding signature, see ``target``) differs from the target model's; ``allow_cross_model=True``
permits another model or tokenizer where the hidden size matches.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from cpt_bench.errors import UserError
from cpt_bench.files import (
    EXPORT_MARKER,
    OutputKind,
    ensure_replaceable,
    json_bytes,
    replacing_folder,
    sha256_of,
    write_bytes_atomic,
    write_files_atomic,
)
from cpt_bench.provenance import environment_record
from cpt_bench.recovery.position import FIRST, recorded_position
from cpt_bench.recovery.target import describe_target, same_embeddings

TENSORS = "prompt.safetensors"
METADATA = "prompt.json"
TENSOR_KEY = "prompt"
FORMAT = "cpt_bench.soft_prompt/1"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_TENSOR_KEY = "prompt_embeddings"  # the key PEFT 0.21 writes for a PromptTuning adapter
PEFT_EXPORT_FORMAT = "cpt_bench.peft_export/1"
PEFT_EXPORT_KIND = OutputKind("a PEFT adapter export", EXPORT_MARKER, (("format", PEFT_EXPORT_FORMAT),))
REQUIRED_FIELDS = ("sha256", "n_virtual_tokens", "hidden_size", "model", "tokenizer", "compression")


class PromptArtifactError(UserError):
    """A prompt folder is missing, corrupt or does not fit the target model (one-line message)."""


@dataclass(frozen=True)
class SoftPrompt:
    """A loaded prompt: ``embeddings`` [n_virtual_tokens, hidden_size] float32 and its ``prompt.json``."""

    embeddings: torch.Tensor
    meta: dict[str, Any]


def save_prompt(folder: Path, embeddings: torch.Tensor, target: dict[str, Any], compression: str,
                training: dict[str, Any]) -> Path:
    """Write ``prompt.safetensors`` then ``prompt.json`` (each atomically) into ``folder``; return it.

    ``embeddings``: [n, hidden] (any float dtype, stored as float32). ``target``: from
    ``describe_target``. ``training``: source corpus, hyperparameters, curve, seconds (stored as given).
    """
    folder = Path(folder)
    embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()
    if embeddings.ndim != 2 or embeddings.shape[1] != target["hidden_size"]:
        raise PromptArtifactError(f"prompt of shape {list(embeddings.shape)} does not fit hidden size "
                                  f"{target['hidden_size']}")
    data = save({TENSOR_KEY: embeddings})
    meta = {"format": FORMAT, "n_virtual_tokens": embeddings.shape[0], **target, "compression": compression,
            **training, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "environment": environment_record(seeds={"prompt": training.get("hyperparameters", {}).get("seed", 0)}),
            "sha256": hashlib.sha256(data).hexdigest()}
    write_files_atomic(folder, {TENSORS: data, METADATA: json_bytes(meta)})
    return folder


def read_prompt(folder: Path) -> SoftPrompt:
    """Read a prompt folder and verify its tensor against the recorded sha256 (no model checks)."""
    folder = Path(folder)
    for name in (TENSORS, METADATA):
        if not (folder / name).is_file():
            raise PromptArtifactError(f"{folder} is not a prompt folder: {name} is missing")
    meta = read_metadata(folder / METADATA, FORMAT, REQUIRED_FIELDS, PromptArtifactError)
    if sha256_of(folder / TENSORS) != meta["sha256"]:
        raise PromptArtifactError(f"{folder / TENSORS} fails its sha256 check (file changed after it was written)")
    return SoftPrompt(load_file(folder / TENSORS)[TENSOR_KEY], meta)


def read_metadata(path: Path, expected_format: str, required: tuple[str, ...],
                  error: type[UserError]) -> dict[str, Any]:
    """An artifact's JSON metadata (``prompt.json``, ``lora.json``), refused in one line (``error``) unless it is a
    JSON object of ``expected_format`` with every ``required`` field."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem}); the {path.parent.name} folder is damaged") from problem
    if not isinstance(meta, dict) or meta.get("format") != expected_format:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise error(f"{path} has format {found!r}, expected {expected_format!r}")
    missing = [name for name in required if name not in meta]
    if missing:
        raise error(f"{path} lacks {', '.join(missing)}; expected a {path.name} written by cpt_bench")
    return meta


def check_fits(meta: dict[str, Any], target: dict[str, Any], allow_cross_model: bool = False) -> None:
    """Refuse a prompt (``meta``) that does not fit ``target`` (from ``describe_target``), in one line."""
    if meta["hidden_size"] != target["hidden_size"]:
        raise PromptArtifactError(f"prompt has hidden size {meta['hidden_size']} but model {target['model']['name']}"
                                  f" has {target['hidden_size']}: it cannot be used with this model")
    if allow_cross_model:
        return
    override = "; pass allow_cross_model=True to use it anyway"
    mine, theirs = meta["tokenizer"], target["tokenizer"]
    if mine["fingerprint"] != theirs["fingerprint"]:
        raise PromptArtifactError(f"prompt was trained for tokenizer {mine['name']!r} (fingerprint "
                                  f"{mine['fingerprint'][:12]}) but tokenizer {theirs['name']!r} differs "
                                  f"({theirs['fingerprint'][:12]}){override}")
    mine, theirs = meta["model"], target["model"]
    if mine["config_sha256"] != theirs["config_sha256"]:
        difference = "config (architecture or vocabulary)"
    elif not same_embeddings(mine["embedding"], theirs["embedding"]):
        difference = "token embedding matrix"
    else:
        return
    raise PromptArtifactError(f"prompt was trained for model {mine['name']!r} but model {theirs['name']!r} has a "
                              f"different {difference}{override}")


def check_prompt_fits(prompt: SoftPrompt, model: torch.nn.Module, tokenizer, allow_cross_model: bool = False) -> None:
    """Refuse a read prompt that does not fit ``model`` / ``tokenizer`` (see ``check_fits``)."""
    name = getattr(model, "name_or_path", "") or model.__class__.__name__
    check_fits(prompt.meta, describe_target(model, tokenizer, name), allow_cross_model)


def load_prompt(folder: Path, model: torch.nn.Module, tokenizer, allow_cross_model: bool = False) -> SoftPrompt:
    """Read a prompt folder and check it fits ``model`` / ``tokenizer`` (see ``check_fits``)."""
    prompt = read_prompt(folder)
    check_prompt_fits(prompt, model, tokenizer, allow_cross_model)
    return prompt


def export_peft(prompt_folder: Path, out_folder: Path, base_model: str | None = None) -> Path:
    """Write a PEFT PromptTuning adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``lm_eval --model hf --model_args pretrained=BASE,peft=OUT`` and ``PeftModel.from_pretrained`` load
    it. ``base_model`` (default: the model name in ``prompt.json``) is only recorded in the config. PEFT puts the
    prompt first, so a prompt trained ``after_bos`` is refused (one line).
    The folder is built beside ``out_folder`` and takes its place when complete (``files.replacing_folder``);
    ``out_folder`` must be new, empty or an earlier export (``files.OutputPathError`` otherwise), which
    ``files.EXPORT_MARKER`` (the prompt folder and its sha256) marks.
    """
    from peft import PromptTuningConfig, TaskType

    out_folder = Path(out_folder)
    ensure_replaceable(out_folder, PEFT_EXPORT_KIND, "OUT_DIR")
    prompt = read_prompt(prompt_folder)
    meta = prompt.meta
    if recorded_position(meta) != FIRST:
        raise PromptArtifactError(f"prompt {prompt_folder} sits after the BOS token ({recorded_position(meta)}), "
                                  "but a PEFT PromptTuning adapter puts it before every token and would score "
                                  f"differently; only prompts trained with prompt_position {FIRST} export")
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=meta["n_virtual_tokens"], token_dim=meta["hidden_size"],
        num_transformer_submodules=1, num_attention_heads=meta["model"]["num_attention_heads"],
        num_layers=meta["model"]["num_layers"], base_model_name_or_path=base_model or meta["model"]["name"],
        inference_mode=True)
    with replacing_folder(out_folder) as tmp:
        config.save_pretrained(str(tmp))
        write_bytes_atomic(tmp / PEFT_WEIGHTS, save({PEFT_TENSOR_KEY: prompt.embeddings}))
        record = {"format": PEFT_EXPORT_FORMAT, "prompt": str(Path(prompt_folder).resolve()), "sha256": meta["sha256"]}
        write_bytes_atomic(tmp / EXPORT_MARKER, json_bytes(record))
    return out_folder

