"""Saving and loading compressed checkpoints: packing, bit-exact round trip, memory account, integrity."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import OPTConfig, OPTForCausalLM

from cpt_bench.compress import (
    CalibrationSettings,
    Spec,
    StorageError,
    compress_model,
    load_checkpoint,
    read_manifest,
    save_compressed,
)
from cpt_bench.compress.sequential import compressible_linears
from cpt_bench.compress.storage import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, pack_bits, unpack_bits

from .compress_helpers import _one_thread, random_ids, tiny_llama  # noqa: F401  (_one_thread: autouse fixture)

SETTINGS = CalibrationSettings(n_windows=4, seqlen=32)


def compressed(text, dtype=torch.float32, tie=True):
    model = tiny_llama(tie=tie, dtype=dtype)
    result = compress_model(model, Spec.parse(text), random_ids(4, 32), SETTINGS, progress=False)
    return model, result


def reloaded(folder, dtype=torch.float32):
    """The model of a folder written by ``save_compressed`` (its own config.json), simulated, in ``dtype``."""
    return load_checkpoint(folder, dtype=dtype)[0]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_bits_round_trip(bits):
    generator = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (1001,), generator=generator, dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), values)


def test_eight_bit_codes_are_plain_bytes():
    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_bits(values, 8), values)


@pytest.mark.parametrize("text", ["gptq-w4g64", "gptq-w3g32-actorder", "rtn-w2g32-sym", "gptq-w8",
                                  "sparsegpt-2:4+gptq-w4g64", "sparsegpt-50+gptq-w3g64", "dense"])
def test_round_trip_is_bit_exact(tmp_path, text):
    model, result = compressed(text)
    save_compressed(model, result, tmp_path)
    loaded = reloaded(tmp_path)
    compressed_weights = {f"{name}.weight" for name in result.layers}
    for name, tensor in model.state_dict().items():  # the rest of a float32 model is stored in fp16
        expected = tensor if name in compressed_weights else tensor.half().float()
        assert torch.equal(loaded.state_dict()[name], expected), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("text", ["sparsegpt-50", "magnitude-2:4", "wanda-4:8", "sparsegpt-2:4+gptq-w4g64"])
def test_bf16_model_round_trip_is_exact_everywhere(tmp_path, text):
    model, result = compressed(text, dtype=torch.bfloat16, tie=False)
    save_compressed(model, result, tmp_path)
    loaded = reloaded(tmp_path, torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("text", ["sparsegpt-2:4+gptq-w4g64", "sparsegpt-4:8", "sparsegpt-60+gptq-w3g32"])
def test_sparsity_survives_save_and_load(tmp_path, text):
    model, result = compressed(text)
    save_compressed(model, result, tmp_path)
    loaded = reloaded(tmp_path)
    pruning = Spec.parse(text).pruning
    for name, module in compressible_linears(loaded).items():
        weight, pruned = module.weight, result.layers[name].pruned
        assert torch.all(weight[pruned] == 0)
        if pruning.m:
            windows = (weight == 0).reshape(weight.shape[0], -1, pruning.m)
            assert torch.all(windows.sum(-1) >= pruning.m - pruning.n)
        else:
            assert abs(pruned.float().mean().item() - pruning.fraction) < 0.01


@pytest.mark.parametrize("text", ["gptq-w4g64", "sparsegpt-50", "sparsegpt-2:4+gptq-w4g64",
                                  "gptq-w3g32-actorder"])
def test_memory_account_counts_the_tensors_written(tmp_path, text):
    model, result = compressed(text)
    save_compressed(model, result, tmp_path)
    manifest = read_manifest(tmp_path)
    with safe_open(tmp_path / WEIGHTS_FILE, "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    sizes = {key: tensor.numel() * tensor.element_size() for key, tensor in tensors.items()}
    memory = manifest["memory"]
    assert memory["stored_bytes"] == sum(sizes.values())
    owner = {key: key.rpartition(".")[0].removesuffix(".weight") for key in sizes}  # <module>.weight.<part>
    layer_keys = [key for key in sizes if owner[key] in manifest["layers"]]
    assert memory["compressed_layer_bytes"] == sum(sizes[key] for key in layer_keys)
    for name, meta in manifest["layers"].items():
        assert meta["bytes"] == sum(size for key, size in sizes.items() if owner[key] == name)
    dense = sum(tensor.numel() * 2 for name, tensor in model.state_dict().items() if name != "lm_head.weight")
    assert memory["dense_fp16_bytes"] == dense
    assert memory["ratio_to_dense_fp16"] == pytest.approx(memory["stored_bytes"] / dense)
    assert memory["stored_bytes"] < dense
    assert "lm_head.weight" not in sizes
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_bits_per_weight(tmp_path):
    model, result = compressed("sparsegpt-2:4+gptq-w4g64")
    save_compressed(model, result, tmp_path)
    meta = read_manifest(tmp_path)["layers"]["model.layers.0.self_attn.q_proj"]
    # half the 4-bit codes + 1 mask bit + per 64 weights one fp16 scale and one 4-bit zero
    assert meta["bits_per_weight"] == pytest.approx(2 + 1 + (16 + 4) / 64)
    assert meta["sparsity"] == 0.5 and meta["bits"] == 4 and meta["group_size"] == 64


def test_manifest_records_spec_settings_and_reports(tmp_path):
    model, result = compressed("gptq-w4g64")
    path = save_compressed(model, result, tmp_path)
    assert path == tmp_path / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    assert manifest["spec"] == "gptq-w4g64" and manifest["calibration"]["n_windows"] == 4
    assert manifest["total_seconds"] == result.seconds
    for report in result.reports:
        assert manifest["layers"][report.name]["error"] == report.error
        assert manifest["layers"][report.name]["seconds"] == report.seconds
    assert len(manifest["files"][WEIGHTS_FILE]["sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE, CONFIG_FILE, WEIGHTS_FILE]  # no temp files


def test_opt_with_biases_round_trip(tmp_path):
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)
    model = OPTForCausalLM(config).half().eval()
    result = compress_model(model, Spec.parse("sparsegpt-2:4+gptq-w4g32"), random_ids(4, 32), SETTINGS,
                            progress=False)
    save_compressed(model, result, tmp_path)
    loaded = reloaded(tmp_path, torch.float16)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_corrupted_weights_are_refused(tmp_path):
    model, result = compressed("rtn-w4g64")
    save_compressed(model, result, tmp_path)
    data = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 1
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(StorageError) as caught:
        reloaded(tmp_path)
    assert "corrupted" in str(caught.value) and WEIGHTS_FILE in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_checkpoint_and_wrong_model_are_refused(tmp_path):
    with pytest.raises(StorageError, match="cannot read"):
        reloaded(tmp_path)
    model, result = compressed("rtn-w4g64")
    save_compressed(model, result, tmp_path)
    tiny_llama(tie=False).config.save_pretrained(tmp_path)  # a config.json of another (untied) model
    with pytest.raises(StorageError, match="does not match"):
        reloaded(tmp_path)


def _set_every_layer(manifest: dict, field: str, value) -> dict:
    for meta in manifest["layers"].values():
        meta[field] = value
    return manifest


@pytest.mark.parametrize("saved, edit, says, shows", [
    ("rtn-w4g32", lambda m: m | {"spec": "rtn-w3g32"}, "bits: compression.json says 3 (spec rtn-w3g32)",
     "show 4-bit codes"),
    ("rtn-w4g32", lambda m: _set_every_layer(m | {"spec": "rtn-w3g32"}, "bits", 3),
     "bits: compression.json says 3 (spec rtn-w3g32)", "show 4-bit codes"),
    ("rtn-w4g32", lambda m: m | {"spec": "rtn-w4g64"}, "group size: compression.json says 64 (spec rtn-w4g64)",
     "show 2 groups per row of 64 columns"),
    ("rtn-w4g32", lambda m: _set_every_layer(m, "group_size", None), "group size: compression.json says none",
     "show 2 groups per row of 64 columns"),
    ("magnitude-50", lambda m: m | {"spec": "magnitude-70"}, "sparsity: compression.json says 70.0% (spec "
     "magnitude-70)", "show 50.0% pruned"),
    ("magnitude-50", lambda m: m | {"spec": "magnitude-2:4"}, "sparsity: compression.json says 2:4", "windows of 4"),
    ("magnitude-50", lambda m: _set_every_layer(m, "sparsity", 0.6), "sparsity: compression.json says 60.0% "
     "(layers.", "show 50.0% pruned"),
    ("rtn-w4g32", lambda m: m | {"spec": "sparsegpt-50+gptq-w4g32"}, "pruning: compression.json says spec "
     "sparsegpt-50+gptq-w4g32", "show no keep mask"),
    ("magnitude-50", lambda m: m | {"spec": "sparsegpt-50+gptq-w4g32"}, "quantization", "show no codes"),
])
def test_a_record_that_says_other_than_its_weights_is_refused(tmp_path, saved, edit, says, shows):
    model, result = compressed(saved)
    save_compressed(model, result, tmp_path)
    reloaded(tmp_path)  # as written, it loads
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(edit(manifest)))
    with pytest.raises(StorageError) as caught:
        reloaded(tmp_path)
    message = str(caught.value)
    assert says in message and shows in message and "\n" not in message, message
