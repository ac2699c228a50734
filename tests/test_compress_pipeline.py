"""Calibration from a corpus, the compressed-checkpoint cache, ``compress_to_dir`` and the compress command."""

import argparse
import json

import pytest
import torch

from cpt_bench.assets.cache import MANIFEST
from cpt_bench.compress import (
    CalibrationError,
    CalibrationSettings,
    ModelError,
    Spec,
    SpecError,
    compress_to_dir,
    load_or_compress,
    memory_table,
    model_fingerprint,
    pipeline,
    read_manifest,
)
from cpt_bench.compress import cache as compress_cache
from cpt_bench.compress.calibration import corpus_calibration_ids
from cpt_bench.compress.cli_commands import add_compress_parser
from cpt_bench.compress.sequential import compressible_linears
from cpt_bench.tokens import corpus_stream

from .compress_helpers import _one_thread  # noqa: F401  (_one_thread: autouse fixture)

SETTINGS = CalibrationSettings(n_windows=4, seqlen=32, block_size=32)
SPEC = "gptq-w4g32"  # the tiny model's Linears are 32 and 64 wide


@pytest.fixture
def cache(filled_fake_cache, tmp_path, monkeypatch):
    """A private, writable cache holding the fake corpora (the session's filled cache is read-only)."""
    import shutil

    root = tmp_path / "cache"
    shutil.copytree(filled_fake_cache / "corpora", root / "corpora")
    monkeypatch.setenv("CPT_BENCH_CACHE", str(root))
    return root


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def counted(monkeypatch):
    """Count the calls of ``compress_model`` made through the pipeline."""
    calls = []
    original = pipeline.compress_model

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compress_model", counting)
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
    first = compress_to_dir(str(tiny_model_dir), SPEC, None, SETTINGS)
    assert first.parent.name == "compressed" and first.name.startswith(f"{tiny_model_dir.name}-{SPEC}-")
    assert (first / MANIFEST).is_file() and (first / "config.json").is_file()
    assert compress_to_dir(str(tiny_model_dir), SPEC, None, SETTINGS) == first
    model, manifest = load_or_compress(str(tiny_model_dir), SPEC, SETTINGS)
    assert counted == [Spec.parse(SPEC)]
    assert manifest["folder"] == str(first) and manifest["calibration"]["corpus"] == "wikipedia"
    provenance = json.loads((first / MANIFEST).read_text())
    assert provenance["model_fingerprint"] == model_fingerprint(tiny_model_dir)
    assert set(manifest["layer_modes"].values()) == {"simulated"}


def test_changed_settings_or_spec_make_new_entries(cache, tiny_model_dir, counted):
    base = compress_to_dir(str(tiny_model_dir), SPEC, None, SETTINGS)
    other_seed = compress_to_dir(str(tiny_model_dir), SPEC, None, CalibrationSettings(4, 32, seed=1, block_size=32))
    other_spec = compress_to_dir(str(tiny_model_dir), "rtn-w4g32", None, SETTINGS)
    rtn_other_settings = compress_to_dir(str(tiny_model_dir), "rtn-w4g32", None, CalibrationSettings(2, 16))
    assert len({base, other_seed, other_spec}) == 3
    assert rtn_other_settings == other_spec  # RTN reads no calibration data: settings are not part of its key
    assert len(counted) == 3


def test_corrupted_entry_is_rebuilt(cache, tiny_model_dir, counted):
    folder = compress_to_dir(str(tiny_model_dir), "rtn-w4g32", None, SETTINGS)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert compress_to_dir(str(tiny_model_dir), "rtn-w4g32", None, SETTINGS) == folder
    assert len(counted) == 2
    read_manifest(folder)
    model, _ = load_or_compress(str(tiny_model_dir), "rtn-w4g32", SETTINGS)  # loads: sha256 verified
    assert len(counted) == 2


def test_loaded_model_matches_the_compressed_one(cache, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from cpt_bench.compress import compress_model, load_compressed

    folder = compress_to_dir(str(tiny_model_dir), SPEC, None, SETTINGS)
    model, manifest = load_or_compress(str(tiny_model_dir), SPEC, SETTINGS)
    reference = load_compressed(folder, AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    # and the cached weights are those of compressing the model directly on the same windows
    direct = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = corpus_calibration_ids(tokenizer, SETTINGS)
    compress_model(direct, Spec.parse(SPEC), ids, SETTINGS, progress=False)
    for name, module in compressible_linears(direct).items():
        assert torch.equal(module.weight, model.get_submodule(name).weight), name


def test_dense_is_the_plain_model(cache, tiny_model_dir, counted):
    model, manifest = load_or_compress(str(tiny_model_dir), "dense")
    assert manifest == {"spec": "dense", "folder": str(tiny_model_dir)} and counted == []
    assert compress_to_dir(str(tiny_model_dir), "dense") == tiny_model_dir


def test_explicit_out_folder(cache, tiny_model_dir, tmp_path):
    out = compress_to_dir(str(tiny_model_dir), "rtn-w8", tmp_path / "out", SETTINGS)
    assert out == tmp_path / "out" and read_manifest(out)["spec"] == "rtn-w8"
    table = memory_table(read_manifest(out))
    assert "compressed Linears" in table and "ratio to dense fp16" in table
    memory = read_manifest(out)["memory"]
    assert f"{memory['stored_bytes'] / memory['dense_fp16_bytes']:.3f}" in table


def test_user_errors_are_value_errors(cache, tiny_model_dir, tmp_path):
    with pytest.raises(SpecError):
        compress_to_dir(str(tiny_model_dir), "gptq-w5")
    with pytest.raises(SpecError, match="group size 64"):  # does not divide the 32-wide Linears
        compress_to_dir(str(tiny_model_dir), "rtn-w4g64", tmp_path / "x")
    with pytest.raises(ModelError) as caught:
        compress_to_dir(str(tmp_path / "no-such-model"), SPEC)
    assert "\n" not in str(caught.value)
    with pytest.raises(CalibrationError):
        compress_to_dir(str(tiny_model_dir), SPEC, None, CalibrationSettings(n_windows=1, seqlen=100_000))
    with pytest.raises(ValueError, match="mode"):
        load_or_compress(str(tiny_model_dir), SPEC, SETTINGS, mode="fast")


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
    folder = compress_cache.compressed_checkpoint(str(tiny_model_dir), "gptq-w4g32", CalibrationSettings(2, 16, 3))
    assert read_manifest(folder)["calibration"]["seed"] == 3


def test_compress_command_defaults_follow_the_gptq_protocol():
    args = parse(["compress", "--spec", "gptq-w4g64"])
    assert (args.model, args.n_windows, args.seqlen, args.seed, args.corpus) == ("embedded", 128, 1024, 0,
                                                                                 "wikipedia")
    with pytest.raises(SystemExit):
        parse(["compress", "--spec", "gptq-w4g64", "--corpus", "c4"])
