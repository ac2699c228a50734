"""Which modules of a decoder-only causal LM are compressed, across model families, and their weights.

The decoder layers are found generically: the one ``nn.ModuleList`` whose items are all of one class the model
names in its own ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``, ``GPTNeoXLayer``, ...; several
such lists, as in a model with a vision tower, are narrowed to the one with ``num_hidden_layers`` items). Inside
them the compressed modules are the ``nn.Linear`` and the transformers ``Conv1D`` layers (GPT-2), whose weight
is stored transposed, ``[in, out]``. Everything in this package sees a compressed module's weight as
``[out, in]`` (``weight_of``, ``set_weight``, ``state_weight``); storage, kernels and the GPTQ export hold that
orientation, which both module kinds compute as ``y = x W^T + b``.

A decoder layer holding a weight matrix in a module of another kind (Mixtral's ``MixtralExperts`` keeps its
experts as 3-D parameters) is refused in one line naming that module's type rather than compressed partly.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from cpt_bench.errors import UserError

COMPRESSIBLE_TYPES = (nn.Linear, Conv1D)


class UnsupportedModelError(UserError):
    """A model whose decoder layers or weight-holding modules the compression engine does not know (one line)."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and the list of decoder layers of ``model`` (see the module docstring)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [(path, module) for path, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
             and type(module[0]).__name__ in names]
    if len(found) > 1:
        depth = getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", None)
        found = [(path, module) for path, module in found if len(module) == depth] or found
    if len(found) != 1:
        where = f"found {', '.join(path for path, _ in found)}" if found else "found none"
        raise UnsupportedModelError(f"cannot find the decoder layers of {type(model).__name__}: expected one "
                                    f"nn.ModuleList of its _no_split_modules {sorted(names)}, {where}")
    return found[0]


def layer_linears(prefix: str, layer: nn.Module) -> dict[str, nn.Module]:
    """The compressible modules of one decoder layer, named ``<prefix>.<name in layer>``, in definition order.

    Raises ``UnsupportedModelError`` for a weight matrix (a parameter of 2 or more dimensions) held by a
    module of another kind.
    """
    modules = {}
    for name, module in layer.named_modules():
        if isinstance(module, COMPRESSIBLE_TYPES):
            modules[f"{prefix}.{name}"] = module
        elif any(param.dim() >= 2 for param in module.parameters(recurse=False)):
            raise UnsupportedModelError(
                f"decoder layer {type(layer).__name__} holds weights in {type(module).__name__} ({prefix}.{name}), "
                "which the compression engine does not know; it compresses nn.Linear and transformers Conv1D")
    if not modules:
        raise UnsupportedModelError(f"decoder layer {type(layer).__name__} has no nn.Linear or Conv1D layer to "
                                    "compress")
    return modules


def compressible_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear / Conv1D modules inside decoder layers, by full module name, in layer order."""
    path, layers = decoder_layers(model)
    modules: dict[str, nn.Module] = {}
    for index, layer in enumerate(layers):
        modules.update(layer_linears(f"{path}.{index}", layer))
    return modules


def in_features(module: nn.Module) -> int:
    """Input width of a Linear or Conv1D."""
    return module.nx if isinstance(module, Conv1D) else module.in_features


def weight_of(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, in]`` (a view of the parameter's data; transposed for Conv1D)."""
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


def state_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` in the module's own state-dict layout (``[in, out]``, contiguous, for Conv1D)."""
    return weight.t().contiguous() if isinstance(module, Conv1D) else weight


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy ``weight [out, in]`` into the module's weight in place."""
    weight_of(module).copy_(weight)
