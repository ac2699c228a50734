"""Input-dependent prompting (IDP; Hoang et al., arXiv 2310.00867): a set of prompts, one chosen per document.

``idp=P1;P2;...`` (the ``cpt`` adapter's model_arg; ``;`` because lm-eval splits ``--model_args`` at commas) names
two or more prompts, each a hard prompt (``NAME``, ``text:TEXT``, ``file:PATH``: ``recovery.hard``) or a soft-prompt
folder (``recovery.artifact``). A value that is both a registered name and an existing folder is refused (write
``./NAME`` for the folder). Each prompt keeps its own kind's checks and placement.

The adapter chooses one prompt per *document* from the document's context only, never from a continuation,
an answer choice or a generated answer (``document_key``, ``common_prefix``): the requests of one document share the
choice, made on the longest common token prefix of their contexts (the context itself where they share one, as in
most multiple-choice tasks; the text before the blank for Winogrande-style tasks, whose contexts differ by the
option filled in). An empty common prefix is replaced by the model's prefix token. Two rules (``idp_rule``):

- ``attention`` (default; the paper's rule as its reviewers restate it, no public code was found): with each
  prompt placed before the context in one forward pass (eager attention), the attention mass the context's tokens
  give the prompt's tokens (summed over the prompt's tokens: not divided by its length; BOS excluded when the prompt
  sits after it), averaged over every layer, head and context token. The highest mass wins. Summing over the
  prompt's tokens makes a longer prompt collect more mass; the paper's prompts share one length, for which summing
  and averaging per token choose alike.
- ``loss``: the mean next-token loss of the context's tokens after each prompt (the first one predicted from the
  prompt's end); the lowest wins. Transparent, and the context's own perplexity under the prompt.

Ties go to the prompt given first. A context longer than the window keeps its last tokens (the window minus the
prompt's prefix). Rolling loglikelihoods (perplexity) have no per-document context to choose from: refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpt_bench.errors import UserError
from cpt_bench.recovery.hard import FILE_FORM, HARD_PROMPTS, TEXT_FORM, HardPromptKind, hard_prompt_label
from cpt_bench.recovery.kind import Applied, RecoveryKind
from cpt_bench.recovery.soft import SoftPromptKind

SEPARATOR = ";"
RULES = ("attention", "loss")
DEFAULT_RULE = "attention"
_HARD, _SOFT = HardPromptKind(), SoftPromptKind()


class IdpError(UserError):
    """An IDP prompt set or rule that cannot be used (one-line message)."""


@dataclass(frozen=True)
class Member:
    """One prompt of the set: its ``label`` (in counts and results), its kind (hard or soft), the value naming it
    and the artifact the kind read (a text, or a ``SoftPrompt``)."""

    label: str
    kind: RecoveryKind
    value: str
    artifact: Any


def check_rule(rule: str) -> str:
    """``rule`` if it is one of ``RULES``; else a one-line error."""
    if rule not in RULES:
        raise IdpError(f"idp_rule must be one of {', '.join(RULES)}, got {rule!r}")
    return rule


def member_kind(value: str) -> RecoveryKind:
    """The kind a member names: hard for ``text:`` / ``file:`` and registered names, soft for a folder; a path-like
    value that is no folder, and a registered name that is also a folder, are refused in one line."""
    if value.startswith((TEXT_FORM, FILE_FORM)):
        return _HARD
    is_folder = Path(value).is_dir()
    if value in HARD_PROMPTS:
        if is_folder:
            raise IdpError(f"idp prompt {value!r} is both a registered hard prompt and a folder; write ./{value} for "
                           "the folder")
        return _HARD
    if is_folder:
        return _SOFT
    if "/" in value or value.startswith("."):
        raise IdpError(f"idp prompt {value!r}: no such soft-prompt folder; expected a folder written by 'cpt-bench "
                       f"prompt train', a registered hard prompt ({', '.join(HARD_PROMPTS)}), {TEXT_FORM}TEXT or "
                       f"{FILE_FORM}PATH")
    return _HARD  # an unknown name: the hard kind refuses it, with the closest registered name


def split_values(value: str) -> list[str]:
    """The members of ``idp=P1;P2;...``: at least two, none empty, none twice."""
    values = value.split(SEPARATOR)
    if any(v == "" for v in values):
        raise IdpError(f"idp={value!r} has an empty prompt; expected P1{SEPARATOR}P2{SEPARATOR}... with each P a "
                       f"hard prompt (NAME, {TEXT_FORM}TEXT, {FILE_FORM}PATH) or a soft-prompt folder")
    if len(values) < 2:
        raise IdpError(f"idp={value!r} names one prompt; IDP chooses among two or more (P1{SEPARATOR}P2...): give "
                       "one prompt as hard_prompt or soft_prompt")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise IdpError(f"idp={value!r} names {repeated[0]!r} twice; expected distinct prompts")
    return values


def member_labels(values: Sequence[str]) -> list[str]:
    """A short label per member: a hard prompt's (``hard_prompt_label``: its name or ``text<n>``), a folder's name;
    a label met again gets ``-2``, ``-3``... (two texts of one length)."""
    labels: list[str] = []
    for value in values:
        base = hard_prompt_label(value) if member_kind(value) is _HARD else Path(value).resolve().name
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels


class IdpKind(RecoveryKind):
    """A set of hard or soft prompts, one chosen per document (``idp=P1;P2;...``, rule ``idp_rule``)."""

    name = "idp"
    label = "IDP prompts"
    colour = "#1b7837"
    model_arg = "idp"
    prefix = True

    def check_arg(self, value: str) -> None:
        for member in split_values(value):
            member_kind(member).check_arg(member)

    def read(self, value: str) -> list[Member]:
        values = split_values(value)
        return [Member(label, member_kind(v), v, member_kind(v).read(v))
                for label, v in zip(member_labels(values), values, strict=True)]

    def apply(self, model: torch.nn.Module, tokenizer, value: str, artifact: list[Member], model_name: str,
              allow_cross_model: bool) -> Applied:
        """Each member applied by its own kind (``Applied.choices``, by label); no single prompt."""
        choices = {m.label: m.kind.apply(model, tokenizer, m.value, m.artifact, model_name, allow_cross_model)
                   for m in artifact}
        return Applied(model, info={"kind": self.name}, choices=choices)


# --- the choice ------------------------------------------------------------------------------------------------------

def document_key(request) -> tuple:
    """What identifies a request's document: lm-eval's (task name, doc id), or its context string when it has no
    doc id (requests built by hand)."""
    if getattr(request, "doc_id", None) is not None:
        return (request.task_name, request.doc_id)
    return ("", request.args[0])


def common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix every one of ``sequences`` starts with."""
    first = list(sequences[0])
    n = len(first)
    for other in sequences[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], other, strict=False)) if a != b), min(n, len(other)))
    return first[:n]


