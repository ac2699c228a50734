"""A soft prompt's starting values (``SoftPromptConfig.init``), by name: ``INITIALISERS``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _init_vocab(weight: torch.Tensor, n: int, generator: torch.Generator, token_ids: list[int]) -> torch.Tensor:
    """The embeddings of the first ``n`` token ids (the paper's code: the first rows of the embedding matrix)."""
    return weight[:n].clone()


def _init_sample(weight: torch.Tensor, n: int, generator: torch.Generator, token_ids: list[int]) -> torch.Tensor:
    """The embeddings of ``n`` token ids drawn uniformly at random (with replacement, seeded)."""
    return weight[torch.randint(0, weight.shape[0], (n,), generator=generator)].clone()


def _init_text(weight: torch.Tensor, n: int, generator: torch.Generator, token_ids: list[int]) -> torch.Tensor:
    """Embeddings of the text's tokens, repeated or cut to ``n`` rows."""
    repeats = math.ceil(n / len(token_ids))
    return weight[torch.tensor((token_ids * repeats)[:n])].clone()


def _init_random(weight: torch.Tensor, n: int, generator: torch.Generator, token_ids: list[int]) -> torch.Tensor:
    """Gaussian rows with the token embeddings' standard deviation (seeded)."""
    return torch.randn(n, weight.shape[1], generator=generator) * weight.std()


# Each: (the embedding of every token id [vocab, hidden] float32 CPU, n, seeded generator, init_text token ids)
# -> [n, hidden]. Embeddings are the embedding layer's outputs, the space prompts live in: Gemma's layer scales
# its weight rows by sqrt(hidden_size), so raw rows would be off by that factor.
INITIALISERS: dict[str, Callable[[torch.Tensor, int, torch.Generator, list[int]], torch.Tensor]] = {
    "vocab": _init_vocab, "sample": _init_sample, "text": _init_text, "random": _init_random}
