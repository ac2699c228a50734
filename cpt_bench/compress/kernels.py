"""Real low-bit inference on CPU with torch's built-in weight-only kernels.

``LowBitLinear`` holds a compressed Linear only as packed integer codes plus its grids, and multiplies with

* ``aten._weight_int4pack_mm_for_cpu`` for 4-bit codes (group-wise grids; kernel groups of 32/64/128/256
  input columns). The kernel dequantizes ``w = (q - 8) * scale + offset``; our grids are
  ``w = (q - zero) * scale``, so ``offset = (8 - zero) * scale``. ``scales_and_zeros`` is
  ``[n_groups, out, 2]`` (scale, offset) in the activation dtype (bf16, fp16 or fp32 in torch 2.13).
  A per-channel grid is repeated over kernel groups; act-order columns are permuted so groups are contiguous
  and the input is permuted the same way.
* ``aten._weight_int8pack_mm`` for 8-bit per-channel grids. That kernel is symmetric
  (``y = x @ (int8 * scale)^T``); we store ``q - 128`` and subtract ``sum(x) * (zero - 128) * scale`` per
  output, which is exact algebra for asymmetric grids.

Speed (torch 2.13, 2-core AVX512-bf16 CPU, one 1536x576 weight): bf16 int4 is ~1.6x slower than a dense bf16
matmul at 1024 tokens, on par at 16 and far faster at 1 token; fp32 activations are exact but ~75x slower
than dense fp32 at 1024 tokens (no fast path), so real mode defaults to bf16.

Pruned weights inside quantized layers are stored as their group's zero point (dense codes: the kernels do
not exploit sparsity). Pruned-only layers and 2- or 3-bit codes have no kernel: ``swap_in_kernels`` refuses
them unless ``fallback=True``, which keeps them as simulated dense Linears and records that per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cpt_bench.compress.layers import state_weight
from cpt_bench.compress.quant import CompressedLinear
from cpt_bench.errors import UserError

INT4_KERNEL_GROUPS = (256, 128, 64, 32)
INT4_OUT_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs out_features % 16 == 0
_INT4_MIDPOINT = 8
_INT8_MIDPOINT = 128
_INNER_K_TILES = 8


class UnsupportedLayerError(UserError):
    """A compressed layer that the real kernels cannot run (one-line message naming the layer and why)."""


@dataclass(frozen=True)
class Int4Layout:
    """How one 4-bit weight ``[out, in]`` maps onto the int4 kernel: its group size and column order."""

    kernel_group: int
    repeats: int  # kernel groups per stored group (> 1 for a per-channel grid)
    perm: torch.Tensor | None  # [in] column order making act-order groups contiguous, or None


def _int4_layout(name: str, layer: CompressedLinear) -> Int4Layout:
    quant = layer.quant
    rows, cols = quant.codes.shape
    if rows % INT4_OUT_MULTIPLE:
        raise UnsupportedLayerError(f"layer {name}: torch's int4 CPU kernel needs an output width divisible by "
                                    f"{INT4_OUT_MULTIPLE}, got {rows}")
    kernel_group = next((g for g in INT4_KERNEL_GROUPS if quant.group_size % g == 0), None)
    if kernel_group is None:
        raise UnsupportedLayerError(f"layer {name}: group size {quant.group_size} is not a multiple of any int4 "
                                    f"kernel group size {INT4_KERNEL_GROUPS}")
    perm = None if quant.g_idx is None else torch.argsort(quant.g_idx.long(), stable=True)
    return Int4Layout(kernel_group, quant.group_size // kernel_group, perm)


def check_supported(name: str, layer: CompressedLinear) -> None:
    """Raise ``UnsupportedLayerError`` unless ``layer`` runs on torch's int4 or int8 CPU kernels."""
    quant = layer.quant
    if quant is None:
        raise UnsupportedLayerError(f"layer {name} is pruned without quantization: sparse weights have no CPU "
                                    "kernel here (run it simulated)")
    if quant.bits == 4:
        _int4_layout(name, layer)
    elif quant.bits == 8:
        if quant.scales.shape[1] != 1:
            raise UnsupportedLayerError(f"layer {name}: torch's int8 CPU kernel takes one scale per output "
                                        f"channel, not groups of {quant.group_size} (use gptq-w8 / rtn-w8)")
    else:
        raise UnsupportedLayerError(f"layer {name}: {quant.bits}-bit codes have no CPU kernel (torch has int4 and "
                                    "int8 weight-only kernels)")


