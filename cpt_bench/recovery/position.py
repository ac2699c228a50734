"""Where a prompt sits in the sequence (``prompt_position``), in training and in evaluation.

- ``after_bos``: right after the tokenizer's BOS token: ``BOS, prompt, text``. The official Compress-Then-Prompt
  code places it so (LLaMA's tokenizer adds BOS to every text).
- ``first``: before every token, BOS included: ``prompt, [BOS,] text``. PEFT's PromptTuning places it so.

The default (``resolve_position(None, tokenizer)``) is ``after_bos`` when the tokenizer adds a BOS token to the
texts it encodes, else ``first``; the two agree for a tokenizer that adds none, except that ``after_bos`` puts
a BOS token before the prompt even then. Under ``after_bos`` the training and validation windows of
``recovery.soft`` start with BOS, so training, validation and lm-eval (``lmeval.adapter``, whose requests begin with
BOS when the tokenizer adds one) score the same kind of sequence. ``prompt.json`` records the position; prompts
written before it was recorded were trained ``first`` and load as such (``recorded_position``).
"""

from __future__ import annotations

from typing import Any

from cpt_bench.errors import UserError

AFTER_BOS = "after_bos"
FIRST = "first"
POSITIONS = (AFTER_BOS, FIRST)
META_KEY = "prompt_position"  # its field in prompt.json
_PROBE_TEXT = "a"  # encoded to see whether the tokenizer adds BOS


class PromptPositionError(UserError):
    """A prompt position that is unknown or impossible for the tokenizer (one-line message)."""


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` starts the texts it encodes (with its default special tokens) with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer(_PROBE_TEXT)["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def check_position(value: str, what: str = "prompt_position") -> str:
    """``value`` when it names a position; otherwise a one-line ``PromptPositionError`` naming the choices."""
    if value not in POSITIONS:
        raise PromptPositionError(f"{what} must be one of {', '.join(POSITIONS)}, got {value!r}")
    return value


def resolve_position(value: str | None, tokenizer, what: str = "prompt_position") -> str:
    """The position to use: ``value``, or the tokenizer's default when None (see the module docstring).

    ``after_bos`` needs a tokenizer with a BOS token; one without is refused in one line.
    """
    position = check_position(value, what) if value is not None else AFTER_BOS if adds_bos(tokenizer) else FIRST
    if position == AFTER_BOS and getattr(tokenizer, "bos_token_id", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise PromptPositionError(f"{what} {AFTER_BOS} needs a BOS token, but tokenizer {name!r} has none; use "
                                  f"{FIRST}")
    return position


def lead_ids(position: str, tokenizer) -> list[int]:
    """The token ids that go before the prompt: ``[BOS]`` for ``after_bos``, none for ``first``."""
    return [tokenizer.bos_token_id] if position == AFTER_BOS else []


def recorded_position(meta: dict[str, Any]) -> str:
    """The position a prompt (its ``prompt.json``) was trained with; ``first`` for prompts that predate the field."""
    return check_position(meta.get(META_KEY, FIRST), f"{META_KEY} in prompt.json")
