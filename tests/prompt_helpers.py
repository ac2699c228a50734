"""Shared by the prompt tests: a saved soft prompt for the tiny model, requests, and hand computations."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from lm_eval.api.instance import Instance

from cpt_bench.recovery.artifact import save_prompt
from cpt_bench.recovery.target import describe_target, hidden_size

from . import fakes

N_PROMPT_TOKENS = 5


def save_random_prompt(folder: Path, model, tokenizer, n_tokens: int = N_PROMPT_TOKENS, seed: int = 0) -> Path:
    """A prompt folder with random embeddings (scaled like the model's embedding rows) for ``model``."""
    generator = torch.Generator().manual_seed(seed)
    scale = model.get_input_embeddings().weight.std().item()
    embeddings = torch.randn(n_tokens, hidden_size(model), generator=generator) * scale * 3
    training = {"source": {"corpus": "none"}, "hyperparameters": {"seed": seed}, "curve": [], "train_seconds": 0.0}
    return save_prompt(folder, embeddings, describe_target(model, tokenizer, str(model.name_or_path)), "dense",
                       training)


def mc_pairs(n: int = 10) -> list[tuple[str, str]]:
    """(context, continuation) pairs of varied lengths, like multiple-choice requests."""
    rng = random.Random(7)
    return [(f"Question: {fakes.sentence(rng, rng.randint(1, 5))}\nAnswer:",
             " " + fakes.sentence(rng, rng.randint(1, 3))) for _ in range(n)]


def rolling_texts(n_words: int, n: int = 3) -> list[str]:
    """``n`` texts of ``n_words`` words (the tiny tokenizer spends one to a few tokens per word)."""
    rng = random.Random(8)
    return [fakes.sentence(rng, n_words) for _ in range(n)]


def instances(request_type: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=request_type, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def prompted_logprobs(model, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | prompt, ids[:i]) for i >= 1, by hand: prompt embeddings [n, hidden] prepended."""
    tokens = torch.tensor(ids)
    embeds = torch.cat([prompt, model.get_input_embeddings()(tokens)])[None]
    with torch.no_grad():
        logits = model(inputs_embeds=embeds).logits[0, prompt.shape[0]:].log_softmax(-1)
    return logits[:-1].gather(1, tokens[1:, None])[:, 0]


def hand_loglikelihood(model, prompt: torch.Tensor, context: list[int], continuation: list[int]) -> float:
    """Sum of log-probabilities of the continuation tokens after prompt + context."""
    return prompted_logprobs(model, prompt, context + continuation)[-len(continuation):].sum().item()


def hand_rolling(model, prompt: torch.Tensor, prefix_token: int, tokens: list[int]) -> float:
    """Sum of log-probabilities of every token, conditioned on prompt + prefix token (one window)."""
    return prompted_logprobs(model, prompt, [prefix_token] + tokens).sum().item()
