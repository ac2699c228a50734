"""Running text as one token stream: the single place where documents are joined and tokenized.

Every reader of a corpus split goes through ``corpus_stream``: calibration (``compress.calibration``), the training
of soft prompts and LoRA adapters (``recovery.training``), the perplexity tasks (``perplexity.corpus_windows``), the
matrix's corpus-length checks (``matrix.validate``), ``cpt-bench corpus`` and the benchmarks. A split is read the
way the GPTQ reference code reads WikiText-2: its documents joined with the corpus's separator (``"\\n\\n"`` unless
the corpus spec says otherwise, ``cpt_bench.corpus``) into one string, tokenized once. The stream holds no special
tokens (no BOS / EOS between or around documents): whoever cuts windows out of it decides what, if anything,
precedes a window.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cpt_bench.corpus import DOCUMENT_SEPARATOR, CorpusSpec, load_split, parse_corpus


@dataclass(frozen=True)
class TokenStream:
    """Token ids of a joined text, the text itself and, when asked for, each token's character span.

    ``ids``: ``[N]`` int64. ``offsets``: ``N`` ``(start, end)`` character offsets into ``text`` (None unless
    requested; they need a fast tokenizer).
    """

    ids: torch.Tensor
    text: str
    offsets: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return self.ids.numel()


def token_stream(documents: Iterable[str], tokenizer, separator: str = DOCUMENT_SEPARATOR,
                 with_offsets: bool = False) -> TokenStream:
    """Join ``documents`` with ``separator`` and tokenize the result once, without special tokens."""
    text = separator.join(documents)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=with_offsets)
    offsets = [tuple(span) for span in encoded["offset_mapping"]] if with_offsets else None
    return TokenStream(torch.tensor(encoded["input_ids"], dtype=torch.int64), text, offsets)


def corpus_stream(corpus: str | CorpusSpec, split: str, tokenizer, with_offsets: bool = False) -> TokenStream:
    """The token stream of one split of a corpus (a spec, ``cpt_bench.corpus``), joined by its separator."""
    spec = parse_corpus(corpus)
    return token_stream((doc["text"] for doc in load_split(spec, split)), tokenizer, spec.separator, with_offsets)