class LowBitLinear(nn.Module):
    """A Linear ``y = x W^T + b`` whose weight exists only as packed 4-bit or 8-bit codes and grids.

    Buffers: ``qweight`` (int4: ``[out, in/2]`` uint8 in the kernel's packed layout; int8: ``[out, in]`` int8),
    ``scales`` (int4: ``[in/kernel_group, out, 2]`` scale and offset; int8: ``[out]``), ``offsets`` (int8,
    asymmetric grids only: ``[out]`` float32), ``perm`` (act-order only: ``[in]`` int64), ``bias`` (``[out]``).
    Inputs ``[..., in]`` of any float dtype are computed in ``dtype`` and returned in the input's dtype.
    """

    def __init__(self, name: str, layer: CompressedLinear, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        check_supported(name, layer)
        quant = layer.quant
        self.out_features, self.in_features = quant.codes.shape
        self.bits = quant.bits
        self.dtype = dtype
        codes = layer.dense_codes().cpu()
        self.register_buffer("perm", None)
        self.register_buffer("offsets", None)
        if quant.bits == 4:
            layout = _int4_layout(name, layer)
            self.kernel_group = layout.kernel_group
            self.mode = f"int4 g{layout.kernel_group}"
            if layout.perm is not None:
                self.perm = layout.perm
                codes = codes[:, layout.perm]
            scales = quant.scales.float().cpu().repeat_interleave(layout.repeats, 1)
            zeros = quant.zeros.float().cpu().repeat_interleave(layout.repeats, 1)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int().contiguous(), _INNER_K_TILES)
            self.register_buffer("qweight", packed)
            offsets = (_INT4_MIDPOINT - zeros) * scales
            self.register_buffer("scales", torch.stack([scales.t(), offsets.t()], -1).to(dtype).contiguous())
        else:
            self.mode = "int8 per-channel"
            scales = quant.scales.float().cpu()[:, 0]
            zeros = quant.zeros.float().cpu()[:, 0]
            self.register_buffer("qweight", (codes.int() - _INT8_MIDPOINT).to(torch.int8).contiguous())
            self.register_buffer("scales", scales.to(dtype))
            if torch.any(zeros != _INT8_MIDPOINT):
                self.offsets = (zeros - _INT8_MIDPOINT) * scales
        self.register_buffer("bias", None if bias is None else bias.detach().to("cpu", dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise UnsupportedLayerError("LowBitLinear runs torch's CPU kernels; on CUDA load the GPTQ export with "
                                        "GPTQModel")
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        if self.perm is not None:
            flat = flat[:, self.perm]
        flat = flat.contiguous()
        if self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.kernel_group, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
            if self.offsets is not None:
                y = y - (flat.float().sum(-1, keepdim=True) * self.offsets).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}, dtype={self.dtype}"


def swap_in_kernels(model: nn.Module, layers: dict[str, CompressedLinear], dtype: torch.dtype,
                    fallback: bool = False) -> dict[str, str]:
    """Replace each compressed Linear (or GPT-2 ``Conv1D``: the same product) of ``model``, by module name, with a
    ``LowBitLinear``.

    Args:
        model: the model whose Linears named in ``layers`` are replaced (their weights may be on ``meta``).
        layers: compressed forms, e.g. ``storage.read_checkpoint(dir).layers``.
        dtype: activation dtype of the kernels (bf16 as usual; fp16 and fp32 also run in torch 2.13).
        fallback: keep unsupported layers as dense Linears with their simulated weights (in the dtype of the
            Linear's weight) instead of raising.

    Returns:
        The mode of each layer: ``"int4 g64"``, ``"int8 per-channel"`` or ``"simulated (<why>)"``.
    """
    modes = {}
    for name, layer in layers.items():
        module = model.get_submodule(name)
        try:
            real = LowBitLinear(name, layer, module.bias, dtype)
        except UnsupportedLayerError as error:
            if not fallback:
                raise
            weight = state_weight(module, layer.weight().to("cpu", module.weight.dtype))
            module.weight = nn.Parameter(weight, requires_grad=False)
            modes[name] = f"simulated ({error})"
            continue
        model.set_submodule(name, real)
        modes[name] = real.mode
    return modes
