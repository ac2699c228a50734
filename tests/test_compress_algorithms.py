"""Layer-level algorithms on a synthetic layer with correlated, unevenly scaled inputs."""

import math

import pytest
import torch

from cpt_bench.compress.baselines import magnitude, rtn
from cpt_bench.compress.gptq import Hessian, gptq_layer, inverse_cholesky, obs_sweep, output_error, prepare_hessian
from cpt_bench.compress.quant import ColumnQuantizer, fit_grid
from cpt_bench.compress.sequential import compress_linear
from cpt_bench.compress.sparsegpt import pruning_mask, sparsegpt_layer
from cpt_bench.compress.spec import CalibrationSettings, Quantization, Spec, SpecError

from .compress_helpers import _one_thread  # noqa: F401  (_one_thread: autouse fixture)

ROWS, COLS, TOKENS = 64, 256, 2048


@pytest.fixture(scope="module")
def layer():
    """``(W [64, 256], X [2048, 256], H)`` with inputs mixed across features and scaled per feature."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(COLS, COLS, generator=generator) / COLS**0.5 + torch.eye(COLS)
    scale = torch.exp(torch.randn(COLS, generator=generator))
    inputs = (torch.randn(TOKENS, COLS, generator=generator) @ mixing) * scale
    weight = torch.randn(ROWS, COLS, generator=generator) * 0.05
    hessian = Hessian(COLS, torch.device("cpu"))
    for chunk in inputs.split(300):
        hessian.add(chunk)
    return weight, inputs, hessian.matrix


def compress(weight, hessian, text):
    return compress_linear(weight, Spec.parse(text), hessian, CalibrationSettings())


def test_hessian_is_twice_the_mean_outer_product(layer):
    _, inputs, hessian = layer
    torch.testing.assert_close(hessian, 2 * inputs.T @ inputs / TOKENS, rtol=1e-4, atol=1e-3)


def test_output_error_is_mean_squared_output_error(layer):
    weight, inputs, hessian = layer
    other = weight + 0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    direct = ((inputs.double() @ (weight - other).double().T) ** 2).sum() / TOKENS
    assert output_error(weight, other, hessian) == pytest.approx(float(direct), rel=1e-3)


@pytest.mark.parametrize("quant", ["w4g64", "w3g64", "w4", "w3", "w4g32-sym"])
def test_gptq_error_below_rtn(layer, quant):
    weight, _, hessian = layer
    gptq_error = compress(weight, hessian, f"gptq-{quant}").error
    assert gptq_error < compress(weight, hessian, f"rtn-{quant}").error


def test_gptq_matches_column_by_column_obs(layer):
    """Lazy blocks and the Cholesky rows give the same result as re-inverting the Hessian per column."""
    weight, _, hessian = layer
    weight, hessian = weight[:8, :40].double(), hessian[:40, :40].double()
    damped = hessian + 0.01 * torch.diag(hessian).mean() * torch.eye(40, dtype=torch.float64)
    scale, zero = fit_grid(weight, 3, False)
    work, expected = weight.clone(), torch.zeros_like(weight)
    for col in range(40):
        inverse = torch.linalg.inv(damped[col:, col:])
        expected[:, col] = ((torch.round(work[:, col] / scale) + zero).clamp(0, 7) - zero) * scale
        work[:, col:] -= ((work[:, col] - expected[:, col]) / inverse[0, 0])[:, None] * inverse[0:1, :]
    result = gptq_layer(weight.float(), hessian.float(), Quantization("gptq", 3), block_size=16)
    torch.testing.assert_close(result.weight().double(), expected, rtol=0, atol=1e-6)


QUANTIZED = ["rtn-w4g64", "rtn-w2g32-sym", "gptq-w3g64", "gptq-w4g32-actorder", "gptq-w2", "gptq-w8",
             "sparsegpt-50+gptq-w3g32", "sparsegpt-2:4+gptq-w4g64"]


@pytest.mark.parametrize("text", QUANTIZED)
def test_at_most_two_to_the_bits_values_per_row_and_group(layer, text):
    weight, _, hessian = layer
    result = compress(weight, hessian, text)
    quant, dense = result.quant, result.weight()
    assert int(quant.codes.max()) < 2**quant.bits and int(quant.zeros.max()) < 2**quant.bits
    groups = quant.column_groups()
    for group in range(quant.scales.shape[1]):
        for row in dense[:, groups == group]:
            assert row.unique().numel() <= 2**quant.bits


@pytest.fixture(scope="module")
def dominant_layer():
    """``(W [64, 256], H)`` whose inputs have 8 dominant features (20x the others' scale) at random columns: the
    outlier features for which act-order (quantizing the largest-Hessian columns first) is known to help."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(COLS, COLS, generator=generator) / COLS**0.5 + torch.eye(COLS)
    scale = torch.ones(COLS)
    scale[torch.randperm(COLS, generator=generator)[:8]] = 20.0
    inputs = (torch.randn(TOKENS, COLS, generator=generator) @ mixing) * scale
    weight = torch.randn(ROWS, COLS, generator=generator) * 0.05
    hessian = Hessian(COLS, torch.device("cpu"))
    hessian.add(inputs)
    return weight, hessian.matrix


def test_act_order_groups_and_error(dominant_layer):
    weight, hessian = dominant_layer
    plain = compress(weight, hessian, "gptq-w4g64")
    ordered = compress(weight, hessian, "gptq-w4g64-actorder")
    g_idx = ordered.quant.g_idx
    assert plain.quant.g_idx is None
    assert g_idx.shape == (COLS,) and g_idx.dtype == torch.int32
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((COLS // 64,), 64))
    order = torch.argsort(torch.diag(hessian), descending=True)
    assert torch.equal(g_idx[order].long(), torch.arange(COLS) // 64)
    # measured: act-order's error is 0.40-0.51 of plain GPTQ's on this layer over seeds 0-4 (0.43 here)
    assert ordered.error < 0.7 * plain.error


@pytest.mark.parametrize("pattern", ["50", "2:4", "4:8"])
def test_sparsegpt_below_magnitude_and_wanda_at_most_magnitude(layer, pattern):
    weight, _, hessian = layer
    magnitude_error = compress(weight, hessian, f"magnitude-{pattern}").error
    assert compress(weight, hessian, f"sparsegpt-{pattern}").error < magnitude_error
    assert compress(weight, hessian, f"wanda-{pattern}").error <= magnitude_error


@pytest.mark.parametrize("text", ["sparsegpt-50", "sparsegpt-30", "sparsegpt-75+gptq-w4g64", "magnitude-50",
                                  "magnitude-37", "wanda-50", "wanda-70", "sparsegpt-50+gptq-w3"])
def test_unstructured_sparsity_is_exact(layer, text):
    weight, _, hessian = layer
    result = compress(weight, hessian, text)
    fraction = Spec.parse(text).pruning.fraction
    blocks = COLS // 128 if text.startswith("sparsegpt") else ROWS if text.startswith("wanda") else 1
    assert abs(result.pruned.sum().item() - fraction * weight.numel()) <= blocks / 2
    assert torch.all(result.weight()[result.pruned] == 0)
    if text.startswith("wanda"):  # per output row
        assert torch.all(result.pruned.sum(1) == round(fraction * COLS))


@pytest.mark.parametrize("text", ["sparsegpt-2:4", "sparsegpt-4:8", "magnitude-2:4", "wanda-4:8",
                                  "sparsegpt-2:4+gptq-w4g64", "sparsegpt-4:8+gptq-w2g32-sym"])
def test_nm_sparsity_is_exact(layer, text):
    weight, _, hessian = layer
    pruning = Spec.parse(text).pruning
    result = compress(weight, hessian, text)
    windows = result.weight().reshape(ROWS, COLS // pruning.m, pruning.m)
    assert torch.all((windows == 0).sum(-1) >= pruning.m - pruning.n)
    assert torch.all(result.pruned.reshape(windows.shape).sum(-1) == pruning.m - pruning.n)


def test_joint_quantization_keeps_pruned_weights_exactly_zero(layer):
    weight, _, hessian = layer
    result = sparsegpt_layer(weight, hessian, Spec.parse("sparsegpt-50").pruning, Quantization("gptq", 3, 32))
    dense = result.weight()
    assert torch.all(dense[result.pruned] == 0) and not torch.signbit(dense[result.pruned]).any()
    assert torch.equal(result.quant.dequantize()[result.pruned], torch.zeros(int(result.pruned.sum())))
    sparse_only = compress(weight, hessian, "sparsegpt-50")
    assert sparse_only.error < result.error < compress(weight, hessian, "magnitude-50").error


def test_dead_inputs_give_finite_weights(layer):
    weight, inputs, _ = layer
    inputs = inputs.clone()
    inputs[:, :16] = 0
    hessian = 2 * inputs.T @ inputs / TOKENS
    for text in ("gptq-w4g64-actorder", "sparsegpt-2:4+gptq-w4g64", "wanda-50"):
        result = compress(weight, hessian, text)
        assert torch.isfinite(result.weight()).all() and math.isfinite(result.error)


def test_block_size_must_hold_whole_groups(layer):
    weight, _, hessian = layer
    with pytest.raises(SpecError, match="block size 96 .* 64"):
        gptq_layer(weight, hessian, Quantization("gptq", 4, 64), block_size=96)


def test_rtn_and_magnitude_need_no_hessian(layer):
    weight, _, _ = layer
    assert rtn(weight, Quantization("rtn", 4, 64)).error is None
    assert magnitude(weight, Spec.parse("magnitude-50").pruning).error is None


@pytest.mark.parametrize("prune", [False, True])
def test_sweep_values_are_the_codes_dequantized(layer, prune):
    """The sweep's returned weights (rebuilt from the codes at the end) equal each column's quantized value as it
    was used for the error update: exactly what the stored codes give, pruned weights exactly 0."""
    weight, _, hessian = layer
    work = weight.clone()
    hinv = inverse_cholesky(prepare_hessian(hessian, work, 0.01))
    quantizer = ColumnQuantizer(tuple(work.shape), 3, 32, False, work.device)
    mask = (lambda scores: pruning_mask(scores, Spec.parse("sparsegpt-50").pruning)) if prune else None
    compressed, pruned = obs_sweep(work, hinv, 128, quantizer, prune=mask, prune_period=128 if prune else None)
    assert torch.equal(compressed, quantizer.result().dequantize().masked_fill(pruned, 0.0))
    assert bool(pruned.any()) == prune and not compressed[pruned].any()
