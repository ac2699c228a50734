"""Compress a Hugging Face decoder-only causal LM layer by layer from calibration windows.

The inputs of the first decoder layer are captured for every calibration window (with the keyword
arguments the model passes it: rotary ``position_embeddings``, ``attention_mask``, ``position_ids``...).
Each decoder layer is then calibrated on its inputs: forward hooks accumulate the Hessian of each of its
Linear layers, the Linears are compressed in place, and the compressed layer's outputs become the next
layer's inputs. True-sequential mode (default) compresses the Linears in the order they consume inputs,
grouping those that read the same tensor (Llama: q,k,v -> o -> gate,up -> down) and re-running the layer
between groups, so later Linears are calibrated on the outputs of the compressed earlier ones.
Only Linears inside decoder layers are compressed; embeddings, norms and ``lm_head`` stay dense.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from cpt_bench.compress.baselines import magnitude, rtn, wanda
from cpt_bench.compress.gptq import Hessian, check_block_size, gptq_layer
from cpt_bench.compress.quant import CompressedLinear
from cpt_bench.compress.sparsegpt import sparsegpt_layer
from cpt_bench.compress.spec import CalibrationSettings, CompressionResult, LayerReport, Spec

_LAYER_PATHS = ("model.layers", "model.decoder.layers")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and list of decoder layers: ``model.layers`` (Llama-like) or ``model.decoder.layers``
    (OPT)."""
    for path in _LAYER_PATHS:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__} has no decoder layers at {' or '.join(_LAYER_PATHS)}")


def compressible_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules inside decoder layers, by full module name, in layer order."""
    path, layers = decoder_layers(model)
    linears: dict[str, nn.Linear] = {}
    for index, layer in enumerate(layers):
        linears.update(_layer_linears(f"{path}.{index}", layer))
    return linears


def _layer_linears(prefix: str, layer: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules of one decoder layer, named ``<prefix>.<name in layer>``."""
    modules = layer.named_modules()
    return {f"{prefix}.{name}": module for name, module in modules if isinstance(module, nn.Linear)}


def check_model(model: nn.Module, spec: Spec, settings: CalibrationSettings | None = None) -> None:
    """Refuse a spec whose group size or N:M ``m`` does not fit the model's layers or GPTQ/SparseGPT's
    ``settings.block_size``; raises ``SpecError`` or ``ValueError`` with a one-line message."""
    spec.check_fits({name: module.in_features for name, module in compressible_linears(model).items()})
    if settings is not None and spec.methods & {"gptq", "sparsegpt"}:
        check_block_size(settings.block_size, spec.quantization and spec.quantization.group_size,
                         spec.pruning and spec.pruning.m)


def compress_linear(weight: torch.Tensor, spec: Spec, hessian: torch.Tensor | None,
                    settings: CalibrationSettings) -> CompressedLinear:
    """Compress one Linear weight ``[rows, cols]`` by ``spec``; ``hessian [cols, cols]`` if calibrated."""
    quant, pruning = spec.quantization, spec.pruning
    if pruning is None:
        if quant.method == "gptq":
            return gptq_layer(weight, hessian, quant, settings.dampening, settings.block_size)
        return rtn(weight, quant, hessian)
    if pruning.method == "sparsegpt":
        return sparsegpt_layer(weight, hessian, pruning, quant, settings.dampening, settings.block_size)
    if pruning.method == "wanda":
        return wanda(weight, pruning, hessian)
    return magnitude(weight, pruning, hessian)


def compress_model(model: nn.Module, spec: Spec, calibration_ids: torch.Tensor | None = None,
                   settings: CalibrationSettings | None = None, progress: bool = True) -> CompressionResult:
    """Compress the decoder-layer Linears of ``model`` in place by ``spec``.

    Args:
        model: a Hugging Face decoder-only causal LM (Llama-like or OPT).
        spec: the recipe; ``dense`` returns the model untouched.
        calibration_ids: ``[n_windows, seqlen]`` int64 token ids; needed when ``spec.needs_calibration``.
        settings: calibration settings (defaults if None); must match ``calibration_ids``' shape.
        progress: show a tqdm bar over decoder layers.

    Returns:
        The compressed form of each Linear (for ``storage.save_compressed``) and per-Linear reports.
    """
    settings = settings or CalibrationSettings()
    result = CompressionResult(spec=spec, settings=settings if spec.needs_calibration else None)
    if spec.is_dense:
        return result
    check_model(model, spec, settings)
    if spec.needs_calibration:
        _check_calibration_ids(calibration_ids, settings)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _compress_layers(model, spec, calibration_ids, settings, progress, result)
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - started
    return result


