"""Calibration from a corpus, compressed checkpoints (folders, the cache, loading) and the compress command."""

import argparse
import json

import pytest
import torch

from cpt_bench.assets.cache import MANIFEST
from cpt_bench.assets.model import ModelError, model_fingerprint
from cpt_bench.compress import (
    CalibrationError,
    CalibrationSettings,
    Spec,
    SpecError,
    cached_checkpoint,
    checkpoints,
    compress_to_folder,
    load_checkpoint,
    memory_table,
    read_manifest,
)
from cpt_bench.compress.calibration import corpus_calibration_ids
from cpt_bench.compress.cli_commands import add_compress_parser
from cpt_bench.compress.sequential import compressible_linears
from cpt_bench.files import OutputPathError
from cpt_bench.tokens import corpus_stream

from .compress_helpers import _one_thread  # noqa: F401  (_one_thread: autouse fixture)

SETTINGS = CalibrationSettings(n_windows=4, seqlen=32, block_size=32)
SPEC = Spec.parse("gptq-w4g32")  # the tiny model's Linears are 32 and 64 wide
RTN = Spec.parse("rtn-w4g32")



@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def counted(monkeypatch):
    """Count the calls of ``compress_model`` made through the checkpoints module."""
    calls = []
    original = checkpoints.compress_model

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "compress_model", counting)
    return calls


def test_calibration_windows_come_from_the_train_split(filled_fake_cache, tokenizer):
    tokens = corpus_stream("wikipedia", "train", tokenizer).ids
    ids = corpus_calibration_ids(tokenizer, SETTINGS)
    assert ids.shape == (4, 32) and ids.dtype == torch.int64
    stream = tokens.tolist()
    for window in ids.tolist():  # every window is a slice of the joined, tokenized train split
        assert any(stream[i:i + 32] == window for i in range(len(stream) - 32))
    assert torch.equal(ids, corpus_calibration_ids(tokenizer, SETTINGS))
    other_seed = CalibrationSettings(n_windows=4, seqlen=32, seed=1)
    assert not torch.equal(ids, corpus_calibration_ids(tokenizer, other_seed))


def test_too_short_corpus_is_a_one_line_error(filled_fake_cache, tokenizer):
    n_tokens = len(corpus_stream("wikipedia", "train", tokenizer))
    with pytest.raises(CalibrationError) as caught:
        corpus_calibration_ids(tokenizer, CalibrationSettings(n_windows=2, seqlen=n_tokens))
    message = str(caught.value)
    assert "'wikipedia'" in message and f"{n_tokens} tokens" in message and "\n" not in message


def test_fingerprint_tracks_weights_and_config(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-3}))
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = model_fingerprint(model)
    assert before == model_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    assert model_fingerprint(model) != before


def test_compress_once_then_reuse(cache, tiny_model_dir, counted):
    first = cached_checkpoint(str(tiny_model_dir), SPEC, SETTINGS)
    assert first.parent.name == "compressed" and first.name.startswith(f"{tiny_model_dir.name}-{SPEC}-")
    assert (first / MANIFEST).is_file() and (first / "config.json").is_file()
    assert cached_checkpoint(str(tiny_model_dir), SPEC, SETTINGS) == first
    model, modes = load_checkpoint(first)
    assert counted == [SPEC]
    manifest = read_manifest(first)
    assert manifest["calibration"]["corpus"] == "wikipedia"
    assert manifest["base_model"] == {"name": str(tiny_model_dir), "fingerprint": model_fingerprint(tiny_model_dir)}
    provenance = json.loads((first / MANIFEST).read_text())
    assert provenance["model_fingerprint"] == model_fingerprint(tiny_model_dir)
    assert set(modes.values()) == {"simulated"}


def test_changed_settings_or_spec_make_new_entries(cache, tiny_model_dir, counted):
    base = cached_checkpoint(str(tiny_model_dir), SPEC, SETTINGS)
    other_seed = cached_checkpoint(str(tiny_model_dir), SPEC, CalibrationSettings(4, 32, seed=1, block_size=32))
    other_spec = cached_checkpoint(str(tiny_model_dir), RTN, SETTINGS)
    rtn_other_settings = cached_checkpoint(str(tiny_model_dir), RTN, CalibrationSettings(2, 16))
    assert len({base, other_seed, other_spec}) == 3
    assert rtn_other_settings == other_spec  # RTN reads no calibration data: settings are not part of its key
    assert len(counted) == 3


