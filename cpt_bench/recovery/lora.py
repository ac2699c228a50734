"""LoRA adapters as a budget-matched recovery baseline: trained through PEFT on the same compressed model, windows,
steps and optimiser settings as a soft prompt (``training``), stored as a standard PEFT folder.

Folder layout: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` (so plain
``lm_eval --model hf --model_args pretrained=BASE,peft=DIR`` and ``PeftModel.from_pretrained`` load it), and
``lora.json``: format, what it fits (model / tokenizer identity, as a prompt's, see ``target``), the compression it
was trained on, the training record (source, settings, curve, seconds, trainable parameters, peak memory) and the
sha256 of ``adapter_model.safetensors`` (verified on every load). The three files are replaced together.

A PEFT LoRA folder written elsewhere (PEFT's ``save_pretrained``, GPTQModel's EoRA, a Hub adapter) has no
``lora.json``: ``read_lora`` then reads its ``adapter_config.json`` (``peft_type`` must be ``LORA``) and the shapes of
its tensors (``format: "peft"``), and ``apply_lora`` checks each ``lora_A [r, in]`` / ``lora_B [out, r]`` against
the module it targets (refused in one line naming the tensor and both shapes) and records what it could and could
not verify (``verification``: the base model named in ``adapter_config.json`` against the loaded one, the modules
found, the tensors shape-checked; never the training record, the tokenizer or what it was trained on).

An adapter adds ``B @ A`` (rank ``rank``, scaled by ``alpha / rank``) to each targeted Linear and is not merged:
merging into a quantized or pruned weight would make it dense, and unmerged it scores exactly as PEFT does in
plain lm-eval. ``B`` starts at zero (PEFT's default), so the untrained adapter is the unprompted model; a LoRA
adapter therefore has no control prompt.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cpt_bench.errors import UserError
from cpt_bench.files import json_bytes, sha256_of, write_files_atomic
from cpt_bench.provenance import environment_record
from cpt_bench.recovery.artifact import check_fits, read_metadata
from cpt_bench.recovery.kind import Applied, RecoveryKind
from cpt_bench.recovery.position import lead_ids, resolve_position
from cpt_bench.recovery.target import describe_target
from cpt_bench.recovery.training import OBJECTIVES, Learner, SoftPromptConfig, TrainingRun, train_learner

log = logging.getLogger(__name__)

METADATA = "lora.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FORMAT = "cpt_bench.lora/1"
PEFT_FORMAT = "peft"  # ``format`` of the record read from a PEFT LoRA folder without ``lora.json``
_PEFT_PREFIX = "base_model.model."
_UNVERIFIABLE = ("training record (what it was trained on, how, for how long)", "tokenizer",
                 "the compression it was fitted to")
REQUIRED_FIELDS = ("sha256", "hidden_size", "model", "tokenizer", "compression", "trainable_parameters")


class LoraError(UserError):
    """Bad LoRA settings, or a LoRA folder that is missing, damaged or does not fit the model (one-line message)."""


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter per soft prompt's (source, level, seed) under ``prompts.lora``; the rest of the training
    settings (steps, batch, windows, warmup, weight decay, clipping, evaluation) are the soft prompt's.

    ``rank`` / ``alpha``: of every adapter (scale ``alpha / rank``); ``target_modules``: Linear module names
    (``[q_proj, v_proj]``), None for PEFT's default for the architecture; ``dropout``: on the adapter's input;
    ``lr``: None for the soft prompt's (a prompt's rate is often far too high for LoRA); ``objectives``: one adapter
    per objective (``lm`` / ``kd``).
    """

    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    lr: float | None = 1e-3
    objectives: list[str] = field(default_factory=lambda: ["lm"])

    def __post_init__(self) -> None:
        self._check(isinstance(self.rank, int) and self.rank > 0, "rank", "a positive integer")
        self._check(isinstance(self.alpha, int | float) and self.alpha > 0, "alpha", "a positive number")
        self._check(isinstance(self.dropout, int | float) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        self._check(self.target_modules is None or (bool(self.target_modules) and all(
            isinstance(name, str) and name for name in self.target_modules)), "target_modules",
            "a non-empty list of module names or None (PEFT's default for the architecture)")
        self._check(self.lr is None or (isinstance(self.lr, int | float) and 0 < self.lr <= 10), "lr",
                    "a positive number at most 10, or None (the soft prompt's)")
        self._check(bool(self.objectives) and set(self.objectives) <= set(OBJECTIVES)
                    and len(set(self.objectives)) == len(self.objectives), "objectives",
                    f"a non-empty list of distinct objectives out of {', '.join(OBJECTIVES)}")

    def _check(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise LoraError(f"LoRA setting {name} must be {expected}, got {getattr(self, name)!r}")


@contextlib.contextmanager
def _without_peft_deprecation() -> Iterator[None]:
    """PEFT 0.21 calls a transformers method deprecated in 5.x whenever it wraps a model: not the user's to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def attach_lora(model: torch.nn.Module, settings: LoraSettings):
    """``model`` wrapped by PEFT with fresh adapters (B = 0) on its targeted Linears; only they require grad."""
    from peft import LoraConfig, TaskType, get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.rank, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout, target_modules=settings.target_modules)
    try:
        with _without_peft_deprecation():
            return get_peft_model(model, config)
    except ValueError as error:  # no targeted module found, or one PEFT cannot wrap (e.g. a low-bit kernel)
        raise LoraError(f"LoRA target_modules {settings.target_modules or 'default'}: {error}") from None


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter tensors (PEFT's ``lora_A`` / ``lora_B``) of a PEFT-wrapped ``model``, by name (float32)."""
    return {name: param for name, param in model.named_parameters() if ".lora_" in name}


def train_lora(model: torch.nn.Module, tokenizer, config: SoftPromptConfig, settings: LoraSettings, source: str,
               out_dir: Path, *, model_name: str, compression: str = "dense", resume: bool = False,
               teacher: torch.nn.Module | None = None) -> Path:
    """Train a LoRA adapter on the frozen ``model`` with the soft prompt's ``config`` (its lr unless ``settings``
    sets one) on corpus ``source``; write the PEFT folder and ``lora.json`` to ``out_dir`` (see the module
    docstring). Windows start with the tokenizer's lead (BOS when it adds one), as a prompt's do."""
    out_dir = Path(out_dir)
    target = describe_target(model, tokenizer, model_name)  # before wrapping: the base model's identity
    with torch.random.fork_rng(devices=[]):  # PEFT draws A's initial values from the global generator: seed it
        torch.manual_seed(config.seed)      # so that the recorded seed fixes the adapter, whatever ran before
        wrapped = attach_lora(model, settings)
    params = lora_parameters(wrapped)
    device = model.get_input_embeddings().weight.device
    empty = torch.zeros(0, target["hidden_size"], device=device)
    learner = Learner(wrapped, params, empty, "LoRA adapter")
    lr = settings.lr if settings.lr is not None else config.lr
    hyperparameters = asdict(config) | {"lora": asdict(settings), "lr": lr}

    def save(best: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
        learner.load(best)
        return _save_lora(wrapped, out_dir, target, compression, record)

    position = resolve_position(None, tokenizer)
    run = TrainingRun(config, lr, hyperparameters, source, out_dir, lead_ids(position, tokenizer), save,
                      "LoRA adapter", f"model {model_name!r} ({compression})")
    return train_learner(learner, tokenizer, run, resume=resume, teacher=teacher)


def _save_lora(wrapped, out_dir: Path, target: dict[str, Any], compression: str, record: dict[str, Any]) -> Path:
    """Write PEFT's two files (from ``save_pretrained``) and ``lora.json`` into ``out_dir``, all or none."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        wrapped.save_pretrained(tmp)
        files = {name: (Path(tmp) / name).read_bytes() for name in (PEFT_CONFIG, PEFT_WEIGHTS)}
    meta = {"format": FORMAT, **target, "compression": compression, **record,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "environment": environment_record(seeds={"training": record["hyperparameters"]["seed"]}),
            "sha256": hashlib.sha256(files[PEFT_WEIGHTS]).hexdigest()}
    write_files_atomic(out_dir, files | {METADATA: json_bytes(meta)})
    return out_dir


def read_lora(folder: Path) -> dict[str, Any]:
    """``lora.json`` of a LoRA folder, after checking its files and the weights' sha256 (no model checks); for a PEFT
    LoRA folder without ``lora.json``, the record ``read_peft_lora`` makes of it."""
    folder = Path(folder)
    if not (folder / METADATA).is_file() and (folder / PEFT_CONFIG).is_file():
        return read_peft_lora(folder)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS, METADATA):
        if not (folder / name).is_file():
            raise LoraError(f"{folder} is not a LoRA folder: {name} is missing")
    meta = read_metadata(folder / METADATA, FORMAT, REQUIRED_FIELDS, LoraError)
    if sha256_of(folder / PEFT_WEIGHTS) != meta["sha256"]:
        raise LoraError(f"{folder / PEFT_WEIGHTS} fails its sha256 check (file changed after it was written)")
    return meta


def read_peft_lora(folder: Path) -> dict[str, Any]:
    """The record of a PEFT LoRA folder that has no ``lora.json``: ``format`` ``"peft"``, the weights' ``sha256``,
    ``trainable_parameters``, ``peft`` (settings from ``adapter_config.json``) and ``shapes`` (each tensor's, read
    from the safetensors header without loading it). Raises ``LoraError`` for another ``peft_type`` or missing files."""
    from safetensors import SafetensorError, safe_open

    config_path, weights = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoraError(f"cannot read {config_path}: {error}") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise LoraError(f"{folder} is a PEFT folder of peft_type {peft_type!r}, not LORA; lora= takes a PEFT LoRA "
                        "adapter")
    if not weights.is_file():
        pickled = " (pickled adapter_model.bin is not read)" if (folder / "adapter_model.bin").is_file() else ""
        raise LoraError(f"{folder} is not a LoRA folder: {PEFT_WEIGHTS} is missing{pickled}")
    try:
        with safe_open(weights, "pt") as handle:
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as error:
        raise LoraError(f"cannot read {weights}: {error}") from None
    settings = {key: config.get(key) for key in ("base_model_name_or_path", "r", "lora_alpha", "target_modules",
                                                 "fan_in_fan_out", "use_dora", "use_rslora", "modules_to_save")}
    return {"format": PEFT_FORMAT, "sha256": sha256_of(weights), "compression": None,
            "trainable_parameters": sum(math.prod(shape) for shape in shapes.values()), "peft": settings,
            "shapes": shapes}


def check_peft_fits(model: torch.nn.Module, meta: dict[str, Any], folder: Path, name: str) -> dict[str, Any]:
    """Check a PEFT LoRA record (``read_peft_lora``) against ``model``: every ``lora_A`` / ``lora_B`` weight's module
    exists and has the input / output width the tensor needs (``LoraError`` naming the tensor and both shapes).
    Returns what was and was not verified (``verification``, recorded with the cell)."""
    checked, unchecked, modules = 0, [], set()
    for key, shape in meta["shapes"].items():
        module_name, _, part = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            unchecked.append(key)
            continue
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise LoraError(f"LoRA {folder}: tensor {key} targets {module_name}, which model {name!r} does not "
                            "have") from None
        widths = _linear_widths(module)
        if widths is None:
            unchecked.append(key)
            continue
        width_in, width_out = widths
        expected = [shape[0], width_in] if part == "A.weight" else [width_out, shape[1]]
        if shape != expected:
            raise LoraError(f"LoRA {folder}: tensor {key} has shape {shape}, but {module_name} of model {name!r} needs "
                            f"{expected} ({width_in} in, {width_out} out)")
        checked += 1
        modules.add(module_name)
    named = meta["peft"].get("base_model_name_or_path")
    return {"training_record": False, "not_verifiable": list(_UNVERIFIABLE),
            "base_model": {"adapter_config": named, "loaded": name, "same_name": named == name},
            "target_modules": meta["peft"].get("target_modules"), "modules_found": len(modules),
            "tensors_shape_checked": checked, "tensors_not_shape_checked": unchecked}


def _linear_widths(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a Linear-like module (``nn.Linear``, GPT-2's ``Conv1D``, a low-bit kernel), else None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.nx, module.nf
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None),
                                                                            int):
        return module.in_features, module.out_features
    return None


def apply_lora(model: torch.nn.Module, tokenizer, folder: Path, meta: dict[str, Any], name: str,
               allow_cross_model: bool = False):
    """``model`` wrapped by the adapter in ``folder`` (its ``meta`` from ``read_lora``), for inference, after the
    same fit checks as a prompt's (``artifact.check_fits``), or for a PEFT folder without ``lora.json`` the shape
    checks of ``check_peft_fits`` (whose record is put in ``meta["verification"]``)."""
    from peft import PeftModel

    if meta["format"] == PEFT_FORMAT:
        meta["verification"] = check_peft_fits(model, meta, folder, name)
        if not meta["verification"]["base_model"]["same_name"]:
            log.warning("LoRA %s names base model %r, not %r; its shapes fit, its training cannot be checked",
                        folder, meta["peft"].get("base_model_name_or_path"), name)
    else:
        check_fits(meta, describe_target(model, tokenizer, name), allow_cross_model)
    try:
        with _without_peft_deprecation():
            return PeftModel.from_pretrained(model, str(folder), is_trainable=False).eval()
    except (ValueError, KeyError, RuntimeError) as error:  # target modules or shapes that this model lacks
        raise LoraError(f"LoRA {folder} does not fit model {name!r}: {str(error).splitlines()[0]}") from None


class LoraKind(RecoveryKind):
    """A learned LoRA adapter (``lora=DIR``): applied unmerged on top of the (compressed) model, no prompt."""

    name = "lora"
    label = "LoRA adapter"
    colour = "#1b7837"
    stored_value_bytes = 4  # adapter_model.safetensors holds lora_A / lora_B in float32
    model_arg = "lora"
    learned = True
    metadata_file = METADATA
    summary_keys = ("source", "trained_at")

    def check_arg(self, value: str) -> None:
        if value == "":
            raise LoraError("lora is empty: expected a PEFT LoRA folder (written by the matrix's prompts.lora, "
                        "cpt-bench eora, PEFT or GPTQModel)")

    def read(self, value: str) -> dict[str, Any]:
        return read_lora(Path(value))

    def apply(self, model: torch.nn.Module, tokenizer, value: str, artifact: dict[str, Any], model_name: str,
              allow_cross_model: bool) -> Applied:
        wrapped = apply_lora(model, tokenizer, Path(value), artifact, model_name, allow_cross_model)
        info = {"kind": self.name, "path": str(value), "sha256": artifact["sha256"],
                "trained_on": artifact["compression"], "trainable_parameters": artifact["trainable_parameters"]}
        if artifact["format"] == PEFT_FORMAT:  # written elsewhere: what could and could not be verified
            info |= {"format": PEFT_FORMAT, "peft": artifact["peft"], "verification": artifact["verification"]}
        return Applied(wrapped, info=info, tensors=list(lora_parameters(wrapped).values()))

    def read_meta(self, folder: Path) -> dict[str, Any]:
        return read_lora(folder)

    def train(self, model: torch.nn.Module, tokenizer, training: SoftPromptConfig, settings: LoraSettings,
              source: str, folder: Path, *, model_name: str, compression: str, resume: bool,
              teacher: torch.nn.Module | None) -> Path:
        return train_lora(model, tokenizer, training, settings, source, folder, model_name=model_name,
                          compression=compression, resume=resume, teacher=teacher)

    def describe_settings(self, settings: LoraSettings, training: SoftPromptConfig) -> str:
        return (f"rank {settings.rank}, alpha {settings.alpha:g}, dropout {settings.dropout:g}, modules "
                f"{', '.join(settings.target_modules) if settings.target_modules else 'PEFT default'}, lr "
                f"{settings.lr if settings.lr is not None else training.lr}; otherwise the soft prompts' settings")
