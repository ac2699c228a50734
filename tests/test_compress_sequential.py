"""Layer-by-layer compression of a whole (tiny, random) Llama and OPT."""

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from cpt_bench.compress import CalibrationSettings, Spec, SpecError, compress_model
from cpt_bench.compress.calibration import CalibrationError, calibration_windows
from cpt_bench.compress.gptq import Hessian, gptq_layer
from cpt_bench.compress.sequential import PHASES, check_model, compressible_linears
from cpt_bench.errors import UserError

from .compress_helpers import _one_thread, random_ids, tiny_llama  # noqa: F401  (_one_thread: autouse fixture)

SETTINGS = CalibrationSettings(n_windows=4, seqlen=32)
LINEAR_ORDER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def ids():
    return random_ids(SETTINGS.n_windows, SETTINGS.seqlen)


@pytest.mark.parametrize(
    "changes",
    [{"n_windows": 0}, {"seqlen": -1}, {"block_size": 1.5}, {"seed": -1}, {"dampening": 0},
     {"dampening": "0.01"}, {"true_sequential": "yes"}, {"n_windows": True}, {"corpus": "klingon"}, {"corpus": []}],
)
def test_settings_are_validated(changes):
    with pytest.raises(UserError) as caught:
        CalibrationSettings(**changes)
    name = next(iter(changes))
    assert f"calibration setting {name}" in str(caught.value) and "\n" not in str(caught.value)


def test_defaults():
    assert CalibrationSettings() == CalibrationSettings(128, 1024, 0, 0.01, 128, True, "wikipedia")


def test_calibration_windows_are_seeded_slices():
    tokens = torch.arange(1000)
    settings = CalibrationSettings(n_windows=5, seqlen=16, seed=3)
    windows = calibration_windows(tokens, settings)
    assert windows.shape == (5, 16) and windows.dtype == torch.int64
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones(5, 15, dtype=torch.int64))
    assert torch.equal(windows, calibration_windows(tokens, settings))
    with pytest.raises(CalibrationError, match="at least 17 tokens"):
        calibration_windows(torch.arange(16), settings)
    assert windows[:, 0].max() <= 1000 - 16 - 1  # starts drawn as in GPTQ: randint(0, n - seqlen - 1)


def test_group_size_is_checked_against_the_model():
    model = tiny_llama()
    check_model(model, Spec.parse("gptq-w4g64"), SETTINGS)
    with pytest.raises(SpecError) as caught:
        check_model(model, Spec.parse("gptq-w4g128"))
    assert "model.layers.0.self_attn.q_proj" in str(caught.value) and "width 64" in str(caught.value)
    with pytest.raises(SpecError, match="block size 96"):
        check_model(model, Spec.parse("gptq-w4g64"), CalibrationSettings(block_size=96))
    check_model(model, Spec.parse("rtn-w4g64"), CalibrationSettings(block_size=96))


def test_only_decoder_linears_are_compressible():
    names = list(compressible_linears(tiny_llama()))
    assert names == [f"model.layers.{layer}.{name}" for layer in range(2) for name in LINEAR_ORDER]


def test_dense_leaves_the_model_untouched(ids):
    model = tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = compress_model(model, Spec.parse("dense"), ids, SETTINGS, progress=False)
    assert result.layers == {} and result.reports == [] and result.settings is None
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("text", ["gptq-w4g64", "gptq-w3g32-actorder", "sparsegpt-50",
                                  "sparsegpt-2:4+gptq-w4g64", "wanda-50", "rtn-w4g64", "magnitude-2:4"])
def test_whole_model_compression(ids, text):
    model = tiny_llama()
    embeddings, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    spec = Spec.parse(text)
    result = compress_model(model, spec, ids if spec.needs_calibration else None, SETTINGS, progress=False)
    expected = [f"model.layers.{layer}.{name}" for layer in range(2) for name in LINEAR_ORDER]
    assert [report.name for report in result.reports] == expected and list(result.layers) == expected
    assert all(report.method == text and report.seconds >= 0 for report in result.reports)
    assert all((report.error is not None) == spec.needs_calibration for report in result.reports)
    assert result.settings == (SETTINGS if spec.needs_calibration else None) and result.seconds > 0
    for name, module in compressible_linears(model).items():
        assert torch.equal(module.weight, result.layers[name].weight())
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert torch.equal(model.lm_head.weight, head)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_true_sequential_and_all_at_once_both_run(ids):
    final = {}
    for true_sequential in (True, False):
        model = tiny_llama()
        settings = CalibrationSettings(n_windows=4, seqlen=32, true_sequential=true_sequential)
        result = compress_model(model, Spec.parse("gptq-w3g32"), ids, settings, progress=False)
        assert len(result.reports) == 14 and all(report.error >= 0 for report in result.reports)
        final[true_sequential] = model.model.layers[1].mlp.down_proj.weight.clone()
    # Layer 0's q/k/v see the same inputs either way; later Linears see compressed outputs only if sequential.
    assert not torch.equal(final[True], final[False])


def test_calibration_shape_must_match_settings(ids):
    with pytest.raises(ValueError, match=r"shape \(4, 32\)"):
        compress_model(tiny_llama(), Spec.parse("gptq-w4g64"), ids[:, :16], SETTINGS, progress=False)
    with pytest.raises(ValueError, match="got None"):
        compress_model(tiny_llama(), Spec.parse("wanda-50"), None, SETTINGS, progress=False)


def test_opt_decoder_layers(ids):
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)
    model = OPTForCausalLM(config).eval()
    result = compress_model(model, Spec.parse("sparsegpt-2:4+gptq-w4g32"), ids, SETTINGS, progress=False)
    names = [report.name.removeprefix("model.decoder.layers.0.") for report in result.reports[:6]]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "fc1", "fc2"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_linears_reading_one_tensor_share_the_hessian_of_their_own_inputs(ids):
    """Layer 0 all at once: each Linear is compressed as GPTQ on the Hessian of the inputs it receives in the dense
    model (q, k and v get one shared matrix: it must equal each one's own)."""
    dense, model = tiny_llama(), tiny_llama()
    settings = CalibrationSettings(n_windows=4, seqlen=32, true_sequential=False)
    result = compress_model(model, Spec.parse("gptq-w3g32"), ids, settings, progress=False)
    layer = dense.model.layers[0]
    linears = {name: layer.get_submodule(name) for name in LINEAR_ORDER}
    hessians = {name: Hessian(module.in_features, torch.device("cpu")) for name, module in linears.items()}
    handles = [module.register_forward_pre_hook(lambda module, args, name=name: hessians[name].add(args[0]))
               for name, module in linears.items()]
    with torch.no_grad():
        for window in ids:
            dense(window[None])
    for handle in handles:
        handle.remove()
    for name, module in linears.items():
        expected = gptq_layer(module.weight.detach(), hessians[name].matrix, Spec.parse("gptq-w3g32").quantization)
        assert torch.equal(result.layers[f"model.layers.0.{name}"].weight(), expected.weight()), name


def test_phase_seconds_cover_the_compression(ids):
    result = compress_model(tiny_llama(), Spec.parse("gptq-w4g64"), ids, SETTINGS, progress=False)
    assert set(result.phase_seconds) == set(PHASES) and all(s >= 0 for s in result.phase_seconds.values())
    assert sum(result.phase_seconds.values()) <= result.seconds