def test_corrupted_entry_is_rebuilt(cache, tiny_model_dir, counted):
    folder = cached_checkpoint(str(tiny_model_dir), RTN, SETTINGS)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert cached_checkpoint(str(tiny_model_dir), RTN, SETTINGS) == folder
    assert len(counted) == 2
    load_checkpoint(folder)  # loads: sha256 verified
    assert len(counted) == 2


def test_loaded_model_matches_the_compressed_one(cache, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from cpt_bench.compress import compress_model

    model, _ = load_checkpoint(cached_checkpoint(str(tiny_model_dir), SPEC, SETTINGS))
    # the cached weights are those of compressing the model directly on the same windows
    direct = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = corpus_calibration_ids(tokenizer, SETTINGS)
    compress_model(direct, SPEC, ids, SETTINGS, progress=False)
    for name, module in compressible_linears(direct).items():
        assert torch.equal(module.weight, model.get_submodule(name).weight), name
    # and every other tensor is the base model's, as stored (fp16)
    for name, tensor in direct.state_dict().items():
        if name.removesuffix(".weight") not in compressible_linears(direct):
            assert torch.equal(model.state_dict()[name], tensor.half().float()), name


def test_dense_has_nothing_to_compress(cache, tiny_model_dir, counted):
    with pytest.raises(SpecError, match="nothing to compress"):
        cached_checkpoint(str(tiny_model_dir), Spec.parse("dense"))
    assert counted == []


def test_explicit_out_folder(cache, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    compress_to_folder(str(tiny_model_dir), Spec.parse("rtn-w8"), SETTINGS, out)
    assert read_manifest(out)["spec"] == "rtn-w8" and (out / "tokenizer.json").is_file()
    table = memory_table(read_manifest(out))
    assert "compressed Linears" in table and "ratio to dense fp16" in table
    memory = read_manifest(out)["memory"]
    assert f"{memory['stored_bytes'] / memory['dense_fp16_bytes']:.3f}" in table


def test_out_folder_is_replaced_whole_and_never_a_folder_of_other_files(cache, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    compress_to_folder(str(tiny_model_dir), Spec.parse("rtn-w8"), SETTINGS, out)
    compress_to_folder(str(tiny_model_dir), RTN, SETTINGS, out)  # an earlier checkpoint: replaced
    assert read_manifest(out)["spec"] == str(RTN)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputPathError, match="not a compressed checkpoint"):
        compress_to_folder(str(tiny_model_dir), RTN, SETTINGS, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_user_errors_are_one_line(cache, tiny_model_dir, tmp_path):
    with pytest.raises(SpecError, match="group size 64"):  # does not divide the 32-wide Linears
        compress_to_folder(str(tiny_model_dir), Spec.parse("rtn-w4g64"), SETTINGS, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ModelError) as caught:
        cached_checkpoint(str(tmp_path / "no-such-model"), SPEC)
    assert "\n" not in str(caught.value)
    with pytest.raises(CalibrationError):
        cached_checkpoint(str(tiny_model_dir), SPEC, CalibrationSettings(n_windows=1, seqlen=100_000))
    with pytest.raises(SpecError, match="mode"):
        load_checkpoint(cached_checkpoint(str(tiny_model_dir), RTN, SETTINGS), mode="fast")


def parse(argv):
    parser = argparse.ArgumentParser(prog="cpt-bench")
    add_compress_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_compress_command(cache, tiny_model_dir, tmp_path, capsys):
    args = parse(["compress", "--model", str(tiny_model_dir), "--spec", "gptq-w4g32", "--n-windows", "2",
                  "--seqlen", "16", "--seed", "3", "--export-gptq", str(tmp_path / "gptq")])
    assert (args.corpus, args.out) == ("wikipedia", None)
    args.run(args)
    output = capsys.readouterr().out
    assert "bits/weight" in output and "compressed checkpoint:" in output
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["bits"] == 4
    folder = cached_checkpoint(str(tiny_model_dir), SPEC, CalibrationSettings(2, 16, 3))
    assert read_manifest(folder)["calibration"]["seed"] == 3


def test_compress_command_defaults_follow_the_gptq_protocol():
    args = parse(["compress", "--spec", "gptq-w4g64"])
    assert (args.model, args.n_windows, args.seqlen, args.seed, args.corpus) == ("embedded", 128, 1024, 0,
                                                                                 "wikipedia")
    assert parse(["compress", "--spec", "gptq-w4g64", "--corpus", "c4"]).corpus == "c4"  # corpus specs: checked on use
    assert args.true_sequential and not parse(["compress", "--spec", "gptq-w4g64", "--one-pass"]).true_sequential
