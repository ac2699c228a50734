"""Text ("hard") prompts by name, and the ``hard`` recovery kind (``hard_prompt=NAME_OR_TEXT``).

``hard_prompt_text(x)`` returns the registered text when ``x`` is a name in ``HARD_PROMPTS`` and
otherwise treats ``x`` itself as the prompt text: any string that is not a registered name is literal
text, so a typo in a name silently becomes a (short) text prompt; check ``HARD_PROMPTS`` for names.
"""

from __future__ import annotations

import torch

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


class HardPromptError(UserError):
    """A hard prompt that cannot be used (one-line message)."""


def hard_prompt_text(name_or_text: str) -> str:
    """The text of registered prompt ``name_or_text``, or ``name_or_text`` itself when it is not a name."""
    text = HARD_PROMPTS.get(name_or_text, name_or_text)
    if not text:
        raise HardPromptError("hard prompt is empty: give a name from "
                              f"{sorted(HARD_PROMPTS)} or the prompt text itself")
    return text


class HardPromptKind(RecoveryKind):
    """A text prompt, embedded by the model's own embedding layer and placed before every request."""

    name = "hard"
    label = "hard prompt"
    colour = "#e08214"
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
