"""SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774) for one Linear layer, optionally joint with GPTQ.

Columns are visited in order as in GPTQ (``gptq.obs_sweep``). Pruned weights are chosen by the OBS
saliency ``w^2 / [H^-1]_jj`` of the current (already updated) weights, with ``[H^-1]_jj = U[j, j]^2`` read
from the Cholesky factor of the inverse Hessian (columns before ``j`` eliminated). Unstructured: the lowest
``sparsity`` fraction of each block of ``block_size`` columns at once (adaptive mask selection); N:M: the
lowest ``m - n`` of each row in every window of ``m`` columns. Each column is then pruned, quantized on
its group's grid if joint (a zero stays exactly zero), and its error spread onto the later columns.
"""

from __future__ import annotations

import torch

from cpt_bench.compress.gptq import check_block_size, finalize, inverse_cholesky, obs_sweep, prepare_hessian
from cpt_bench.compress.quant import ColumnQuantizer, CompressedLinear
from cpt_bench.compress.spec import Pruning, Quantization


def pruning_mask(scores: torch.Tensor, pruning: Pruning, per_row: bool = False) -> torch.Tensor:
    """Select the weights with the lowest scores to prune.

    Args:
        scores: ``[rows, cols]`` saliencies (higher = more important).
        pruning: N:M prunes ``m - n`` of every ``m`` consecutive columns in each row; unstructured prunes
            ``round(fraction * count)`` weights of the whole matrix, or of each row if ``per_row``.
        per_row: compare weights within a row only (unstructured).

    Returns:
        ``[rows, cols]`` bool, True where pruned.
    """
    rows, cols = scores.shape
    if pruning.m:
        grouped, k = scores.reshape(rows, cols // pruning.m, pruning.m), pruning.m - pruning.n
    elif per_row:
        grouped, k = scores.reshape(rows, 1, cols), round(pruning.fraction * cols)
    else:
        grouped, k = scores.reshape(1, 1, -1), round(pruning.fraction * scores.numel())
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    if k:
        mask.scatter_(-1, torch.topk(grouped, k, dim=-1, largest=False).indices, True)
    return mask.reshape(rows, cols)


def sparsegpt_layer(weight: torch.Tensor, hessian: torch.Tensor, pruning: Pruning,
                    quant: Quantization | None = None, dampening: float = 0.01,
                    block_size: int = 128) -> CompressedLinear:
    """Prune one Linear weight with SparseGPT, quantizing it in the same pass if ``quant`` is given.

    Args:
        weight: ``[rows, cols]`` weight (any float dtype; computation is float32). Not modified.
        hessian: ``[cols, cols]`` ``H = 2 X X^T / n`` of the layer's calibration inputs.
        pruning: sparsity percent or N:M pattern.
        quant: joint quantization (GPTQ grid per group, fitted on the kept weights reached so far).
        dampening: fraction of ``mean(diag(H))`` added to the diagonal.
        block_size: columns per lazy-update block and per adaptive unstructured mask.

    Returns:
        The pruned (and quantized) weight with its mask and reconstruction error (``output_error``).
    """
    check_block_size(block_size, quant.group_size if quant else None, pruning.m)
    work = weight.float().clone()
    h = prepare_hessian(hessian, work, dampening)
    quantizer = None
    if quant is not None:
        quantizer = ColumnQuantizer(tuple(work.shape), quant.bits, quant.group_size, quant.symmetric,
                                    work.device)
    compressed, pruned = obs_sweep(work, inverse_cholesky(h), block_size, quantizer,
                                   prune=lambda scores: pruning_mask(scores, pruning),
                                   prune_period=pruning.m or block_size)
    if quantizer is not None:
        return finalize(weight, hessian, quant=quantizer.result(), pruned=pruned)
    return finalize(weight, hessian, values=compressed, pruned=pruned)
