"""Real low-bit CPU kernels (torch int4 / int8 weight-only matmuls) against the simulated model."""

import copy

import pytest
import torch

from cpt_bench.compress import CalibrationSettings, Spec, UnsupportedLayerError, compress_model
from cpt_bench.compress.checkpoints import load_checkpoint
from cpt_bench.compress.kernels import LowBitLinear, swap_in_kernels
from cpt_bench.compress.storage import read_checkpoint, save_compressed
from cpt_bench.models import resident_bytes

from .compress_helpers import _one_thread, random_ids, tiny_llama  # noqa: F401  (_one_thread: autouse fixture)

SETTINGS = CalibrationSettings(n_windows=4, seqlen=32)
# Measured on the tiny Llama (logits up to ~0.64): fp32 activations agree to <= 4e-7 of the logit scale, bf16
# activations to 3.3e-3 .. 4.0e-3 (int4 g32/g64, act-order, 2:4 joint, int8 per-channel).
BF16_TOLERANCE = 2e-2
FP32_TOLERANCE = 1e-5


def compressed(text, tie=False):
    model = tiny_llama(tie=tie)
    result = compress_model(model, Spec.parse(text), random_ids(4, 32), SETTINGS, progress=False)
    return model, result


def relative_logit_error(simulated, real):
    ids = random_ids(2, 32, seed=3)
    with torch.no_grad():
        reference, logits = simulated(ids).logits, real(ids).logits
    return ((logits.float() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize(("text", "mode"), [("gptq-w4g32", "int4 g32"), ("gptq-w4g64", "int4 g64"),
                                            ("gptq-w8", "int8 per-channel"), ("rtn-w8-sym", "int8 per-channel"),
                                            ("gptq-w4g32-actorder", "int4 g32"),
                                            ("sparsegpt-2:4+gptq-w4g64", "int4 g64")])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, BF16_TOLERANCE), (torch.float32, FP32_TOLERANCE)])
def test_real_kernels_agree_with_simulated(text, mode, dtype, tolerance):
    simulated, result = compressed(text)
    real = copy.deepcopy(simulated)
    modes = swap_in_kernels(real, result.layers, dtype)
    assert set(modes.values()) == {mode}
    assert relative_logit_error(simulated, real) < tolerance


def test_per_channel_int4_repeats_the_grid_over_kernel_groups():
    simulated, result = compressed("rtn-w4")  # widths 64 and 128: kernel groups of 64 and 128
    real = copy.deepcopy(simulated)
    assert set(swap_in_kernels(real, result.layers, torch.float32).values()) == {"int4 g64", "int4 g128"}
    assert relative_logit_error(simulated, real) < FP32_TOLERANCE


def test_low_bit_linear_holds_no_float_weight():
    _, result = compressed("gptq-w4g64")
    layer = LowBitLinear("q", result.layers["model.layers.0.self_attn.q_proj"], None, torch.bfloat16)
    assert list(layer.parameters()) == [] and not hasattr(layer, "weight")
    floats = {name: buffer for name, buffer in layer.named_buffers() if buffer.is_floating_point()}
    assert set(floats) == {"scales"} and floats["scales"].numel() == 2 * 64 * 64 // 64  # (scale, offset) per group
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == 64 * 64 // 2
    x = torch.randn(3, 5, 64)
    assert layer(x).shape == (3, 5, 64) and layer(x).dtype == torch.float32


@pytest.mark.parametrize(("text", "layer", "why"), [
    ("gptq-w3g32", "model.layers.0.self_attn.q_proj", "3-bit codes have no CPU kernel"),
    ("rtn-w2g64", "model.layers.0.self_attn.q_proj", "2-bit codes have no CPU kernel"),
    ("sparsegpt-50", "model.layers.0.self_attn.q_proj", "pruned without quantization"),
    ("gptq-w8g64", "model.layers.0.mlp.down_proj", "one scale per output channel"),  # 64-wide inputs: 1 group
])
def test_unsupported_layers_are_refused_or_run_simulated(text, layer, why):
    simulated, result = compressed(text)
    with pytest.raises(UnsupportedLayerError) as caught:
        swap_in_kernels(copy.deepcopy(simulated), result.layers, torch.float32)
    message = str(caught.value)
    assert message.startswith(f"layer {layer}") and why in message and "\n" not in message
    real = copy.deepcopy(simulated)
    modes = swap_in_kernels(real, result.layers, torch.float32, fallback=True)
    assert modes[layer].startswith("simulated (") and why in modes[layer]
    assert all(mode.startswith(("simulated", "int8")) for mode in modes.values())
    assert relative_logit_error(simulated, real) < FP32_TOLERANCE


def test_int4_needs_output_width_multiple_of_16():
    _, result = compressed("gptq-w4g32")
    layer = result.layers["model.layers.0.self_attn.q_proj"]
    layer.quant.codes, layer.quant.scales, layer.quant.zeros = (t[:40] for t in (layer.quant.codes,
                                                                                 layer.quant.scales, layer.quant.zeros))
    with pytest.raises(UnsupportedLayerError, match="divisible by 16, got 40"):
        LowBitLinear("q", layer, None, torch.bfloat16)


def test_real_model_from_a_checkpoint_folder(tmp_path):
    simulated, result = compressed("gptq-w4g64", tie=True)
    save_compressed(simulated, result, tmp_path)
    loaded, modes = load_checkpoint(tmp_path, "simulated")
    real, real_modes = load_checkpoint(tmp_path, "real")  # bf16 by default: the fast path of the int4 kernel
    assert set(modes.values()) == {"simulated"} and set(real_modes.values()) == {"int4 g64"}
    assert real.lm_head.weight is real.model.embed_tokens.weight and real.lm_head.weight.dtype == torch.bfloat16
    assert real.model.layers[0].mlp.up_proj.scales.dtype == torch.bfloat16
    assert not any(isinstance(m, torch.nn.Linear) for n, m in real.model.layers.named_modules())
    assert relative_logit_error(loaded, real) < BF16_TOLERANCE
    packed = sum(buffer.numel() * buffer.element_size() for module in real.modules()
                 if isinstance(module, LowBitLinear) for buffer in module.buffers())
    others = {id(p): p.numel() * p.element_size() for p in real.parameters()}  # embeddings (tied: once), norms
    rotary = sum(b.numel() * b.element_size() for n, b in real.named_buffers() if "rotary" in n)
    assert resident_bytes(real) == packed + sum(others.values()) + rotary
    assert resident_bytes(real) < resident_bytes(loaded) / 2  # simulated: fp32 dequantized weights
    swapped = copy.deepcopy(loaded)
    assert set(swap_in_kernels(swapped, read_checkpoint(tmp_path).layers, torch.bfloat16).values()) == {"int4 g64"}
    assert relative_logit_error(loaded, swapped) < BF16_TOLERANCE
