"""The one model loader: the compression argument's rule, the base-model check, devices."""

import shutil

import pytest
import torch

from cpt_bench.assets.model import ModelError
from cpt_bench.compress import CalibrationSettings, Spec, SpecError, UnsupportedLayerError, compress_to_folder
from cpt_bench.compress.sequential import compressible_linears
from cpt_bench.models import (
    CheckpointFolder,
    load_model,
    parse_compression,
    resident_bytes,
    resolve_device,
    weight_formats,
)

from .compress_helpers import _one_thread  # noqa: F401  (_one_thread: autouse fixture)

RTN = Spec.parse("rtn-w4g32")


@pytest.fixture
def checkpoint(fake_cache, tiny_model_dir, tmp_path):
    """The tiny model compressed by rtn-w4g32 into ``tmp_path/ckpt`` (a folder of one's own)."""
    folder = tmp_path / "ckpt"
    compress_to_folder(str(tiny_model_dir), RTN, CalibrationSettings(), folder)
    return folder


def test_specs_folders_and_dense_parse_by_the_documented_rule(checkpoint, tmp_path, monkeypatch):
    assert parse_compression(None) is None and parse_compression("") is None and parse_compression("dense") is None
    assert parse_compression("gptq-w4g64") == Spec.parse("gptq-w4g64")
    assert parse_compression(str(checkpoint)) == CheckpointFolder(checkpoint)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoint, tmp_path / "rtn-w4g32")  # a folder named like a spec
    with pytest.raises(SpecError, match=r"both a compression spec and an existing path; write \./rtn-w4g32"):
        parse_compression("rtn-w4g32")
    assert parse_compression("./rtn-w4g32") == CheckpointFolder(tmp_path / "rtn-w4g32")


def test_bad_compression_values_are_one_line_errors(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(SpecError, match="without compression.json") as caught:
        parse_compression(str(tmp_path / "plain"), "--compression")
    assert str(caught.value).startswith("--compression ")
    with pytest.raises(SpecError, match="neither a compressed checkpoint folder nor a valid spec") as caught:
        parse_compression("gptq-w5g64")
    assert "bits 5" in str(caught.value) and "\n" not in str(caught.value)


def test_a_checkpoint_loads_only_with_its_own_base_model(checkpoint, tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), str(checkpoint), device="cpu")
    assert loaded.compression == str(RTN) and loaded.checkpoint == checkpoint
    assert set(loaded.layer_modes.values()) == {"simulated"}
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(other)
    with pytest.raises(ModelError, match="was compressed from model .*, not from") as caught:
        load_model(str(other), CheckpointFolder(checkpoint), device="cpu")
    assert "\n" not in str(caught.value)


def test_spec_and_folder_load_the_same_weights(checkpoint, tiny_model_dir):
    by_folder = load_model(str(tiny_model_dir), CheckpointFolder(checkpoint), device="cpu").model
    by_spec = load_model(str(tiny_model_dir), RTN, device="cpu", progress=False).model
    for name in compressible_linears(by_spec):
        assert torch.equal(by_spec.get_submodule(name).weight, by_folder.get_submodule(name).weight), name


def test_dense_loads_the_plain_model(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), "dense", device="cpu")
    assert loaded.compression == "dense" and loaded.checkpoint is None and not loaded.model.training
    assert loaded.model.dtype == torch.float32


def test_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu" and resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ModelError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ModelError, match="not a torch device"):
        resolve_device("gpu")


def test_resident_bytes_count_each_storage_once():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied: one storage
    model = torch.nn.ModuleDict({"embed": embedding, "head": head})
    model.register_buffer("codes", torch.zeros(8, dtype=torch.float16))
    model.register_buffer("view", model.codes[:4])  # a view of the same storage
    assert resident_bytes(model) == 10 * 4 * 4 + 8 * 2
    with torch.device("meta"):
        model.register_buffer("absent", torch.zeros(100))
    assert resident_bytes(model) == 10 * 4 * 4 + 8 * 2  # meta tensors hold no memory


def test_weight_formats_count_layers_per_format():
    modes = {"a": "int4 g64", "b": "int4 g64", "c": "simulated (layer c: 3-bit codes have no CPU kernel)"}
    assert weight_formats(modes) == {"int4 g64": 2, "simulated": 1}
    assert weight_formats(None) == {} and weight_formats("gptqmodel") == {"gptqmodel": 1}


def test_real_mode_falls_back_to_simulated_layers_when_asked(tiny_model_dir, fake_cache):
    spec = Spec.parse("rtn-w3g32")  # 3-bit codes: no CPU kernel
    with pytest.raises(UnsupportedLayerError, match="3-bit"):
        load_model(str(tiny_model_dir), spec, mode="real", device="cpu", progress=False)
    loaded = load_model(str(tiny_model_dir), spec, mode="real", device="cpu", progress=False, fallback=True)
    assert weight_formats(loaded.layer_modes) == {"simulated": len(compressible_linears(loaded.model))}
