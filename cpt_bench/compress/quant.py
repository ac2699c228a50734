"""Uniform min-max weight quantizer and the compressed form of one Linear layer.

A grid maps integer codes ``q`` in ``[0, 2**bits - 1]`` to ``(q - zero) * scale``. Grids are fitted per
output row and per group of ``group_size`` consecutive input columns (one group per row: per channel).
The fitted range always contains 0, so a zero weight quantizes to exactly 0: pruned weights stay pruned.
Scales are rounded to fp16 when fitted, so the weights rebuilt from a stored checkpoint (fp16 scales)
are bit-identical to the ones computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FP16_TINY = torch.finfo(torch.float16).tiny


def fit_grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit min-max grids over the last dimension.

    Args:
        w: weights ``[..., k]``; one grid per leading index.
        bits: code width.
        symmetric: put the zero point at the middle code ``2**(bits-1)`` and size the grid by ``max|w|``.

    Returns:
        ``(scale, zero)``, each ``[...]`` float32: ``scale > 0`` is fp16-representable, ``zero`` holds an
        integer in ``[0, 2**bits - 1]``.
    """
    maxq = 2**bits - 1
    w = w.float()
    low = w.amin(-1).clamp(max=0)
    high = w.amax(-1).clamp(min=0)
    if symmetric:
        high = torch.maximum(-low, high)
        scale = _fp16_scale(2 * high / maxq)
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    scale = _fp16_scale((high - low) / maxq)
    return scale, torch.round(-low / scale).clamp(0, maxq)


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp_min(_FP16_TINY).half().float()


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w`` to codes on the grid ``(scale, zero)`` (broadcast against ``w``); float32 integers."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Map codes back to float32 weights ``(codes - zero) * scale``."""
    return (codes.float() - zero) * scale


@dataclass
class QuantizedWeight:
    """Integer codes and per-(row, group) grids of one weight matrix ``[rows, cols]``.

    Attributes:
        codes: ``[rows, cols]`` uint8 codes.
        scales: ``[rows, n_groups]`` float32 (fp16-representable) grid steps.
        zeros: ``[rows, n_groups]`` uint8 zero points.
        bits: code width.
        group_size: input columns per group (``cols`` when per channel).
        g_idx: ``[cols]`` int32 group of each input column when act-order made groups non-contiguous;
            ``None`` means column ``j`` belongs to group ``j // group_size``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def column_groups(self) -> torch.Tensor:
        """Group index of each input column, ``[cols]`` int64."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """The float32 weights ``[rows, cols]`` the codes stand for."""
        groups = self.column_groups()
        return dequantize(self.codes, self.scales.float()[:, groups], self.zeros.float()[:, groups])


def quantize_groups(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    """Round to nearest: fit each (row, group) grid on ``w [rows, cols]`` and quantize it."""
    rows, cols = w.shape
    group_size = group_size or cols
    grouped = w.float().reshape(rows, cols // group_size, group_size)
    scale, zero = fit_grid(grouped, bits, symmetric)
    codes = quantize(grouped, scale[..., None], zero[..., None], bits)
    return QuantizedWeight(
        codes=codes.reshape(rows, cols).to(torch.uint8),
        scales=scale,
        zeros=zero.to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )


class ColumnQuantizer:
    """Quantizes a weight one column at a time, as GPTQ and SparseGPT visit them, recording codes and grids.

    The caller fits a group's grids when it reaches the group's first column (``starts_group``), from the
    weights as updated so far, then quantizes that group's columns one by one.
    """

    def __init__(self, shape: tuple[int, int], bits: int, group_size: int | None, symmetric: bool,
                 device: torch.device) -> None:
        rows, cols = shape
        self.bits = bits
        self.symmetric = symmetric
        self.group_size = group_size or cols
        n_groups = cols // self.group_size
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(rows, n_groups, device=device)
        self.zeros = torch.zeros(rows, n_groups, device=device)
        self._scale = self._zero = torch.zeros(rows, device=device)  # ``[rows]`` grids of the group fitted last

    def starts_group(self, col: int) -> bool:
        return col % self.group_size == 0

    def fit(self, col: int, w_group: torch.Tensor) -> None:
        """Fit the grids of the group starting at ``col`` from its current weights ``[rows, group_size]``."""
        group = col // self.group_size
        self._scale, self._zero = fit_grid(w_group, self.bits, self.symmetric)
        self.scales[:, group], self.zeros[:, group] = self._scale, self._zero

    def __call__(self, col: int, w: torch.Tensor) -> torch.Tensor:
        """Quantize column ``col`` (``w [rows]``) on the grids of its group, the last one fitted; returns its
        float32 dequantized values ``[rows]``."""
        codes = quantize(w, self._scale, self._zero, self.bits)
        self.codes[:, col] = codes  # setitem casts to uint8
        return dequantize(codes, self._scale, self._zero)

    def result(self, perm: torch.Tensor | None = None) -> QuantizedWeight:
        """The codes and grids; ``perm [cols]``: the visiting order, if columns were visited permuted.

        Groups are consecutive in visiting order, so permuted columns get a ``g_idx`` (original order).
        """
        codes, g_idx = self.codes, None
        if perm is not None:
            inverse = torch.argsort(perm)
            codes = codes[:, inverse]
            if self.scales.shape[1] > 1:
                position_group = torch.arange(len(perm), device=perm.device) // self.group_size
                g_idx = position_group[inverse].to(torch.int32)
        zeros = self.zeros.to(torch.uint8)
        return QuantizedWeight(codes, self.scales, zeros, self.bits, self.group_size, g_idx)


@dataclass
class CompressedLinear:
    """The compressed form of one Linear weight ``[rows, cols]`` and its reconstruction error.

    Attributes:
        error: output reconstruction error (see ``gptq.output_error``); ``None`` without calibration data.
        quant: codes and grids, if quantized.
        pruned: ``[rows, cols]`` bool, True where the weight was pruned, if pruned.
        values: ``[rows, cols]`` float unquantized weights, if pruned only.
    """

    error: float | None = None
    quant: QuantizedWeight | None = None
    pruned: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        """The simulated float32 weight ``[rows, cols]``: dequantized (or kept) values, 0 where pruned.

        Checkpoint loading rebuilds weights with this same method, so the round trip is bit-exact.
        """
        dense = self.quant.dequantize() if self.quant is not None else self.values.float()
        return dense if self.pruned is None else dense.masked_fill(self.pruned, 0.0)

    def dense_codes(self) -> torch.Tensor:
        """Codes of every weight, ``[rows, cols]`` uint8, for formats and kernels that store all of them.

        Pruned weights get their group's zero point, so that dequantizing gives exactly 0 there too.
        """
        codes = self.quant.codes
        if self.pruned is None:
            return codes
        return torch.where(self.pruned, self.quant.zeros[:, self.quant.column_groups()], codes)
