"""GPTQ folders written elsewhere: our own exports of both formats re-import to the same weights and logits, the
cache path behind ``compression=<folder>``, and one-line refusals of what cannot be read."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import OPTConfig, OPTForCausalLM

from cpt_bench.compress import CalibrationSettings, Spec, compress_model, export_gptq, load_checkpoint
from cpt_bench.compress.gptq_import import GptqImportError, import_gptq, read_gptq_config
from cpt_bench.compress.storage import read_checkpoint, read_manifest, save_compressed
from cpt_bench.models import CheckpointFolder, GptqFolder, load_model, parse_compression

from .compress_helpers import _one_thread, random_ids, tiny_llama  # noqa: F401  (_one_thread: autouse fixture)
from .conftest import build_tiny_tokenizer

SETTINGS = CalibrationSettings(n_windows=4, seqlen=32)
IDS = random_ids(2, 16, seed=3)


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64)
    return OPTForCausalLM(config).eval()


FAMILIES = {"llama": lambda: tiny_llama(tie=True), "opt": tiny_opt}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each family's dense base model saved as a model folder with a tokenizer."""
    folders = {}
    for family, build in FAMILIES.items():
        folder = tmp_path_factory.mktemp(f"base-{family}")
        build().save_pretrained(folder)
        build_tiny_tokenizer().save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """``(family, spec) -> checkpoint folder`` of the suite's own compression, built once per module."""
    made = {}

    def make(family: str, text: str):
        if (family, text) not in made:
            folder = tmp_path_factory.mktemp("ckpt")
            model = FAMILIES[family]()
            result = compress_model(model, Spec.parse(text), random_ids(4, 32), SETTINGS, progress=False)
            save_compressed(model, result, folder)
            model.config.save_pretrained(folder)
            made[family, text] = folder
        return made[family, text]

    return make


def logits(folder) -> torch.Tensor:
    model, _ = load_checkpoint(folder)
    with torch.no_grad():
        return model(IDS).logits


def assert_same_model(original, imported):
    ours, theirs = read_checkpoint(original), read_checkpoint(imported)
    assert set(ours.layers) == set(theirs.layers)
    for name, layer in ours.layers.items():
        assert torch.equal(theirs.layers[name].weight(), layer.weight()), name
    assert torch.equal(logits(imported), logits(original))


@pytest.mark.parametrize(("family", "text", "checkpoint_format"), [
    ("llama", "rtn-w4g32", "gptq"),
    ("llama", "gptq-w4g32-actorder", "gptq_v2"),
    ("llama", "gptq-w4-sym", "gptq"),
    ("llama", "gptq-w8-actorder", "gptq"),
    ("llama", "gptq-w3g32-sym-actorder", "gptq_v2"),
    ("llama", "rtn-w2g64", "gptq_v2"),
    ("llama", "sparsegpt-2:4+gptq-w4g64", "gptq_v2"),
    ("opt", "gptq-w4g32-sym-actorder", "gptq"),
    ("opt", "rtn-w3", "gptq_v2"),
])
def test_an_export_reimports_to_identical_weights_and_logits(bases, compressed, tmp_path, family, text,
                                                             checkpoint_format):
    original = compressed(family, text)
    exported = export_gptq(original, tmp_path / "gptq", checkpoint_format)
    summary = import_gptq(exported, bases[family], tmp_path / "imported")
    assert_same_model(original, tmp_path / "imported")
    quant = Spec.parse(text).quantization
    manifest = read_manifest(tmp_path / "imported")
    assert Spec.parse(manifest["spec"]).quantization.bits == quant.bits
    assert manifest["imported"]["checkpoint_format"] == checkpoint_format == summary["checkpoint_format"]
    assert manifest["base_model"]["name"] == str(bases[family])
    orders = [layer.quant.g_idx is not None for layer in read_checkpoint(tmp_path / "imported").layers.values()]
    assert any(orders) == bool(quant.act_order and quant.group_size)  # act order with groups: g_idx read


def test_a_sharded_export_loads_as_compression_folder(bases, compressed, fake_cache, tmp_path):
    original = compressed("llama", "gptq-w4g32-actorder")
    exported = export_gptq(original, tmp_path / "gptq", "gptq_v2", max_shard_bytes=20_000)
    shards = sorted(path.name for path in exported.glob("*.safetensors"))
    assert len(shards) > 1 and (exported / "model.safetensors.index.json").is_file(), shards
    assert parse_compression(str(exported)) == GptqFolder(exported)
    loaded = load_model(str(bases["llama"]), str(exported), device="cpu")
    assert loaded.compression == "gptq-w4g32-actorder" and loaded.checkpoint.parent.name == "imported"
    again = load_model(str(bases["llama"]), str(exported), device="cpu")
    assert again.checkpoint == loaded.checkpoint  # converted once, then read from the cache
    with torch.no_grad():
        ours = load_model(str(bases["llama"]), CheckpointFolder(original), device="cpu").model(IDS).logits
        assert torch.equal(loaded.model(IDS).logits, ours)


@pytest.fixture
def export_v1(compressed, tmp_path):
    """An asymmetric v1 export of the tiny Llama, to be damaged by each bad-input test."""
    return export_gptq(compressed("llama", "rtn-w4g32"), tmp_path / "gptq", "gptq")


def edit_settings(folder, **changes):
    for name in ("config.json", "quantize_config.json"):
        path = folder / name
        data = json.loads(path.read_text())
        target = data["quantization_config"] if name == "config.json" else data
        target.update(changes)
        path.write_text(json.dumps(data))


