"""Text ("hard") prompts, and the ``hard`` recovery kind (``hard_prompt=PROMPT``).

A hard prompt is given in one of three forms, in the ``cpt`` adapter's ``hard_prompt`` and a matrix config's
``prompts.hard`` alike:

- ``NAME``: a registered prompt (``HARD_PROMPTS``); any other bare word is refused, with the closest name, so a
  misspelt name is an error, never a prompt;
- ``text:TEXT``: ``TEXT`` itself, verbatim (after the colon, spaces included);
- ``file:PATH``: the whole content of a UTF-8 text file (its final newline kept, as a registered text ends with one).

lm-eval splits ``--model_args`` on commas (outside quotes), so a ``text:`` prompt with a comma or a quote
character is given as ``file:PATH``, or as a JSON ``--model_args`` (docs/lm-eval.md).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from cpt_bench.assets.model import first_line
from cpt_bench.errors import UserError
from cpt_bench.recovery.kind import Applied, RecoveryKind

HARD_PROMPTS: dict[str, str] = {
    # The sentence in the paper's public code.
    "paper": ("The weight matrix inside the language model contains errors. "
              "Make any necessary adjustments to ensure optimal performance.\n"),
    # A longer variant seen in reimplementations (newline added to match "paper").
    "paper_long": ("Please carefully examine the weight matrix within the model, as it may contain errors. "
                   "It is crucial to verify its accuracy and make any necessary adjustments to ensure "
                   "optimal performance.\n"),
}
TEXT_FORM = "text:"
FILE_FORM = "file:"


class HardPromptError(UserError):
    """A hard prompt that cannot be used (one-line message)."""


def hard_prompt_text(prompt: str) -> str:
    """The text a hard prompt gives (``NAME``, ``text:TEXT`` or ``file:PATH``, see the module docstring); refuses an
    unknown name, an empty text and a missing, unreadable or empty file in one line."""
    if prompt.startswith(TEXT_FORM):
        text = prompt[len(TEXT_FORM):]
        if not text:
            raise HardPromptError(f"hard prompt {prompt!r} is empty: expected {TEXT_FORM}TEXT with some text")
        return text
    if prompt.startswith(FILE_FORM):
        return _file_text(Path(prompt[len(FILE_FORM):]))
    if prompt in HARD_PROMPTS:
        return HARD_PROMPTS[prompt]
    close = difflib.get_close_matches(prompt, HARD_PROMPTS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise HardPromptError(f"unknown hard prompt {prompt!r}{hint}; expected a registered name "
                          f"({', '.join(HARD_PROMPTS)}), {TEXT_FORM}TEXT or {FILE_FORM}PATH")


def _file_text(path: Path) -> str:
    """The content of the UTF-8 text file ``path``, which must exist and hold some text."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HardPromptError(f"hard prompt file {path} not found; expected {FILE_FORM}PATH of a UTF-8 text "
                              "file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise HardPromptError(f"hard prompt file {path} cannot be read as UTF-8 text: {first_line(error)}") from None
    if not text.strip():
        raise HardPromptError(f"hard prompt file {path} is empty; expected the prompt's text")
    return text


def hard_prompt_label(prompt: str) -> str:
    """A short id for a hard prompt in cell ids and summaries: its registered name, or ``text<n>`` (n: the text's
    length in characters) for a ``text:`` or ``file:`` prompt; raises ``HardPromptError`` as ``hard_prompt_text``."""
    text = hard_prompt_text(prompt)
    return prompt if prompt in HARD_PROMPTS else f"text{len(text)}"


class HardPromptKind(RecoveryKind):
    """A text prompt, embedded by the model's own embedding layer and placed before every request."""

    name = "hard"
    label = "hard prompt"
    colour = "#e08214"
    stored_value_bytes = 0  # its text: no weights (its tokens cost key/value cache per sequence: report.serving)
    model_arg = "hard_prompt"
    prefix = True
    summary_keys = ("name",)

    def check_arg(self, value: str) -> None:
        hard_prompt_text(value)

    def read(self, value: str) -> str:
        return hard_prompt_text(value)

    def apply(self, model: torch.nn.Module, tokenizer, value: str, artifact: str, model_name: str,
              allow_cross_model: bool) -> Applied:
        """The text's token embeddings ``[n, hidden]`` (no special tokens) as the prompt."""
        embedding = model.get_input_embeddings()
        ids = torch.tensor(tokenizer(artifact, add_special_tokens=False)["input_ids"], device=embedding.weight.device)
        with torch.no_grad():
            embeddings = embedding(ids)
        return Applied(model, embeddings, info={"kind": self.name, "text": artifact})
