"""What every recovery method offers the rest of the package: ``RecoveryKind``, and the registry of kinds.

A recovery method (a "prompt kind" in plans, cells and summaries: ``none``, ``hard``, ``soft``, ``lora``) is one
module of this package holding a ``RecoveryKind`` subclass; ``cpt_bench.recovery`` registers one instance of each
(``RECOVERY_KINDS``, in the order reports list them). What each part of the package asks of a kind:

- the matrix (``matrix.plan`` / ``run`` / ``store``): whether it is ``learned`` (built per source corpus, level,
  seed and objective by ``train``, into a folder whose ``metadata_file`` marks it complete, read back with
  checksums by ``read_meta``) and its ``trainable_parameters``; its settings are ``prompts.<name>`` of a config;
- the ``cpt`` lm-eval adapter (``lmeval.adapter``): the ``model_arg`` that names it, ``check_arg`` and ``read``
  (before any weight loads) and ``apply`` (on the loaded model): an ``Applied``, i.e. the model to evaluate, the
  prompt embeddings to place before each request (``prefix`` kinds) and the tensors it adds (memory account);
- the summary, reports and leaderboard (``matrix.store``, ``report``): ``summary_keys`` (what its entries in
  ``summary.json`` carry), ``label``, ``colour`` and ``added_bytes`` (the weights it stores on top of the model's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass
class Applied:
    """A recovery method applied to a loaded model, for the ``cpt`` adapter.

    ``model``: the model to evaluate (wrapped by an adapter, or the one given); ``prompt``: ``[n, hidden]`` embeddings
    placed before every request (None: none); ``position``: where the artifact was trained to sit (None: the
    caller's choice or the tokenizer's default, ``recovery.position``); ``info``: what was applied, for the
    results' ``prompt`` block (``kind``, ``path``, ``sha256``, ...); ``tensors``: what it adds to the model's own
    weights (its resident bytes); ``choices``: prompts to choose among per document, each applied, by label (IDP,
    ``recovery.idp``; ``prompt`` is then None)."""

    model: torch.nn.Module
    prompt: torch.Tensor | None = None
    position: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)
    choices: dict[str, Applied] = field(default_factory=dict)


class RecoveryKind:
    """One recovery method. Subclasses set the class attributes and override what applies to them (a method that
    is not learned needs neither ``train`` nor ``read_meta``; one the adapter cannot apply has no ``model_arg``).
    Calling a method that does not apply to the kind is a bug of the caller: ``TypeError``."""

    name: ClassVar[str]  # its kind in plans, cell ids, summaries and config keys (prompts.<name>)
    label: ClassVar[str]  # in messages and legends ("soft prompt")
    colour: ClassVar[str]  # of its markers in the leaderboard's plots
    model_arg: ClassVar[str | None] = None  # the cpt adapter's model_arg naming it
    prefix: ClassVar[bool] = False  # applied as embeddings placed before each request (prompt_position applies)
    learned: ClassVar[bool] = False  # trained per (source, level, seed, objective); transfers across targets
    metadata_file: ClassVar[str | None] = None  # a built artifact's metadata, written last: it marks it complete
    summary_keys: ClassVar[tuple[str, ...]] = ()  # the keys its entries in summary.json require
    combines_with_prompts: ClassVar[bool] = False  # a weight correction the adapter may apply under one prompt
    # Bytes per value its artifact stores (float32: 4); 0: it stores no tensor; None: not known from its summary entry.
    stored_value_bytes: ClassVar[int | None] = None

    def check_arg(self, value: str) -> None:
        """Refuse a ``model_arg`` value that cannot name an artifact (empty, an unknown name) in one line."""

    def read(self, value: str) -> Any:
        """The artifact ``value`` names, read and checked on its own (files, checksums), before any weight loads."""
        return value

    def apply(self, model: torch.nn.Module, tokenizer, value: str, artifact: Any, model_name: str,
              allow_cross_model: bool) -> Applied:
        """Apply the read ``artifact`` to the loaded ``model``, after checking that it fits it (one-line errors)."""
        raise TypeError(f"recovery kind {self.name} cannot be applied by the cpt adapter")

    def read_meta(self, folder: Path) -> dict[str, Any]:
        """A built artifact's metadata (its ``metadata_file``) after verifying its tensors' checksums."""
        raise TypeError(f"recovery kind {self.name} builds no artifact")

    def train(self, model: torch.nn.Module, tokenizer, training, settings, source: str, folder: Path, *,
              model_name: str, compression: str, resume: bool, teacher: torch.nn.Module | None) -> Path:
        """Train an artifact on the frozen ``model`` with the shared ``training`` settings
        (``training.SoftPromptConfig``) and the kind's own ``settings`` (``prompts.<name>``) on corpus ``source``;
        write it to ``folder`` (resuming its checkpoint when ``resume``); ``teacher``: the dense model for ``kd``."""
        raise TypeError(f"recovery kind {self.name} is not learned")

    def describe_settings(self, settings, training) -> str:
        """One line of a plan's description: how its artifacts are trained (``settings``: ``prompts.<name>``,
        ``training``: the shared ``SoftPromptConfig``)."""
        raise TypeError(f"recovery kind {self.name} is not learned")

    def added_bytes(self, prompt: dict[str, Any]) -> int | None:
        """Bytes the method stores on top of the (compressed) model's weights, from its entry ``prompt`` of a
        ``summary.json``: the entry's ``stored_bytes`` when it records them, else 0 for a kind that stores no tensor,
        else its artifact's values (``trainable_parameters``) x ``stored_value_bytes``; None when the entry does not
        tell (an untrained control, an entry from before the record)."""
        if prompt.get("stored_bytes") is not None:
            return int(prompt["stored_bytes"])
        if self.stored_value_bytes is None:
            return None
        if self.stored_value_bytes == 0:
            return 0
        values = prompt.get("trainable_parameters")
        return int(values) * self.stored_value_bytes if values else None

    def trainable_parameters(self, meta: dict[str, Any]) -> int | None:
        """How many parameters training the artifact of ``meta`` optimised (its stored parameters)."""
        return meta.get("trainable_parameters")


def registry(*kinds: RecoveryKind) -> dict[str, RecoveryKind]:
    """Kinds by name, in the order given; a name or model_arg given twice is a bug (ValueError)."""
    by_name = {kind.name: kind for kind in kinds}
    model_args = [kind.model_arg for kind in kinds if kind.model_arg]
    if len(by_name) != len(kinds) or len(set(model_args)) != len(model_args):
        raise ValueError(f"recovery kinds with the same name or model_arg: {[kind.name for kind in kinds]}")
    return by_name


class NoRecovery(RecoveryKind):
    """The model as it is: the reference every method is compared with."""

    name = "none"
    label = "no prompt"
    colour = "#666666"
    stored_value_bytes = 0
