"""Soft-prompt learning on a frozen (possibly compressed) causal LM, as in the paper's code.

The prompt is a ``[n_virtual_tokens, hidden_size]`` float32 parameter inserted into every window as input
embeddings (the space the model's embedding layer outputs), at ``prompt_position`` (``recovery.position``):
before the window (``first``) or after its leading BOS token (``after_bos``, the default when the tokenizer adds
BOS: windows then start with BOS). The prompt's positions (and the BOS token's) are not scored, so only the
window's tokens are (the first one conditioned on the prompt alone). The training settings
(``SoftPromptConfig``, which LoRA adapters share), the loop, its objectives (``lm``, ``kd``), validation and
checkpoints are ``training``'s; the initialisations ``soft_init``'s.

Why our own loop rather than PEFT's PromptTuning model: PEFT's initialisations (RANDOM, TEXT,
SAMPLE_VOCAB) lack the paper's "first n rows of the embedding matrix", and training a plain tensor
keeps the forward identical to the one ``cpt_bench.lmeval.adapter`` evaluates (prompt embeddings
inserted among the token embeddings), with checkpoints free of PEFT's state-dict naming and no
wrapping of compressed models. A prompt trained ``first`` is interchangeable with PEFT: ``artifact.export_peft``
writes a PromptTuning adapter, and the tests check both score identically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from cpt_bench.files import OutputKind
from cpt_bench.recovery.artifact import (
    FORMAT,
    METADATA,
    PromptArtifactError,
    SoftPrompt,
    check_prompt_fits,
    read_prompt,
    save_prompt,
)
from cpt_bench.recovery.kind import Applied, RecoveryKind
from cpt_bench.recovery.position import META_KEY, lead_ids, recorded_position, resolve_position
from cpt_bench.recovery.soft_init import INITIALISERS
from cpt_bench.recovery.target import describe_target
from cpt_bench.recovery.training import (
    CHECKPOINT,
    Learner,
    SoftPromptConfig,
    SoftPromptError,
    TrainingRun,
    train_learner,
)

# ``prompt train --out``: a folder of an earlier prompt (retrained in place), or one holding only the checkpoint of a
# run cut short, is its own output
SOFT_PROMPT_KIND = OutputKind("a soft prompt folder", METADATA, (("format", FORMAT),), ignored=(CHECKPOINT,))

def token_embeddings(model: torch.nn.Module, chunk: int = 8192) -> torch.Tensor:
    """The embedding layer's output for every token id, ``[vocab, hidden]`` float32 on CPU (computed ``chunk``
    ids at a time on the model's device); equal to the embedding matrix except where the layer scales it."""
    embedding = model.get_input_embeddings()
    ids = torch.arange(embedding.weight.shape[0], device=embedding.weight.device)
    with torch.no_grad():
        return torch.cat([embedding(part).to("cpu", torch.float32) for part in ids.split(chunk)])


def initial_prompt(model: torch.nn.Module, tokenizer, config: SoftPromptConfig) -> torch.Tensor:
    """The untrained prompt [n_virtual_tokens, hidden] float32 on CPU, per ``config.init`` and ``config.seed``."""
    weight = token_embeddings(model)
    if config.init == "vocab" and config.n_virtual_tokens > weight.shape[0]:
        raise SoftPromptError(f"init 'vocab' needs n_virtual_tokens <= vocabulary size {weight.shape[0]}")
    token_ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"] if config.init == "text" else []
    if config.init == "text" and not token_ids:
        raise SoftPromptError(f"init_text {config.init_text!r} has no tokens")
    generator = torch.Generator().manual_seed(config.seed)
    return INITIALISERS[config.init](weight, config.n_virtual_tokens, generator, token_ids)


