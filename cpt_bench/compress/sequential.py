"""Compress a Hugging Face decoder-only causal LM layer by layer from calibration windows.

The inputs of the first decoder layer are captured for every calibration window, and the other arguments the
model passes each decoder layer (rotary ``position_embeddings``, ``attention_mask``, ``position_ids``...: they
differ between layers in models mixing sliding-window and global attention).
Each decoder layer is then calibrated on its inputs: forward hooks accumulate the Hessian of each group of its
Linear layers that read the same tensor (Llama: q,k,v -> o -> gate,up -> down; one matrix per group, shared by
its Linears), the Linears are compressed in place, and the compressed layer's outputs become the next layer's
inputs. True-sequential mode (default) compresses the groups in the order the forward reaches them, re-running
the layer up to each group, so later Linears are calibrated on the outputs of the compressed earlier ones;
otherwise one forward per window collects every group's Hessian before any is compressed.
With an EoRA ``eora.Compensator`` each Linear is corrected right after it is compressed and runs corrected for the
rest of the pass; ``compensate_model`` runs the same pass for an existing compression (a checkpoint's).
Only Linears (and GPT-2's transposed ``Conv1D``) inside decoder layers are compressed, found across model
families by ``layers``; embeddings, norms and ``lm_head`` stay dense.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from cpt_bench.compress.baselines import magnitude, rtn, wanda
from cpt_bench.compress.eora import Compensator
from cpt_bench.compress.gptq import Hessian, check_block_size, gptq_layer, output_error
from cpt_bench.compress.layers import (
    compressible_linears,
    decoder_layers,
    in_features,
    layer_linears,
    set_weight,
    weight_of,
)
from cpt_bench.compress.quant import CompressedLinear
from cpt_bench.compress.sparsegpt import sparsegpt_layer
from cpt_bench.compress.spec import CalibrationSettings, CompressionResult, LayerReport, Spec


def check_model(model: nn.Module, spec: Spec, settings: CalibrationSettings | None = None) -> None:
    """Refuse a spec whose group size or N:M ``m`` does not fit the model's layers or GPTQ/SparseGPT's
    ``settings.block_size``; raises ``SpecError`` or ``ValueError`` with a one-line message."""
    spec.check_fits({name: in_features(module) for name, module in compressible_linears(model).items()})
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


Solver = Callable[[str, torch.Tensor, "torch.Tensor | None"], CompressedLinear]  # (name, W [out, in], H) -> Ŵ


def compress_model(model: nn.Module, spec: Spec, calibration_ids: torch.Tensor | None = None,
                   settings: CalibrationSettings | None = None, progress: bool = True,
                   compensator: Compensator | None = None) -> CompressionResult:
    """Compress the decoder-layer Linears of ``model`` in place by ``spec``.

    Args:
        model: a Hugging Face decoder-only causal LM whose decoder layers ``layers.decoder_layers`` finds.
        spec: the recipe; ``dense`` returns the model untouched.
        calibration_ids: ``[n_windows, seqlen]`` int64 token ids; needed when ``spec.needs_calibration`` or a
            ``compensator`` is given.
        settings: calibration settings (defaults if None); must match ``calibration_ids``' shape.
        progress: show a tqdm bar over decoder layers.
        compensator: an EoRA ``eora.Compensator``: each Linear is corrected right after it is compressed, from its
            Hessian, and runs as ``Ŵ + B A`` for the rest of the pass (its ``fit`` holds the corrections); the
            returned compressed forms stay ``Ŵ``.

    Returns:
        The compressed form of each Linear (for ``storage.save_compressed``) and per-Linear reports.
    """
    settings = settings or CalibrationSettings()
    calibrated = spec.needs_calibration or compensator is not None
    result = CompressionResult(spec=spec, settings=settings if calibrated else None)
    if spec.is_dense:
        return result
    check_model(model, spec, settings)

    def solve(name: str, weight: torch.Tensor, hessian: torch.Tensor | None) -> CompressedLinear:
        return compress_linear(weight, spec, hessian, settings)

    _run_pass(model, spec, calibration_ids, settings, progress, result, solve, compensator)
    return result


def compensate_model(model: nn.Module, stored: dict[str, CompressedLinear], spec: Spec, calibration_ids: torch.Tensor,
                     settings: CalibrationSettings, compensator: Compensator,
                     progress: bool = True) -> CompressionResult:
    """Fit EoRA (``compensator``) for an existing compression of ``model``: the same layer-by-layer pass as
    ``compress_model``, with each Linear's compressed form taken from ``stored`` (module name -> ``Ŵ``, e.g. a
    checkpoint's, ``spec`` its recipe) instead of computed. ``model`` holds the dense weights on entry and
    ``Ŵ + B A`` on return. Raises ``ValueError`` when ``stored`` names other modules than the model's."""
    names = list(compressible_linears(model))
    if sorted(names) != sorted(stored):
        raise ValueError(f"the stored compression holds Linears {sorted(set(stored) - set(names))[:3]} the model "
                         f"lacks and lacks {sorted(set(names) - set(stored))[:3]}")
    result = CompressionResult(spec=spec, settings=settings)

    def solve(name: str, weight: torch.Tensor, hessian: torch.Tensor | None) -> CompressedLinear:
        layer = stored[name]
        layer.error = output_error(weight, layer.weight().to(weight.device), hessian)
        return layer

    _run_pass(model, spec, calibration_ids, settings, progress, result, solve, compensator)
    return result


