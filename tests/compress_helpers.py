"""Helpers for the compression tests: a tiny random Llama and a single-thread context."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama(seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A random 2-layer Llama: hidden 64, intermediate 128, 4 heads, vocabulary 128."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).to(dtype).eval()


def random_ids(n_windows: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    """``[n_windows, seqlen]`` random token ids."""
    return torch.randint(0, VOCAB, (n_windows, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Run torch on one thread for a whole test module (autouse where imported): tiny ops on an
    oversubscribed 2-core machine are far slower threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
