"""Calibration token windows drawn from a corpus's train split, as in the GPTQ reference code.

GPTQ's ``datautils`` joins WikiText-2 train with ``"\\n\\n"``, tokenizes it once, seeds Python's ``random``
and takes ``nsamples`` windows starting at ``random.randint(0, n_tokens - seqlen - 1)``. We do the same with
``random.Random(seed)`` on the train split of one of our corpora (the paper's 128 x 1024, seed 0, are the
``CalibrationSettings`` defaults), so a given corpus, tokenizer and settings always give the same windows.
The token stream (``cpt_bench.tokens``) has no special tokens: a window is a slice of running text.
"""

from __future__ import annotations

import random

import torch

from cpt_bench.compress.spec import CalibrationSettings
from cpt_bench.errors import UserError
from cpt_bench.tokens import corpus_stream


class CalibrationError(UserError):
    """Calibration data that cannot be drawn as requested (one-line message)."""


def calibration_windows(tokens: torch.Tensor, settings: CalibrationSettings) -> torch.Tensor:
    """Draw ``settings.n_windows`` windows of ``settings.seqlen`` consecutive tokens at seeded random starts.

    Args:
        tokens: ``[N]`` token ids of a tokenized corpus, ``N > seqlen`` (the reference draws starts from
            ``[0, N - seqlen - 1]``).

    Returns:
        ``[n_windows, seqlen]`` int64 token ids; windows may overlap.
    """
    if tokens.dim() != 1 or tokens.numel() <= settings.seqlen:
        raise CalibrationError(f"calibration needs a 1-D token stream of at least {settings.seqlen + 1} tokens "
                               f"for windows of {settings.seqlen}, got shape {tuple(tokens.shape)}")
    rng = random.Random(settings.seed)
    last_start = tokens.numel() - settings.seqlen - 1
    starts = [rng.randint(0, last_start) for _ in range(settings.n_windows)]
    return torch.stack([tokens[start:start + settings.seqlen] for start in starts]).long()


def corpus_calibration_ids(tokenizer, settings: CalibrationSettings) -> torch.Tensor:
    """``[n_windows, seqlen]`` calibration ids from the train split of ``settings.corpus``.

    Raises ``CalibrationError`` when the split has no more than ``seqlen`` tokens.
    """
    tokens = corpus_stream(settings.corpus, "train", tokenizer).ids
    if tokens.numel() <= settings.seqlen:
        raise CalibrationError(f"corpus {settings.corpus!r} train split has {tokens.numel()} tokens, too short for "
                               f"calibration windows of {settings.seqlen} tokens; use a smaller --seqlen")
    return calibration_windows(tokens, settings)