def _check_calibration_ids(ids: torch.Tensor | None, settings: CalibrationSettings) -> None:
    expected = (settings.n_windows, settings.seqlen)
    if ids is None or ids.dim() != 2 or tuple(ids.shape) != expected or ids.is_floating_point():
        got = None if ids is None else f"{tuple(ids.shape)} {ids.dtype}"
        raise ValueError(f"calibration ids must be integer token ids of shape {expected}, got {got}")


def _compress_layers(model: nn.Module, spec: Spec, ids: torch.Tensor | None, settings: CalibrationSettings,
                     progress: bool, result: CompressionResult) -> None:
    path, layers = decoder_layers(model)
    calibrated = spec.needs_calibration
    inputs, kwargs = _capture_layer_inputs(model, layers[0], ids) if calibrated else ([], {})
    for index, layer in enumerate(tqdm(layers, desc=f"compress {spec}", unit="layer", disable=not progress)):
        linears = _layer_linears(f"{path}.{index}", layer)
        if not calibrated:
            for name, module in linears.items():
                _compress_into(module, name, spec, None, settings, result)
            continue
        groups = [list(linears)]
        if settings.true_sequential:
            groups = _input_groups(layer, linears, inputs[0], kwargs)
        for group in groups:
            hessians = _accumulate_hessians(layer, {name: linears[name] for name in group}, inputs, kwargs,
                                            stop_after=group[-1] if settings.true_sequential else None)
            for name in group:
                _compress_into(linears[name], name, spec, hessians[name].matrix, settings, result)
        inputs = [_run_layer(layer, hidden, kwargs) for hidden in inputs]


def _compress_into(module: nn.Linear, name: str, spec: Spec, hessian: torch.Tensor | None,
                   settings: CalibrationSettings, result: CompressionResult) -> None:
    started = time.perf_counter()
    compressed = compress_linear(module.weight.data, spec, hessian, settings)
    module.weight.data.copy_(compressed.weight())
    result.layers[name] = compressed
    result.reports.append(LayerReport(name, str(spec), compressed.error, time.perf_counter() - started))


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has recorded what it needs."""


def _capture_layer_inputs(model: nn.Module, first_layer: nn.Module,
                          ids: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Hidden states ``[1, seqlen, hidden]`` entering ``first_layer`` per window, and its keyword arguments.

    All windows have the same length, so the keyword arguments (position embeddings, masks) of the first
    window serve every window.
    """
    inputs: list[torch.Tensor] = []
    kwargs: dict = {}

    def hook(module: nn.Module, args: tuple, layer_kwargs: dict) -> None:
        layer_kwargs = dict(layer_kwargs)
        inputs.append(args[0] if args else layer_kwargs.pop("hidden_states"))
        kwargs.update(layer_kwargs)
        raise _Stop

    device = next(model.parameters()).device
    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for window in ids:
            try:
                model(input_ids=window[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _input_groups(layer: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor,
                  kwargs: dict) -> list[list[str]]:
    """Group the Linears by the input tensor they read, groups in the order the forward reaches them."""
    groups: dict[tuple, list[str]] = {}
    seen: list[torch.Tensor] = []  # keeps inputs alive so that no two share an address by reuse

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            seen.append(args[0])
            groups.setdefault((args[0].data_ptr(), tuple(args[0].shape)), []).append(name)
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    try:
        _run_layer(layer, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = set(linears) - {name for group in groups.values() for name in group}
    if missing:
        raise ValueError(f"Linear layers {sorted(missing)} are not called by the decoder layer's forward")
    return list(groups.values())


def _accumulate_hessians(layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[torch.Tensor],
                         kwargs: dict, stop_after: str | None = None) -> dict[str, Hessian]:
    """Run ``layer`` on every input with hooks accumulating each Linear's ``H = 2 X X^T / n``.

    ``stop_after``: the Linear after which the rest of the forward is skipped (the group's last called).
    """
    hessians = {name: Hessian(module.in_features, module.weight.device) for name, module in linears.items()}

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            hessians[name].add(args[0])
            if name == stop_after:
                raise _Stop
        return accumulate

    handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
    try:
        for hidden in inputs:
            try:
                _run_layer(layer, hidden, kwargs)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians
