"""The paper's perplexity protocol expressed as lm-eval documents.

GPTQ-style papers report *token-level* perplexity over non-overlapping windows of ``seqlen`` tokens
of a test set joined into one string. lm-eval's rolling metrics (word/byte perplexity, bits per
byte) are normalised by words or bytes instead. We make each lm-eval document exactly one window of
``seqlen`` tokens of the model's tokenizer and record its token count, so one set of rolling
loglikelihoods yields both families of metrics.

Differences from the paper's loop, both small and documented in README: lm-eval conditions the
first token of each window on the tokenizer's prefix token (so all ``seqlen`` tokens are scored
rather than ``seqlen - 1``), and the final partial window is dropped as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lm_eval.api.task import ConfigurableTask

from cpt_bench.assets.model import shared_tokenizer
from cpt_bench.corpus import load_split
from cpt_bench.errors import UserError
from cpt_bench.stats import log_perplexity
from cpt_bench.tokens import TokenStream, corpus_stream

DEFAULT_SEQLEN_TOKENS = 1024

class TaskInputError(UserError):
    """A task was configured with values it cannot use (one-line message)."""


def token_windows(stream: TokenStream, tokenizer, seqlen_tokens: int,
                  add_special_tokens: bool | None = None) -> list[dict]:
    """Cut a token stream into consecutive windows of ``seqlen_tokens`` tokens; the last partial window is dropped.

    ``stream`` must carry offsets (``token_stream(..., with_offsets=True)``). Returns
    ``[{"window": i, "text": str, "n_tokens": int}]``. Each window's text is the exact character span of
    its tokens, so the windows concatenate back to a prefix of ``stream.text``.
    ``n_tokens`` is recounted by encoding the window text the way lm-eval's HFLM will (with the
    tokenizer's default special tokens unless ``add_special_tokens`` is given), since a merge across
    a window boundary can shift a count by one.
    """
    if seqlen_tokens <= 0:
        raise TaskInputError(f"seqlen must be a positive number of tokens, got {seqlen_tokens}")
    offsets = stream.offsets
    n_windows = len(offsets) // seqlen_tokens
    if n_windows == 0:
        raise TaskInputError(f"text of {len(offsets)} tokens is shorter than one window of {seqlen_tokens}")
    starts = [offsets[i * seqlen_tokens][0] for i in range(n_windows)]
    ends = starts[1:] + [offsets[n_windows * seqlen_tokens - 1][1]]
    encode_kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    windows = []
    for index, (start, end) in enumerate(zip(starts, ends, strict=True)):
        span = stream.text[start:end]
        windows.append({"window": index, "text": span, "n_tokens": len(tokenizer.encode(span, **encode_kwargs))})
    return windows


@dataclass(frozen=True)
class CorpusWindows:
    """The perplexity windows of one split of a corpus (``token_windows``) and what they cover.

    ``documents``: documents in the split; ``tokens``: tokens of the split's joined text; ``seqlen_tokens``: the
    window length; ``windows``: ``[{"window", "text", "n_tokens"}]``.
    """

    corpus: str
    split: str
    documents: int
    tokens: int
    seqlen_tokens: int
    windows: list[dict]

    def summary(self) -> str:
        """One line saying what is scored: the split, its documents and tokens, the windows and the dropped tail."""
        scored = len(self.windows) * self.seqlen_tokens
        return (f"perplexity of corpus {self.corpus}, split {self.split}: {self.documents} documents, {self.tokens} "
                f"tokens; scoring {len(self.windows)} windows of {self.seqlen_tokens} tokens ({scored} tokens, the "
                f"last {self.tokens - scored} dropped)")


def corpus_windows(corpus: str, split: str, tokenizer_name: str, seqlen_tokens: int,
                   add_special_tokens: bool | None = None) -> CorpusWindows:
    """``token_windows`` of a split of a corpus spec (``cpt_bench.corpus``; ``all``: every document), cut with
    ``tokenizer_name``'s tokenizer."""
    tokenizer = shared_tokenizer(tokenizer_name)  # only read: one per model serves every task of a process
    stream = corpus_stream(corpus, split, tokenizer, with_offsets=True)
    return CorpusWindows(str(corpus), split, len(load_split(corpus, split)), len(stream), seqlen_tokens,
                         token_windows(stream, tokenizer, seqlen_tokens, add_special_tokens))


def rolling_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    """lm-eval ``process_results`` for a window: token-, word- and byte-normalised loglikelihood pairs.

    ``results`` is ``[sum of log-probabilities of the window's tokens]`` (nats). Each metric is a
    ``(loglikelihood, count)`` pair for lm-eval's ``weighted_perplexity`` / ``bits_per_byte``
    aggregations, so e.g. token perplexity = exp(-sum loglikelihood / sum n_tokens).
    """
    (loglikelihood,) = results
    text = doc["text"]
    n_bytes = ConfigurableTask.count_bytes(text)
    return {
        "token_perplexity": (loglikelihood, doc["n_tokens"]),
        "word_perplexity": (loglikelihood, ConfigurableTask.count_words(text)),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


def perplexity_with_stderr(pairs: list[tuple[float, int]]) -> tuple[float, float | None]:
    """Weighted perplexity ``exp(-sum ll / sum n)`` over windows and its standard error (None for one window).

    ``pairs``: per window (loglikelihood in nats, count of tokens / words / bytes). lm-eval reports no
    stderr for weighted perplexities, so we estimate one: the mean negative loglikelihood per unit is a
    ratio estimator r (``stats.log_perplexity``, which gives the formula), and by the delta method
    se(exp r) = exp(r) se(r).
    """
    if not pairs:
        raise ValueError("perplexity of no windows")
    rate = log_perplexity([loglikelihood for loglikelihood, _ in pairs], [count for _, count in pairs])
    perplexity = math.exp(rate.estimate)
    return perplexity, None if rate.stderr is None else perplexity * rate.stderr