def train_soft_prompt(model: torch.nn.Module, tokenizer, config: SoftPromptConfig, source: str, out_dir: Path, *,
                      model_name: str, compression: str = "dense", resume: bool = False,
                      teacher: torch.nn.Module | None = None,
                      on_eval: Callable[[dict[str, float]], None] | None = None) -> Path:
    """Learn a soft prompt for the frozen ``model`` on corpus ``source``; write the artifact to ``out_dir``.

    ``out_dir`` receives ``checkpoint.pt`` after every evaluation and, at the end, ``prompt.safetensors``
    + ``prompt.json`` holding the best prompt (see ``artifact``) with the training record (``training.train_learner``).
    ``resume`` continues from the checkpoint with identical settings; ``teacher``: the dense model, for objective
    ``kd``; ``on_eval(record)`` is called after each evaluation and checkpoint.
    Raises ``TrainingDiverged`` (after saving the best prompt so far) when the loss becomes NaN / inf, and
    ``TrainingError`` when it is not finite even before training (a broken model or compression).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    device = model.get_input_embeddings().weight.device
    position = resolve_position(config.prompt_position, tokenizer)
    target = describe_target(model, tokenizer, model_name) | {META_KEY: position}  # saved into prompt.json
    prompt = torch.nn.Parameter(initial_prompt(model, tokenizer, config).to(device, torch.float32))
    learner = Learner(model, {"prompt": prompt}, prompt, "soft prompt")

    def save(best: dict[str, torch.Tensor], record: dict) -> Path:
        return save_prompt(Path(out_dir), best["prompt"], target, compression, record)

    run = TrainingRun(config, config.lr, asdict(config), source, Path(out_dir), lead_ids(position, tokenizer), save,
                      "soft prompt", f"model {model_name!r} ({compression})")
    return train_learner(learner, tokenizer, run, resume=resume, teacher=teacher, on_eval=on_eval)


class SoftPromptKind(RecoveryKind):
    """A learned soft prompt (``soft_prompt=DIR``): embeddings placed before every request where it was trained."""

    name = "soft"
    label = "soft prompt"
    colour = "#2166ac"
    stored_value_bytes = 4  # prompt.safetensors holds the [n_virtual_tokens, hidden] prompt in float32
    model_arg = "soft_prompt"
    prefix = True
    learned = True
    metadata_file = METADATA
    summary_keys = ("source", "trained_at")

    def check_arg(self, value: str) -> None:
        if value == "":
            raise PromptArtifactError("soft_prompt is empty: expected a prompt folder written by 'cpt-bench prompt "
                                      "train'")

    def read(self, value: str) -> SoftPrompt:
        return read_prompt(Path(value))

    def apply(self, model: torch.nn.Module, tokenizer, value: str, artifact: SoftPrompt, model_name: str,
              allow_cross_model: bool) -> Applied:
        check_prompt_fits(artifact, model, tokenizer, allow_cross_model)
        info = {"kind": self.name, "path": str(value), "sha256": artifact.meta["sha256"],
                "trained_on": artifact.meta["compression"]}
        return Applied(model, artifact.embeddings, recorded_position(artifact.meta), info)

    def read_meta(self, folder: Path) -> dict:
        return read_prompt(folder).meta

    def train(self, model: torch.nn.Module, tokenizer, training: SoftPromptConfig, settings, source: str,
              folder: Path, *, model_name: str, compression: str, resume: bool,
              teacher: torch.nn.Module | None) -> Path:
        return train_soft_prompt(model, tokenizer, training, source, folder, model_name=model_name,
                                 compression=compression, resume=resume, teacher=teacher)

    def describe_settings(self, settings, training: SoftPromptConfig) -> str:
        return (f"{training.n_virtual_tokens} tokens, init {training.init}, AdamW lr {training.lr} weight decay "
                f"{training.weight_decay}, {training.warmup_steps} warmup then linear decay, {training.steps} steps "
                f"of batch {training.batch_size} x {training.seqlen} tokens, clip {training.max_grad_norm}, "
                f"validation every {training.eval_every} steps on {training.eval_windows} windows (best kept)")

    def trainable_parameters(self, meta: dict) -> int:
        return meta.get("trainable_parameters", meta["n_virtual_tokens"] * meta["hidden_size"])
