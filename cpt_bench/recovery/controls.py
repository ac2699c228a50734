"""Control prompts: untrained soft prompts that tell learned recovery apart from "any extra context".

- ``init``: the starting point of soft-prompt training, ``soft.initial_prompt`` under the same settings (length,
  initialisation, seed): what a learned prompt would be had it learned nothing.
- ``random``: ``n_virtual_tokens`` random directions (seeded Gaussian rows, normalised) scaled to the mean L2 norm
  of the embedding table's rows: vectors of a token's size that mean nothing.
- ``trivial`` (``TRIVIAL``): one token, the embedding layer's output for the model's EOS token (BOS where it has no
  EOS), placed where prompts sit: a neutral one-token prefix. A model can score its window's first positions better
  with any token before them, so part of any prompt's gain may be that alone; the matrix evaluates this control at
  every level on every target (``prompts.trivial_prefix``) and compares every prompt against it.

Each is written as an ordinary prompt folder (``artifact.save_prompt``), so the ``cpt`` lm-eval adapter applies it
as ``soft_prompt=DIR`` exactly like a trained one; ``prompt.json`` records ``kind`` (``init`` / ``random``), the
settings and seed, and no training (``train_seconds`` 0, no curve).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from cpt_bench.errors import UserError
from cpt_bench.recovery.artifact import save_prompt
from cpt_bench.recovery.position import META_KEY, resolve_position
from cpt_bench.recovery.soft import initial_prompt, token_embeddings
from cpt_bench.recovery.target import describe_target
from cpt_bench.recovery.training import SoftPromptConfig

CONTROL_KINDS = ("init", "random")  # the controls of learned soft prompts (``prompts.soft.controls``)
TRIVIAL = "trivial"  # the trivial-prefix control: one per run, of no level (``prompts.trivial_prefix``)
CONTROL_PROMPT_KIND = "soft"  # the recovery kind of a control: an untrained soft prompt
# Which control kinds depend on ``SoftPromptConfig.seed`` given the initialisation: ``init`` only through a seeded
# initialiser, ``random`` always.
SEEDED_INITIALISERS = ("sample", "random")


def control_depends_on_seed(kind: str, config: SoftPromptConfig) -> bool:
    """Whether control ``kind`` changes with the training seed (``init`` with vocab / text rows does not)."""
    return kind == "random" or config.init in SEEDED_INITIALISERS


def random_prompt(model: torch.nn.Module, config: SoftPromptConfig) -> torch.Tensor:
    """``[n_virtual_tokens, hidden]`` float32 CPU: seeded random directions with the embedding rows' mean norm."""
    weight = token_embeddings(model)  # the embedding layer's outputs (Gemma scales them), as prompts are
    generator = torch.Generator().manual_seed(config.seed)
    directions = torch.randn(config.n_virtual_tokens, weight.shape[1], generator=generator)
    return directions / directions.norm(dim=1, keepdim=True) * weight.norm(dim=1).mean()


class ControlPromptError(UserError):
    """A control prompt that cannot be made for the model (one-line message)."""


def trivial_prompt(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """``[1, hidden]`` float32 CPU: the embedding layer's output for the EOS token (else BOS), as a hard prompt of
    that one token would be embedded (Gemma's layer scales its rows)."""
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if token is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ControlPromptError(f"the {TRIVIAL} control needs an EOS or BOS token, tokenizer {name!r} has neither; "
                                 "set prompts.trivial_prefix: false")
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        return embedding(torch.tensor([token], device=embedding.weight.device)).to("cpu", torch.float32)


def control_prompt(model: torch.nn.Module, tokenizer, config: SoftPromptConfig, kind: str) -> torch.Tensor:
    """The ``kind`` control's embeddings ``[n_virtual_tokens, hidden]`` (``[1, hidden]`` for ``trivial``) float32 on
    CPU."""
    if kind == TRIVIAL:
        return trivial_prompt(model, tokenizer)
    if kind == "init":
        return initial_prompt(model, tokenizer, config)
    if kind == "random":
        return random_prompt(model, config)
    raise ValueError(f"unknown control kind {kind!r}; expected one of {', '.join((*CONTROL_KINDS, TRIVIAL))}")


def write_control_prompt(model: torch.nn.Module, tokenizer, config: SoftPromptConfig, kind: str, out_dir: Path, *,
                         model_name: str, compression: str = "dense") -> Path:
    """Write the ``kind`` control of a soft prompt trained with ``config`` on ``model`` as a prompt folder (its
    position: ``config.prompt_position``, else the tokenizer's default, as every prompt's)."""
    embeddings = control_prompt(model, tokenizer, config, kind)
    if kind == TRIVIAL:
        config = replace(config, n_virtual_tokens=1)
    record = {"kind": kind, "source": {"corpus": None}, "hyperparameters": asdict(config), "curve": [],
              "train_seconds": 0.0}
    if kind == "random":
        record["row_norm"] = float(embeddings.norm(dim=1).mean())
    target = describe_target(model, tokenizer, model_name) | {META_KEY: resolve_position(config.prompt_position,
                                                                                         tokenizer)}
    return save_prompt(Path(out_dir), embeddings, target, compression, record)
