"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) for one Linear layer, and the Hessian machinery it shares
with SparseGPT.

A Linear layer ``y = W x`` with ``W [rows, cols]`` is compressed column by column. For calibration inputs
``X [cols, n]`` the layer-wise objective ``||W X - Ŵ X||^2`` has Hessian ``H = 2 X X^T / n`` (shared by
all rows). After a column is rounded, Optimal Brain Surgeon moves its rounding error onto the columns not
yet visited, using the rows of the upper Cholesky factor ``U`` of ``H^-1`` (``U^T U = H^-1``): row ``i`` of
``U`` divided by ``U[i, i]`` is the OBS update for column ``i`` once the earlier columns are fixed. Updates
are applied lazily: inside a block of ``block_size`` columns at once, to the later columns once per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cpt_bench.compress.quant import ColumnQuantizer, CompressedLinear, QuantizedWeight
from cpt_bench.compress.spec import Quantization, SpecError
from cpt_bench.errors import UserError


class Hessian:
    """Running ``H = 2 X X^T / n`` (float32 ``[cols, cols]``) over the inputs a Linear layer receives."""

    def __init__(self, cols: int, device: torch.device) -> None:
        self.matrix = torch.zeros(cols, cols, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x [..., cols]``, one token per leading index."""
        x = x.reshape(-1, x.shape[-1]).float()
        total = self.tokens + x.shape[0]
        self.matrix *= self.tokens / total
        self.tokens = total
        x = x * math.sqrt(2 / total)
        self.matrix += x.T @ x


class HessianError(UserError):
    """A layer Hessian that stays singular after dampening (one-line message: raise the dampening setting)."""


def output_error(original: torch.Tensor, compressed: torch.Tensor, hessian: torch.Tensor) -> float:
    """Layer reconstruction error ``trace(D H D^T) / 2`` with ``D = W - Ŵ`` and ``H = 2 X X^T / n``.

    Unit: mean over the ``n`` calibration tokens of the squared L2 norm of the output error,
    ``(1/n) * sum_t ||(W - Ŵ) x_t||^2``, in squared output units. The product in float32 (float64 took as long
    as a layer's GPTQ sweep on CPU; the error is a diagnostic, relative precision ~1e-6 is plenty), summed in
    float64.
    """
    delta = (original.float() - compressed.float()).detach()
    return float(((delta @ hessian.float()) * delta).double().sum() / 2)


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor, dampening: float) -> torch.Tensor:
    """Return a damped copy of ``H [cols, cols]``; zero ``weight``'s dead columns in place.

    A dead column (``H[j, j] == 0``: input ``j`` was always zero) has no effect on the output, so its weight
    is set to 0 and its diagonal to 1. Then ``dampening * mean(diag(H))`` is added to the diagonal.
    """
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    h.diagonal().add_(dampening * torch.diag(h).mean())
    return h


def inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U [cols, cols]`` of ``H^-1`` (``U^T U = H^-1``) for a damped ``H``."""
    lower, info = torch.linalg.cholesky_ex(h)
    if info:
        raise HessianError("the layer Hessian is not positive definite after dampening; raise the dampening")
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info:
        raise HessianError("the inverse layer Hessian is not positive definite; raise the dampening")
    return upper


def check_block_size(block_size: int, *periods: int | None) -> None:
    """Refuse a block size that is not a multiple of each period (group size, N:M ``m``) given.

    Groups and N:M windows must not straddle two blocks, so that each is fitted on up-to-date weights.
    """
    for period in periods:
        if period and block_size % period:
            raise SpecError(f"block size {block_size} is not a multiple of the group or N:M period {period}")


def obs_sweep(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    block_size: int,
    quantizer: ColumnQuantizer | None = None,
    prune: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prune_period: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visit the columns of ``weight`` in order, prune and/or quantize each, and spread its error (OBS).

    Args:
        weight: ``[rows, cols]`` float32 working copy; overwritten with the OBS-updated weights.
        hinv: ``[cols, cols]`` upper Cholesky factor of the damped ``H^-1`` (``inverse_cholesky``).
        block_size: columns per lazy-update block; a multiple of the group size and ``prune_period``.
        quantizer: rounds each column after pruning; fitted at each group's first column from the current
            weights with the already-pruned ones set to 0.
        prune: called at every ``prune_period``-th column of a block with the OBS saliencies
            ``w[:, j]^2 / U[j, j]^2`` of the next ``prune_period`` columns ``[rows, width]`` (``U[j, j]^2``
            is ``[H^-1]_jj`` once the earlier columns are fixed); returns the bool mask ``[rows, width]``
            of weights to prune there.
        prune_period: columns per mask selection (``block_size`` for adaptive unstructured, ``m`` for N:M).

    Returns:
        ``(compressed, pruned)``: float32 ``[rows, cols]`` final weights (pruned ones exactly 0) and the
        bool ``[rows, cols]`` mask of pruned weights (all False without ``prune``).
    """
    compressed = torch.zeros_like(weight)
    pruned = torch.zeros_like(weight, dtype=torch.bool)
    for start in range(0, weight.shape[1], block_size):
        end = min(start + block_size, weight.shape[1])
        block, hinv_block = weight[:, start:end], hinv[start:end, start:end]
        pivots = torch.diag(hinv_block).tolist()  # U[j, j] as Python numbers: no tensor read per column
        errors = torch.zeros_like(block)
        for i in range(end - start):
            col = start + i
            if prune is not None and i % prune_period == 0:
                window = slice(i, min(i + prune_period, end - start))
                scores = block[:, window] ** 2 / torch.diag(hinv_block)[window] ** 2
                pruned[:, start + window.start:start + window.stop] = prune(scores)
            if quantizer is not None and quantizer.starts_group(col):
                span = slice(col, col + quantizer.group_size)
                quantizer.fit(col, weight[:, span].masked_fill(pruned[:, span], 0.0))
            # The fewest tensor operations per column (they dominate the sweep's time on CPU): no mask without
            # pruning, and quantized values are rebuilt from the codes once at the end.
            column = block[:, i]
            q = column if prune is None else column.masked_fill(pruned[:, col], 0.0)
            if quantizer is not None:
                q = quantizer(col, q) if prune is None else quantizer(col, q).masked_fill(pruned[:, col], 0.0)
            else:
                compressed[:, col] = q
            errors[:, i] = (column - q) / pivots[i]
            block[:, i:] -= errors[:, i:i + 1] * hinv_block[i:i + 1, i:]
        weight[:, end:] -= errors @ hinv[start:end, end:]
    if quantizer is not None:
        compressed = quantizer.result().dequantize().masked_fill(pruned, 0.0)  # in visiting order
    return compressed, pruned


def finalize(original: torch.Tensor, hessian: torch.Tensor | None, *, quant: QuantizedWeight | None = None,
             pruned: torch.Tensor | None = None, values: torch.Tensor | None = None) -> CompressedLinear:
    """Assemble a ``CompressedLinear`` and, given the Hessian, its ``output_error`` against ``original``."""
    layer = CompressedLinear(quant=quant, pruned=pruned, values=values)
    if hessian is not None:
        layer.error = output_error(original, layer.weight(), hessian)
    return layer


def gptq_layer(weight: torch.Tensor, hessian: torch.Tensor, quant: Quantization, dampening: float = 0.01,
               block_size: int = 128) -> CompressedLinear:
    """Quantize one Linear weight with GPTQ.

    Args:
        weight: ``[rows, cols]`` weight (any float dtype; computation is float32). Not modified.
        hessian: ``[cols, cols]`` ``H = 2 X X^T / n`` of the layer's calibration inputs.
        quant: bits, group size, symmetry and act-order. With act-order, columns are visited by decreasing
            ``diag(H)`` and groups are consecutive in that order; ``g_idx`` records each column's group.
        dampening: fraction of ``mean(diag(H))`` added to the diagonal.
        block_size: columns per lazy-update block.

    Returns:
        Codes, grids and the dequantized weight, with the reconstruction error (``output_error``).
    """
    check_block_size(block_size, quant.group_size)
    work = weight.float().clone()
    h = prepare_hessian(hessian, work, dampening)
    perm = None
    if quant.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        work, h = work[:, perm], h[perm][:, perm]
    quantizer = ColumnQuantizer(tuple(work.shape), quant.bits, quant.group_size, quant.symmetric, work.device)
    obs_sweep(work, inverse_cholesky(h), block_size, quantizer)
    return finalize(weight, hessian, quant=quantizer.result(perm))