@contextmanager
def eager_attention(model: torch.nn.Module):
    """The model with eager attention (which returns attention weights; SDPA does not), restored on exit."""
    before = model.config._attn_implementation
    if before == "eager":
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def prompt_score(model: torch.nn.Module, prefix: torch.Tensor, n_prompt: int, context: torch.Tensor, rule: str,
                 autocast: Callable[[], AbstractContextManager]) -> float:
    """How well a prompt suits a context, higher is better, by ``rule`` (module docstring).

    ``prefix``: ``[P, hidden]`` embeddings placed before the context (its last ``n_prompt`` rows are the prompt; a
    BOS embedding may precede them); ``context``: ``[T]`` token ids (T >= 1) on the model's device. ``attention``:
    the mean over layers, heads and context tokens of the attention weight summed over the prompt's columns (needs
    eager attention: ``eager_attention``); ``loss``: minus the mean next-token loss (nats) of the context's tokens.
    """
    n_prefix = prefix.shape[0]
    embeds = torch.cat([prefix, model.get_input_embeddings()(context).to(prefix.dtype)])[None]
    with torch.no_grad(), autocast():
        out = model(inputs_embeds=embeds, output_attentions=rule == "attention")
    if rule == "attention":
        start = n_prefix - n_prompt
        mass = torch.stack([layer[0, :, n_prefix:, start:n_prefix].float().sum(-1) for layer in out.attentions])
        return float(mass.mean())  # [layers, heads, T] -> one number
    logits = out.logits[0, n_prefix - 1: n_prefix - 1 + context.shape[0]].float()
    return -float(torch.nn.functional.cross_entropy(logits, context))


def choose(scores: Sequence[float]) -> int:
    """The index of the highest score; ties go to the first."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
