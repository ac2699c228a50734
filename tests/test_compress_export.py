"""GPTQ-format export: an independent decode of the exported tensors gives back the simulated weights."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import OPTConfig, OPTForCausalLM

from cpt_bench.compress import CalibrationSettings, ExportError, Spec, compress_model, export_gptq
from cpt_bench.compress.export import pack_int32, unpack_int32
from cpt_bench.compress.storage import save_compressed

from .compress_helpers import _one_thread, random_ids, tiny_llama  # noqa: F401  (_one_thread: autouse fixture)

SETTINGS = CalibrationSettings(n_windows=4, seqlen=32)


def compressed_folder(folder, text, model=None):
    model = model or tiny_llama(tie=True)
    result = compress_model(model, Spec.parse(text), random_ids(4, 32), SETTINGS, progress=False)
    save_compressed(model, result, folder)
    model.config.save_pretrained(folder)
    return model, result


def unpack_reference(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Decode ``count`` codes per column of ``words [n_words, cols]`` (int32) the way GPTQ loaders read them:
    code ``i`` starts at bit ``bits * i`` of the column's words taken as one little-endian bit string."""
    unsigned = words.long() & 0xFFFFFFFF
    mask = (1 << bits) - 1
    codes = []
    for i in range(count):
        word, shift = divmod(bits * i, 32)
        value = unsigned[word] >> shift
        if shift + bits > 32:  # a 3-bit code straddling two words
            value = value | (unsigned[word + 1] << (32 - shift))
        codes.append(value & mask)
    return torch.stack(codes)


def decode_layer(tensors: dict, name: str, bits: int, offset: int) -> torch.Tensor:
    """The float32 weight ``[out, in]`` of a GPTQ layer: ``scales[g, o] * (q[i, o] - z[g, o])``, ``g = g_idx[i]``."""
    qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
    scales, g_idx = tensors[f"{name}.scales"].float(), tensors[f"{name}.g_idx"].long()
    q = unpack_reference(qweight, bits, qweight.shape[0] * 32 // bits)  # [in, out]
    z = unpack_reference(qzeros.t(), bits, qzeros.shape[1] * 32 // bits).t() + offset  # [groups, out]
    return ((q - z[g_idx]).float() * scales[g_idx]).t()


@pytest.mark.parametrize("text", ["gptq-w4g64", "gptq-w4g32-actorder", "gptq-w8", "gptq-w3g32", "rtn-w2g64-sym",
                                  "sparsegpt-2:4+gptq-w4g64"])
@pytest.mark.parametrize(("checkpoint_format", "offset"), [("gptq", 1), ("gptq_v2", 0)])
def test_decode_reproduces_simulated_weights(tmp_path, text, checkpoint_format, offset):
    model, result = compressed_folder(tmp_path / "c", text)
    out = export_gptq(tmp_path / "c", tmp_path / "gptq", checkpoint_format)
    tensors = load_file(out / "model.safetensors")
    quant = Spec.parse(text).quantization
    for name, layer in result.layers.items():
        rows, cols = layer.quant.codes.shape
        assert tensors[f"{name}.qweight"].shape == (cols * quant.bits // 32, rows)
        assert tensors[f"{name}.scales"].dtype == torch.float16 and tensors[f"{name}.g_idx"].shape == (cols,)
        assert torch.equal(decode_layer(tensors, name, quant.bits, offset), layer.weight()), name
    assert "lm_head.weight" not in tensors and "model.layers.0.self_attn.q_proj.weight" not in tensors
    assert torch.equal(tensors["model.norm.weight"], model.model.norm.weight.half())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == json.loads((out / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"], config["checkpoint_format"]) == (
        quant.bits, quant.group_size or -1, quant.symmetric, quant.act_order, checkpoint_format)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int32_words_unpack_to_the_packed_codes(bits):
    codes = torch.randint(0, 2**bits, (5, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    words = pack_int32(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (5, 64 * bits // 32)
    assert torch.equal(unpack_int32(words, bits, 64), codes)
    if bits == 4:  # the GPTQ layout: code i in bits 4 * (i % 8) of word i // 8
        assert int(words[0, 0]) & 0xF == int(codes[0, 0]) and (int(words[0, 0]) >> 4) & 0xF == int(codes[0, 1])


def test_zero_point_zero_needs_v2(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.abs_()  # every group's minimum >= 0: zero point 0
    compressed_folder(tmp_path / "c", "rtn-w4g64", model)
    with pytest.raises(ExportError, match="layer model.layers.0.self_attn.q_proj has a zero point of 0"):
        export_gptq(tmp_path / "c", tmp_path / "v1")
    export_gptq(tmp_path / "c", tmp_path / "v2", "gptq_v2")


def test_opt_biases_are_exported(tmp_path):
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64)
    model, _ = compressed_folder(tmp_path / "c", "gptq-w4g32", OPTForCausalLM(config).eval())
    tensors = load_file(export_gptq(tmp_path / "c", tmp_path / "gptq") / "model.safetensors")
    bias = model.model.decoder.layers[0].fc1.bias
    assert torch.equal(tensors["model.decoder.layers.0.fc1.bias"], bias.half())


def test_unquantized_specs_are_refused(tmp_path):
    compressed_folder(tmp_path / "c", "sparsegpt-50")
    with pytest.raises(ExportError, match="does not quantize"):
        export_gptq(tmp_path / "c", tmp_path / "gptq")
    with pytest.raises(ExportError, match="checkpoint format"):
        export_gptq(tmp_path / "c", tmp_path / "gptq", "awq")


def test_a_3_bit_export_from_the_command_line_chooses_gptq_v2(filled_fake_cache, tmp_path, capsys):
    """A grid whose minimum is 0 has a zero point of 0 (common at 3 bits), which v1 cannot hold: the error names
    the flag, and ``--checkpoint-format gptq_v2`` writes the zero points as they are, decoding back to the
    simulated weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_bench.cli import main
    from cpt_bench.compress.storage import read_checkpoint

    from .conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64))  # widths of 32: whole 3-bit words
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.abs_()  # every group's minimum >= 0: zero point 0
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["compress", "--model", str(tmp_path / "model"), "--spec", "gptq-w3g32", "--n-windows", "2", "--seqlen",
            "16", "--out", str(tmp_path / "c"), "--export-gptq"]
    assert main([*argv, str(tmp_path / "v1")]) == 2
    assert capsys.readouterr().err.strip().endswith("export with checkpoint_format 'gptq_v2' (cpt-bench compress "
                                                    "--checkpoint-format gptq_v2)")
    assert main([*argv, str(tmp_path / "v2"), "--checkpoint-format", "gptq_v2"]) == 0
    out = tmp_path / "v2"
    assert f"GPTQ-format export: {out}" in capsys.readouterr().out
    config = json.loads((out / "quantize_config.json").read_text())
    assert config == json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["checkpoint_format"]) == (3, 32, "gptq_v2")
    tensors = load_file(out / "model.safetensors")
    layers = read_checkpoint(tmp_path / "c").layers
    assert len(layers) == 7 and torch.any(layers["model.layers.0.self_attn.q_proj"].quant.zeros == 0)
    for name, layer in layers.items():
        assert torch.equal(decode_layer(tensors, name, 3, 0), layer.weight()), name