def _run_pass(model: nn.Module, spec: Spec, ids: torch.Tensor | None, settings: CalibrationSettings, progress: bool,
              result: CompressionResult, solve: Solver, compensator: Compensator | None) -> None:
    if result.settings is not None:
        _check_calibration_ids(ids, settings)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _compress_layers(model, spec, ids, settings, progress, result, solve, compensator)
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - started


def _check_calibration_ids(ids: torch.Tensor | None, settings: CalibrationSettings) -> None:
    expected = (settings.n_windows, settings.seqlen)
    if ids is None or ids.dim() != 2 or tuple(ids.shape) != expected or ids.is_floating_point():
        got = None if ids is None else f"{tuple(ids.shape)} {ids.dtype}"
        raise ValueError(f"calibration ids must be integer token ids of shape {expected}, got {got}")


PHASES = {  # phase -> what its seconds in ``CompressionResult.phase_seconds`` count
    "capture": "forward of the whole model to the first decoder layer, per calibration window",
    "layer_forwards": "decoder-layer forwards collecting Linear inputs (Hessian time excluded) and layer outputs",
    "hessians": "accumulating H = 2 X X^T / n",
    "solve": "compressing each Linear from its Hessian (GPTQ / SparseGPT sweep, RTN, Wanda, magnitude)",
    "eora": "fitting each Linear's EoRA correction (only with a compensator)",
}


class _Clock:
    """Seconds per phase (``PHASES``), accumulated into ``result.phase_seconds``."""

    def __init__(self, result: CompressionResult) -> None:
        self.seconds = result.phase_seconds
        for phase in PHASES:
            self.seconds.setdefault(phase, 0.0)

    def add(self, phase: str, started: float) -> None:
        self.seconds[phase] += time.perf_counter() - started


def _compress_layers(model: nn.Module, spec: Spec, ids: torch.Tensor | None, settings: CalibrationSettings,
                     progress: bool, result: CompressionResult, solve: Solver, compensator: Compensator | None) -> None:
    """Compress each decoder layer in turn. Linears that read the same tensor share one Hessian (it is the same
    matrix); true-sequential runs one calibration pass per such group, else one pass collects every group's."""
    clock = _Clock(result)
    path, layers = decoder_layers(model)
    calibrated = result.settings is not None
    started = time.perf_counter()
    inputs, calls = _capture_layer_inputs(model, layers, ids) if calibrated else ([], [])
    clock.add("capture", started)
    for index, layer in enumerate(tqdm(layers, desc=f"compress {spec}", unit="layer", disable=not progress)):
        linears = layer_linears(f"{path}.{index}", layer)
        if not calibrated:
            for name, module in linears.items():
                _compress_into(module, name, spec, None, solve, compensator, result, clock)
            continue
        call = calls[index]
        started = time.perf_counter()
        groups = _input_groups(layer, linears, inputs[0], call)
        clock.add("layer_forwards", started)
        passes = [[group] for group in groups] if settings.true_sequential else [groups]
        for pass_groups in passes:
            hessians = _accumulate_hessians(layer, {group[0]: linears[group[0]] for group in pass_groups}, inputs,
                                            call, clock)
            for group in pass_groups:
                for name in group:
                    _compress_into(linears[name], name, spec, hessians[group[0]].matrix, solve, compensator, result,
                                   clock)
        started = time.perf_counter()
        inputs = [_run_layer(layer, hidden, call) for hidden in inputs]
        clock.add("layer_forwards", started)


