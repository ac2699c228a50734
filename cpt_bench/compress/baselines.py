"""Calibration-free and one-shot baselines: round to nearest, magnitude pruning, Wanda.

Wanda (Sun et al. 2023, arXiv:2306.11695) scores weight ``W[i, j]`` by ``|W[i, j]| * ||X_j||_2`` and prunes
the lowest scores of each output row (or of each N:M window). ``||X_j||_2^2 = n * H[j, j] / 2`` for the
layer Hessian ``H = 2 X X^T / n``, so ``sqrt(diag(H))`` gives the same ranking without another statistic.
"""

from __future__ import annotations

import torch

from cpt_bench.compress.gptq import finalize
from cpt_bench.compress.quant import CompressedLinear, quantize_groups
from cpt_bench.compress.sparsegpt import pruning_mask
from cpt_bench.compress.spec import Pruning, Quantization


def rtn(weight: torch.Tensor, quant: Quantization, hessian: torch.Tensor | None = None) -> CompressedLinear:
    """Round ``weight [rows, cols]`` to nearest on min-max grids; ``hessian`` only measures the error."""
    quantized = quantize_groups(weight, quant.bits, quant.group_size, quant.symmetric)
    return finalize(weight, hessian, quant=quantized)


def magnitude(weight: torch.Tensor, pruning: Pruning,
              hessian: torch.Tensor | None = None) -> CompressedLinear:
    """Prune the smallest ``|W|`` of the whole layer (or of each N:M window); ``hessian`` gives the error."""
    pruned = pruning_mask(weight.abs().float(), pruning)
    return finalize(weight, hessian, values=weight.detach().clone(), pruned=pruned)


def wanda(weight: torch.Tensor, pruning: Pruning, hessian: torch.Tensor) -> CompressedLinear:
    """Prune the lowest ``|W[i, j]| * ||X_j||_2`` of each output row (or of each N:M window)."""
    scores = weight.abs().float() * torch.diag(hessian).float().sqrt()
    pruned = pruning_mask(scores, pruning, per_row=True)
    return finalize(weight, hessian, values=weight.detach().clone(), pruned=pruned)