def edit_tensors(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(("changes", "message"), [
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not read; expected gptq"),
    ({"bits": 5}, "bits 5 is not read; expected one of 2, 3, 4, 8"),
    ({"group_size": 256}, "group_size 256 is not read"),
    ({"quant_method": "awq"}, "quant_method 'awq' is not gptq"),
    ({"sym": True}, "sym is true but its zero points are not all 8"),
])
def test_settings_not_read_are_refused_in_one_line(bases, export_v1, tmp_path, changes, message):
    edit_settings(export_v1, **changes)
    with pytest.raises(GptqImportError, match=message) as caught:
        import_gptq(export_v1, bases["llama"], tmp_path / "imported")
    assert "\n" not in str(caught.value) and not (tmp_path / "imported").exists()


def test_settings_files_that_disagree_are_refused(export_v1):
    data = json.loads((export_v1 / "quantize_config.json").read_text())
    (export_v1 / "quantize_config.json").write_text(json.dumps(data | {"bits": 8}))
    with pytest.raises(GptqImportError, match="bits disagrees between its settings files"):
        read_gptq_config(export_v1)


@pytest.mark.parametrize(("change", "message"), [
    ({"intermediate_size": 96}, r"tensor model\.layers\.0\.mlp\.down_proj\.qweight has shape \[16, 64\], but the "
                                r"base model's layer needs \[12, 64\]"),
    ({"vocab_size": 96}, r"tensor model\.embed_tokens\.weight has shape \[128, 64\] in the GPTQ folder but "
                         r"\[96, 64\] in the base model"),
])
def test_a_base_of_other_shapes_is_refused_naming_the_tensor(export_v1, tmp_path, change, message):
    other = tmp_path / "other"
    model = tiny_llama(tie=True)
    for key, value in change.items():
        setattr(model.config, key, value)
    type(model)(model.config).save_pretrained(other)
    build_tiny_tokenizer().save_pretrained(other)
    with pytest.raises(GptqImportError, match=message):
        import_gptq(export_v1, other, tmp_path / "imported")


def test_missing_tensors_are_refused_by_name(bases, export_v1, tmp_path):
    edit_tensors(export_v1, lambda tensors: tensors.pop("model.norm.weight"))
    with pytest.raises(GptqImportError, match=r"lacks tensors of the base model: model\.norm\.weight"):
        import_gptq(export_v1, bases["llama"], tmp_path / "imported")
    edit_tensors(export_v1, lambda tensors: tensors.pop("model.layers.1.self_attn.o_proj.qzeros"))
    with pytest.raises(GptqImportError, match=r"tensor model\.layers\.1\.self_attn\.o_proj\.qzeros is missing"):
        import_gptq(export_v1, bases["llama"], tmp_path / "imported")


def test_a_v1_zero_point_outside_the_code_range_is_refused(bases, export_v1, tmp_path):
    def overflow(tensors):
        tensors["model.layers.0.mlp.up_proj.qzeros"].fill_(-1)  # every stored zero 15: 16 once v1 adds 1

    edit_tensors(export_v1, overflow)
    with pytest.raises(GptqImportError, match="layer model.layers.0.mlp.up_proj: a v1 .* zero point stored as 15"):
        import_gptq(export_v1, bases["llama"], tmp_path / "imported")


def test_unreadable_folders_are_refused(bases, export_v1, tmp_path):
    shutil.copytree(export_v1, tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").rename(tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(GptqImportError, match=r"has no safetensors weights \(pickled \.bin weights are not read\)"):
        import_gptq(tmp_path / "pickled", bases["llama"], tmp_path / "imported")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(GptqImportError, match="has no GPTQ quantization settings"):
        import_gptq(tmp_path / "plain", bases["llama"], tmp_path / "imported")


def test_the_command_line_imports_and_refuses_in_one_line(bases, compressed, export_v1, tmp_path, capsys):
    from cpt_bench.cli import main

    out = tmp_path / "imported"
    assert main(["import-gptq", str(export_v1), "--model", str(bases["llama"]), "--out", str(out)]) == 0
    assert f"imported gptq folder {export_v1} (spec gptq-w4g32) as compressed checkpoint: {out}" in (
        capsys.readouterr().out)
    assert_same_model(compressed("llama", "rtn-w4g32"), out)
    edit_settings(export_v1, bits=6)
    assert main(["import-gptq", str(export_v1), "--model", str(bases["llama"]), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "bits 6 is not read" in error and "\n" not in error


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PEFT 0.21 on transformers 5
def test_recovery_methods_apply_to_a_gptq_folder_as_to_the_checkpoint(tiny_model_dir, fake_cache, tmp_path):
    """The ``cpt`` model with ``compression=<GPTQ folder>`` scores as with the checkpoint it was exported from, with a
    hard prompt and with a PEFT LoRA written elsewhere."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cpt_bench.lmeval.adapter import CptLM

    from .prompt_helpers import instances, mc_pairs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    result = compress_model(model, Spec.parse("rtn-w4g32"), progress=False)
    save_compressed(model, result, tmp_path / "ckpt")
    model.config.save_pretrained(tmp_path / "ckpt")
    exported = export_gptq(tmp_path / "ckpt", tmp_path / "gptq", "gptq_v2")
    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(tmp_path / "lora")
    requests = instances("loglikelihood", mc_pairs())
    common = {"pretrained": str(tiny_model_dir), "device": "cpu", "dtype": "float32", "batch_size": 4}
    for recovery in ({"hard_prompt": "paper"}, {"lora": str(tmp_path / "lora")}):
        theirs = CptLM(compression=str(exported), **recovery, **common)
        ours = CptLM(compression=CheckpointFolder(tmp_path / "ckpt"), **recovery, **common)
        assert theirs.loglikelihood(requests) == ours.loglikelihood(requests), recovery
        assert theirs.prompt_info["compression"] == "gptq-w4g32"
