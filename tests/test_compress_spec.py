"""The compression spec grammar: parsing, canonical round trip, one-line errors, fitting layer widths."""

import pytest

from cpt_bench.compress.spec import Pruning, Quantization, Spec, SpecError
from cpt_bench.errors import UserError

EXAMPLES = [
    "dense",
    "rtn-w4g64",
    "rtn-w3g64",
    "gptq-w4g64",
    "gptq-w3g64-actorder",
    "gptq-w2g32",
    "gptq-w8",
    "gptq-w4g128-sym",
    "sparsegpt-50",
    "sparsegpt-2:4",
    "sparsegpt-4:8",
    "magnitude-50",
    "wanda-50",
    "wanda-2:4",
    "sparsegpt-50+gptq-w4g64",
    "sparsegpt-2:4+gptq-w4g64",
]

BAD = [
    "gptq-w5g64",
    "gptq-w4g100",
    "sparsegpt-95",
    "sparsegpt-3:4",
    "foo",
    "",
    "Dense",
    "gptq-w4g064",
    "gptq-w4-sym-sym",
    "rtn-w4g64-actorder",
    "wanda-50+gptq-w4g64",
    "sparsegpt-50+rtn-w4g64",
    "gptq-w4g64+sparsegpt-50",
    "sparsegpt-50+gptq-w4g64-actorder",
    "sparsegpt-50+",
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_parse_and_round_trip(text):
    spec = Spec.parse(text)
    assert str(spec) == text
    assert Spec.parse(str(spec)) == spec


def test_parsed_fields():
    assert Spec.parse("dense") == Spec() and Spec().is_dense and not Spec().needs_calibration
    assert Spec.parse("gptq-w4g128-sym").quantization == Quantization("gptq", 4, 128, symmetric=True)
    assert Spec.parse("gptq-w8").quantization.group_size is None
    assert Spec.parse("gptq-w3g64-actorder").quantization.act_order
    assert Spec.parse("sparsegpt-2:4").pruning == Pruning("sparsegpt", n=2, m=4)
    assert Spec.parse("sparsegpt-4:8").pruning.fraction == 0.5
    assert Spec.parse("magnitude-50").pruning.fraction == 0.5
    joint = Spec.parse("sparsegpt-50+gptq-w4g64")
    assert joint.pruning == Pruning("sparsegpt", sparsity=50)
    assert joint.quantization == Quantization("gptq", 4, 64)
    assert joint.methods == {"sparsegpt", "gptq"}
    assert not Spec.parse("rtn-w4g64").needs_calibration and not Spec.parse("magnitude-2:4").needs_calibration
    assert Spec.parse("wanda-50").needs_calibration and Spec.parse("gptq-w8").needs_calibration


@pytest.mark.parametrize("text", BAD)
def test_bad_specs_raise_one_line(text):
    with pytest.raises(SpecError) as caught:
        Spec.parse(text)
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    assert "\n" not in message
    assert repr(text) in message
    assert "valid:" in message and "(rtn|gptq)-w<2|3|4|8>" in message


def test_out_of_range_messages_name_the_value():
    assert "bits 5" in str(pytest.raises(SpecError, Spec.parse, "gptq-w5g64").value)
    assert "group size 100" in str(pytest.raises(SpecError, Spec.parse, "gptq-w4g100").value)
    assert "95%" in str(pytest.raises(SpecError, Spec.parse, "sparsegpt-95").value)
    assert "3:4" in str(pytest.raises(SpecError, Spec.parse, "sparsegpt-3:4").value)
    with pytest.raises(SpecError, match="bits 16"):
        Quantization("rtn", 16)
    with pytest.raises(SpecError, match="sparsity 91%"):
        Pruning("magnitude", sparsity=91)


def test_sparsity_range_bounds():
    assert Spec.parse("magnitude-0").pruning.fraction == 0
    assert Spec.parse("wanda-90").pruning.fraction == 0.9


SMOLLM2_WIDTHS = {  # input widths of SmolLM2-135M's decoder Linears: hidden 576, intermediate 1536
    "model.layers.0.self_attn.q_proj": 576,
    "model.layers.0.self_attn.o_proj": 576,
    "model.layers.0.mlp.gate_proj": 576,
    "model.layers.0.mlp.down_proj": 1536,
}


def test_group_size_must_divide_every_layer_width():
    Spec.parse("gptq-w4g64").check_fits(SMOLLM2_WIDTHS)
    Spec.parse("sparsegpt-2:4+gptq-w4g32").check_fits(SMOLLM2_WIDTHS)
    with pytest.raises(SpecError) as caught:
        Spec.parse("gptq-w4g128").check_fits(SMOLLM2_WIDTHS)
    message = str(caught.value)
    assert "model.layers.0.self_attn.q_proj" in message and "576" in message and "128" in message
    assert "\n" not in message


def test_nm_pattern_must_divide_layer_width():
    with pytest.raises(SpecError, match="layer fc.*4:8|4:8.*layer fc"):
        Spec.parse("wanda-4:8").check_fits({"fc": 60})