def _compress_into(module: nn.Module, name: str, spec: Spec, hessian: torch.Tensor | None, solve: Solver,
                   compensator: Compensator | None, result: CompressionResult, clock: _Clock) -> None:
    started = time.perf_counter()
    compressed = solve(name, weight_of(module), hessian)
    weight = compressed.weight().to(weight_of(module).device)
    result.reports.append(LayerReport(name, str(spec), compressed.error, time.perf_counter() - started))
    clock.add("solve", started)
    if compensator is not None:
        started = time.perf_counter()
        weight = compensator.compensate(name, weight_of(module), weight, hessian)
        clock.add("eora", started)
    set_weight(module, weight)
    result.layers[name] = compressed


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has recorded what it needs."""


@dataclass
class _LayerCall:
    """The arguments a decoder layer receives besides its hidden states: positional ones after them (GPT-2 passes
    its cache and mask so) and keyword ones (rotary ``position_embeddings``, ``attention_mask``, ...)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _capture_layer_inputs(model: nn.Module, layers: nn.ModuleList,
                          ids: torch.Tensor) -> tuple[list[torch.Tensor], list[_LayerCall]]:
    """Hidden states ``[1, seqlen, hidden]`` entering the first layer per window, and each layer's other arguments.

    Layers may get different arguments (Gemma, Qwen: a sliding-window mask or local rotary embeddings on some
    layers), so every layer's are recorded, from one forward of the first window that stops before the last
    layer runs. All windows have the same length, so the first window's arguments serve every window.
    """
    inputs: list[torch.Tensor] = []
    calls: list[_LayerCall] = []

    def hook(index: int):
        def record(module: nn.Module, args: tuple, layer_kwargs: dict) -> None:
            layer_kwargs = dict(layer_kwargs)
            hidden = args[0] if args else layer_kwargs.pop("hidden_states")
            if index == 0:
                inputs.append(hidden)
            if len(calls) == index:
                calls.append(_LayerCall(tuple(args[1:]), layer_kwargs))
            if len(inputs) > 1 or index == len(layers) - 1:
                raise _Stop
        return record

    device = next(model.parameters()).device
    handles = [layer.register_forward_pre_hook(hook(index), with_kwargs=True) for index, layer in enumerate(layers)]
    try:
        for window in ids:
            try:
                model(input_ids=window[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs, calls


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: _LayerCall) -> torch.Tensor:
    output = layer(hidden, *call.args, **call.kwargs)
    return output[0] if isinstance(output, tuple) else output


def _input_groups(layer: nn.Module, linears: dict[str, nn.Module], hidden: torch.Tensor,
                  call: _LayerCall) -> list[list[str]]:
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
        _run_layer(layer, hidden, call)
    finally:
        for handle in handles:
            handle.remove()
    missing = set(linears) - {name for group in groups.values() for name in group}
    if missing:
        raise ValueError(f"Linear layers {sorted(missing)} are not called by the decoder layer's forward")
    return list(groups.values())


def _accumulate_hessians(layer: nn.Module, linears: dict[str, nn.Module], inputs: list[torch.Tensor],
                         call: _LayerCall, clock: _Clock) -> dict[str, Hessian]:
    """Run ``layer`` on every input with hooks accumulating each of ``linears``' ``H = 2 X X^T / n``; the rest of
    each forward is skipped once the last of them has been called."""
    hessians = {name: Hessian(in_features(module), module.weight.device) for name, module in linears.items()}
    pending: set[str] = set()

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            started = time.perf_counter()
            hessians[name].add(args[0])
            clock.add("hessians", started)
            pending.discard(name)
            if not pending:
                raise _Stop
        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    started, hessian_before = time.perf_counter(), clock.seconds["hessians"]
    try:
        for hidden in inputs:
            pending.update(linears)
            try:
                _run_layer(layer, hidden, call)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    clock.add("layer_forwards", started)
    clock.seconds["layer_forwards"] -= clock.seconds["hessians"] - hessian_before
    return hessians
