"""The one corpus-to-token-stream function gives exactly the ids of a direct tokenizer call, without special tokens."""

from __future__ import annotations

import pytest
import torch

from cpt_bench.assets.corpora import CORPORA, SPLITS, load_split
from cpt_bench.tokens import DOCUMENT_SEPARATOR, corpus_stream, token_stream

from .conftest import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("corpus", list(CORPORA))
def test_corpus_stream_equals_a_direct_tokenizer_call(filled_fake_cache, tokenizer, corpus):
    for split in SPLITS:
        text = "\n\n".join(doc["text"] for doc in load_split(corpus, split))
        expected = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        stream = corpus_stream(corpus, split, tokenizer, with_offsets=True)
        assert stream.text == text
        assert stream.ids.dtype == torch.int64 and stream.ids.tolist() == expected["input_ids"]
        assert stream.offsets == [tuple(span) for span in expected["offset_mapping"]]
        plain = corpus_stream(corpus, split, tokenizer)
        assert torch.equal(plain.ids, stream.ids) and plain.offsets is None and len(plain) == len(expected["input_ids"])


def test_stream_has_no_special_tokens_and_joins_with_the_separator(tokenizer):
    stream = token_stream(["river stone", "light garden"], tokenizer)
    assert DOCUMENT_SEPARATOR == "\n\n" and stream.text == "river stone\n\nlight garden"
    assert tokenizer.bos_token_id not in stream.ids.tolist()
    assert tokenizer.decode(stream.ids.tolist()) == stream.text
    assert token_stream(["river", "stone"], tokenizer, separator=" ").text == "river stone"
