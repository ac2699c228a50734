"""EoRA on tiny random models: the fit against a plain SVD and no correction on the calibration inputs, full rank
restoring W, the sequential pass's inputs, the PEFT folder (merged logits, lm-eval through ``hf ... peft=`` and
``cpt ... lora=`` / ``eora=``), its record and memory account, and bad inputs."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt_bench.compress.checkpoints import compress_to_folder, load_checkpoint
from cpt_bench.compress.cli_commands import add_compress_parser
from cpt_bench.compress.eora import (
    SIGNATURE_TOLERANCE,
    Compensator,
    EoraError,
    eigenspace,
    fit,
    plain_svd,
    signature_mismatch,
    weight_signature,
)
from cpt_bench.compress.gptq import Hessian, output_error
from cpt_bench.compress.layers import compressible_linears, state_weight, weight_of
from cpt_bench.compress.sequential import compensate_model, compress_linear, compress_model
from cpt_bench.compress.spec import CalibrationSettings, Spec
from cpt_bench.compress.storage import StorageError
from cpt_bench.files import OutputPathError
from cpt_bench.lmeval.adapter import CptLM
from cpt_bench.recovery.eora import EoraArtifactError, read_eora
from cpt_bench.recovery.eora_cli import EORA_OUTPUT, add_eora_parser
from cpt_bench.recovery.lora import METADATA, PEFT_WEIGHTS

from .compress_helpers import _one_thread  # noqa: F401  (autouse: one torch thread)
from .prompt_helpers import instances, mc_pairs, rolling_texts
from .test_families import save_family

SETTINGS = CalibrationSettings(n_windows=3, seqlen=24, corpus="wikipedia")
RANK = 4


def _output_errors(delta: torch.Tensor, correction: torch.Tensor, x: torch.Tensor) -> float:
    """``||(delta - correction) X||_F^2`` computed directly from the inputs ``x [n, in]``."""
    return float(((x.double() @ (delta - correction).double().T) ** 2).sum())


@pytest.mark.parametrize("in_rank", [16, 6])  # full-rank and rank-deficient input covariance
def test_eora_output_error_is_at_most_plain_svd_and_none(in_rank):
    generator = torch.Generator().manual_seed(in_rank)
    weight = torch.randn(24, 16, generator=generator)
    compressed = torch.round(weight * 2) / 2  # a coarse grid: dW of full rank
    x = torch.randn(200, in_rank, generator=generator) @ torch.randn(in_rank, 16, generator=generator)
    x = x * torch.linspace(0.1, 3, 16)  # uneven input scales, as activations have
    delta = weight - compressed
    hessian = Hessian(16, torch.device("cpu"))
    hessian.add(x)
    space = eigenspace(hessian.matrix)
    assert space.values.numel() == in_rank  # the rank-deficient covariance keeps only its non-zero eigenvalues
    none = _output_errors(delta, torch.zeros_like(delta), x)
    for rank in (1, 2, 4, 8):
        a, b = fit(delta, space, rank)
        svd_a, svd_b = plain_svd(delta, rank)
        assert a.shape == (rank, 16) and b.shape == (24, rank) and torch.isfinite(a).all()
        eora = _output_errors(delta, b @ a, x)
        svd = _output_errors(delta, svd_b @ svd_a, x)
        assert eora <= svd * (1 + 1e-5) and eora <= none and svd < none
        if rank < in_rank:
            assert eora < 0.95 * svd  # the eigenspace matters with uneven inputs
    # the unit of output_error: the mean over tokens of the squared norm, i.e. the direct sum / n
    a, b = fit(delta, space, 2)
    assert output_error(weight, compressed + b @ a, hessian.matrix) == pytest.approx(
        _output_errors(delta, b @ a, x) / 200, rel=1e-4)


def test_full_rank_with_a_full_rank_covariance_restores_the_weight():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 8, generator=generator)
    compressed = torch.round(weight)
    hessian = Hessian(8, torch.device("cpu"))
    hessian.add(torch.randn(100, 8, generator=generator) * torch.linspace(0.5, 2, 8))
    a, b = fit(weight - compressed, eigenspace(hessian.matrix), 8)
    torch.testing.assert_close(compressed + b @ a, weight, atol=1e-5, rtol=0)
    # a zero covariance keeps no direction: a zero correction of the requested rank, not NaNs
    a, b = fit(weight - compressed, eigenspace(torch.zeros(8, 8)), 3)
    assert a.shape == (3, 8) and not a.any() and not b.any()


FAMILIES = ("llama", "gpt2", "opt", "qwen2")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    from .conftest import build_tiny_tokenizer

    return save_family(request.param, build_tiny_tokenizer(), tmp_path_factory.mktemp(request.param))


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (SETTINGS.n_windows, SETTINGS.seqlen), generator=torch.Generator().manual_seed(3))


def test_every_linear_is_corrected_on_inputs_from_the_compensated_layers_before_it(family):
    """For every Linear (GPT-2's Conv1D too): EoRA's recorded output error is at most the plain SVD's and no
    correction's, and equals the one measured on the inputs the final, fully compensated model gives it, so each
    layer was fitted on the outputs of the compressed and compensated layers before it."""
    dense = family.load()
    model = family.load()
    ids = _ids(dense.config.vocab_size)
    compensator = Compensator(RANK)
    result = compress_model(model, Spec.parse("gptq-w2g32"), ids, SETTINGS, progress=False, compensator=compensator)
    linears = compressible_linears(model)
    assert sorted(compensator.fit.adapters) == sorted(linears) == sorted(result.layers)
    hessians = {name: Hessian(weight_of(module).shape[1], torch.device("cpu")) for name, module in linears.items()}
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: hessians[name].add(args[0]))
               for name, module in linears.items()]
    with torch.no_grad():
        for window in ids:
            model(input_ids=window[None])
    for handle in handles:
        handle.remove()
    originals = compressible_linears(dense)
    for name, module in linears.items():
        errors = compensator.fit.errors[name]
        assert errors["eora"] <= errors["svd"] * (1 + 1e-5) and errors["eora"] <= errors["none"], name
        a, b = compensator.fit.adapters[name]
        compressed = result.layers[name].weight()
        torch.testing.assert_close(weight_of(module), compressed + b @ a)  # the layer runs with W_hat + B A
        measured = output_error(weight_of(originals[name]), compressed + b @ a, hessians[name].matrix)
        assert measured == pytest.approx(errors["eora"], rel=1e-3, abs=1e-9), name
    totals = compensator.fit.totals()
    assert totals["eora"] < totals["svd"] < totals["none"]
    # the same fit from the stored compression (an existing checkpoint's path) on the dense model
    again = Compensator(RANK)
    compensate_model(family.load(), result.layers, result.spec, ids, SETTINGS, again, progress=False)
    for name, (a, b) in compensator.fit.adapters.items():
        torch.testing.assert_close(b @ a, again.fit.adapters[name][1] @ again.fit.adapters[name][0], atol=1e-4,
                                   rtol=1e-3)



def _parse(argv):
    parser = argparse.ArgumentParser(prog="cpt-bench")
    commands = parser.add_subparsers(dest="command", required=True)
    add_compress_parser(commands, EORA_OUTPUT)
    add_eora_parser(commands)
    return parser.parse_args(argv)


def _calibration_flags() -> list[str]:
    return ["--n-windows", str(SETTINGS.n_windows), "--seqlen", str(SETTINGS.seqlen)]


def _merged_logits(checkpoint, folder, ids) -> torch.Tensor:
    """Logits of the checkpoint's model with every Linear set to W_hat + B A (A, B as stored, fp16)."""
    from safetensors.torch import load_file

    model, _ = load_checkpoint(checkpoint)
    tensors = load_file(folder / PEFT_WEIGHTS)
    for name, module in compressible_linears(model).items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"].float()
        b = tensors[f"base_model.model.{name}.lora_B.weight"].float()
        module.weight.data = state_weight(module, weight_of(module) + b @ a)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_compress_with_eora_writes_a_peft_folder_whose_logits_are_the_merged_weights(family, cache, tmp_path,
                                                                                     capsys):
    checkpoint, folder = tmp_path / "ckpt", tmp_path / "eora"
    args = _parse(["compress", "--model", str(family.folder), "--spec", "rtn-w3g32", "--out", str(checkpoint),
                   "--eora-rank", str(RANK), "--eora-out", str(folder), *_calibration_flags()])
    args.run(args)
    output = capsys.readouterr().out
    assert "plain SVD r4" in output and "checkpoint + EoRA" in output
    meta = read_eora(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == RANK
    assert config["fan_in_fan_out"] == (family.name == "gpt2")
    record = meta["eora"]
    linears = compressible_linears(family.load())
    assert sorted(record["output_error"]["layers"]) == sorted(linears) == sorted(config["target_modules"])
    assert record["checkpoint"]["spec"] == "rtn-w3g32" and record["calibration"]["n_windows"] == SETTINGS.n_windows
    assert record["base_model"]["fingerprint"] and meta["compression"] == str(checkpoint.resolve())
    # memory: fp16 A and B of every Linear, added to the checkpoint's bytes and bits per weight
    adapter_bytes = sum(2 * RANK * sum(weight_of(m).shape) for m in linears.values())
    memory = record["memory"]
    assert memory["adapter_bytes"] == adapter_bytes
    assert memory["stored_bytes"] == memory["checkpoint_stored_bytes"] + adapter_bytes
    assert memory["compressed_bits_per_weight_with_adapter"] == pytest.approx(
        memory["compressed_bits_per_weight"] + 8 * adapter_bytes / memory["compressed_layer_weights"])
    # PEFT loads it on the compressed model; its logits are those of W_hat + B A
    ids = _ids(family.load().config.vocab_size)[:2]
    base, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(folder)).eval()(input_ids=ids).logits
    torch.testing.assert_close(adapted, _merged_logits(checkpoint, folder, ids), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(adapted, plain, atol=1e-4)


def test_an_eora_folder_scores_identically_in_plain_lm_eval_and_through_cpt(tiny_model_dir, cache, tmp_path, capsys):
    """``cpt-bench eora`` on an existing checkpoint; the folder through ``hf ... peft=`` (on the checkpoint's
    dequantized weights saved as a plain folder), ``cpt ... lora=`` and ``cpt ... eora=``."""
    checkpoint, folder, plain_folder = tmp_path / "ckpt", tmp_path / "eora", tmp_path / "plain"
    compress_to_folder(str(tiny_model_dir), Spec.parse("rtn-w2g32"), SETTINGS, checkpoint, progress=False)
    args = _parse(["eora", str(checkpoint), "--rank", str(RANK), "--out", str(folder), *_calibration_flags()])
    args.run(args)
    assert "EoRA r4" in capsys.readouterr().out
    model, _ = load_checkpoint(checkpoint)
    model.save_pretrained(plain_folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(plain_folder)
    common = {"device": "cpu", "dtype": "float32", "batch_size": 4}
    plain = HFLM(pretrained=str(plain_folder), peft=str(folder), **common)
    as_lora = CptLM(pretrained=str(tiny_model_dir), compression=str(checkpoint), lora=str(folder), **common)
    as_eora = CptLM(pretrained=str(tiny_model_dir), compression=str(checkpoint), eora=str(folder), **common)
    uncorrected = CptLM(pretrained=str(tiny_model_dir), compression=str(checkpoint), **common)
    mc = instances("loglikelihood", mc_pairs())
    rolling = instances("loglikelihood_rolling", [(text,) for text in rolling_texts(n_words=40)])
    for requests, score in ((mc, lambda lm, r: [s for s, _ in lm.loglikelihood(r)]),
                            (rolling, lambda lm, r: lm.loglikelihood_rolling(r))):
        expected = score(plain, requests)
        assert score(as_lora, requests) == expected == score(as_eora, requests)  # identical
        assert score(uncorrected, requests) != expected
    meta = read_eora(folder)
    info, memory = as_eora.prompt_info, as_eora.memory_record()
    assert info["kind"] == "eora" and info["rank"] == RANK and info["fitted_on"]["path"] == str(checkpoint.resolve())
    assert info["stored_bytes"] == meta["eora"]["memory"]["adapter_bytes"]
    assert memory["adapter_bytes"] == 2 * info["stored_bytes"]  # resident in the model's fp32
    assert as_lora.prompt_info["kind"] == "lora"
    # eora= refuses the model without the checkpoint it was fitted on, or with another compression of it
    with pytest.raises(EoraArtifactError, match="compression_mode=simulated"):
        CptLM(pretrained=str(tiny_model_dir), compression="rtn-w4g32", compression_mode="real", eora=str(folder),
              **common | {"dtype": "bfloat16"})
    for other in ({}, {"compression": "rtn-w4g32"}):
        with pytest.raises(EoraArtifactError, match=f"fitted on checkpoint {checkpoint.resolve()} \\(rtn-w2g32\\)"):
            CptLM(pretrained=str(tiny_model_dir), eora=str(folder), **other, **common)


def test_the_signature_tells_the_fitted_compression_from_another_but_not_from_16_bit_storage():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=generator)
    three_bit = Spec.parse("rtn-w3g32")
    fitted = compress_model_weight(weight, three_bit)
    signature = weight_signature("layer", fitted)
    assert signature_mismatch(signature, fitted) is None
    assert signature_mismatch(signature, fitted.bfloat16()) is None
    assert signature_mismatch(signature, fitted.half()) is None
    assert signature_mismatch(signature, compress_model_weight(weight, Spec.parse("rtn-w4g32"))) > SIGNATURE_TOLERANCE
    assert signature_mismatch(signature, weight) > SIGNATURE_TOLERANCE
    assert signature_mismatch(signature, fitted[:10]) == float("inf")


def compress_model_weight(weight: torch.Tensor, spec: Spec) -> torch.Tensor:
    return compress_linear(weight, spec, None, SETTINGS).weight()


def test_bad_eora_inputs_are_refused_in_one_line(tiny_model_dir, cache, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(EoraError, match="must be a positive integer"):
        Compensator(0)
    base = ["compress", "--model", str(tiny_model_dir), "--spec", "rtn-w3g32", *_calibration_flags()]
    cases = [
        (base + ["--eora-rank", "4"], EoraError, "--eora-rank and --eora-out go together"),
        (base + ["--eora-rank", "4", "--eora-out", str(tmp_path / "e")], EoraError, "needs --out"),
        (base + ["--eora-rank", "-1", "--eora-out", str(tmp_path / "e"), "--out", str(tmp_path / "c")], EoraError,
         "--eora-rank must be a positive integer"),
        (base[:3] + ["--spec", "dense", "--eora-rank", "4", "--eora-out", str(tmp_path / "e")], EoraError,
         "spec dense"),
    ]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases.append((base + ["--out", str(tmp_path / "c"), "--eora-rank", "4", "--eora-out", str(foreign)],
                  OutputPathError, "--eora-out"))
    cases.append((["eora", str(foreign), "--rank", "4", "--out", str(tmp_path / "e")], StorageError,
                  "compression.json"))
    cases.append((["eora", str(foreign), "--rank", "0", "--out", str(tmp_path / "e")], EoraError, "--rank"))
    for argv, error, message in cases:
        args = _parse(argv)
        with pytest.raises(error, match=message) as caught:
            args.run(args)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "c").exists() and not (tmp_path / "e").exists()  # refused before any work
    # a LoRA folder that is not an EoRA adapter, and an empty eora=
    lora = tmp_path / "lora"
    lora.mkdir()
    compensator = Compensator(2)
    compress_model(model, Spec.parse("rtn-w3g32"), _ids(model.config.vocab_size), SETTINGS, progress=False,
                   compensator=compensator)
    checkpoint = tmp_path / "ckpt"
    compress_to_folder(str(tiny_model_dir), Spec.parse("rtn-w3g32"), SETTINGS, checkpoint, progress=False)
    EORA_OUTPUT.write(lora, compensator, checkpoint, SETTINGS)
    meta = json.loads((lora / METADATA).read_text())
    del meta["method"]
    (lora / METADATA).write_text(json.dumps(meta))
    with pytest.raises(EoraArtifactError, match="not an EoRA adapter.*lora="):
        read_eora(lora)
    with pytest.raises(EoraArtifactError, match="eora is empty"):
        CptLM(pretrained=str(tiny_model_dir), eora="")
