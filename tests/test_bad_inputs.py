"""The bad-input catalogue: every bad value a user can give gets one line naming it and what was expected.

Each ``Case`` prepares its inputs in ``tmp_path`` and returns either an argv for ``cpt_bench.cli.main`` (the
user runs ``cpt-bench``) or a zero-argument callable (the user reaches that code another way, e.g. lm-eval
``--model_args`` of the ``cpt`` adapter through ``cpt-lm-eval``). Checked for every case:

* exit status 2 and stderr exactly one line, ``cpt-bench: error: <message>`` (argv) or
  ``cpt-lm-eval: error: <message>`` (callable, run where ``cpt-lm-eval`` runs lm-eval's ``cli_evaluate``);
* the message matches the case's regex (the bad value and what was expected);
* nothing already written is lost: every file under ``tmp_path`` before the call keeps its bytes, and no
  temporary file or folder is left behind; ``after`` checks anything more.

To add a case, append a ``Case`` to ``CASES``.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch

from cpt_bench import cli
from cpt_bench.errors import BUG_NOTE
from cpt_bench.lmeval import cli as lmeval_cli
from cpt_bench.lmeval.tasks import TASKS_DIR

from .compress_helpers import _one_thread  # noqa: F401  (_one_thread: autouse fixture)
from .conftest import TINY_SEQLEN_TOKENS, build_tiny_tokenizer
from .prompt_helpers import save_random_prompt

Invocation = list[str] | Callable[[], object]
LEFTOVER = re.compile(r"\.tmp$|\.building$")  # cpt_bench.files' temp files and folders


@dataclass
class Inputs:
    """Inputs of a case (read-only: copy what a case changes into its ``tmp_path``) and its monkeypatch."""

    model: Path  # the tiny model folder (tests/conftest.py ``tiny_model_dir``)
    prompt: Path  # a soft prompt for it
    compressed: Path  # it compressed by rtn-w8 (``cpt-bench compress --out``)
    cache: Path  # the filled fake cache (corpora and zero-shot sets)
    monkeypatch: pytest.MonkeyPatch  # this test's

    def copy(self, what: Path, tmp: Path) -> Path:
        """A copy of the folder ``what`` inside ``tmp``, for a case to damage."""
        return Path(shutil.copytree(what, tmp / what.name))


@dataclass(frozen=True)
class Case:
    """One bad input: ``run(tmp_path, inputs)`` prepares it and returns the invocation; ``message`` is a regex the
    one-line error must match; ``after(tmp_path)`` checks more once it has failed."""

    id: str
    run: Callable[[Path, Inputs], Invocation]
    message: str
    after: Callable[[Path], None] | None = None
    needs_non_root: bool = False  # permission checks do not apply to root


# ---------------------------------------------------------------------------------------------- helpers


def _argv(*args: object) -> Callable[[Path, Inputs], list[str]]:
    """A case run returning a fixed argv; ``{model}``, ``{tmp}``, ``{compressed}`` are filled in."""

    def run(tmp: Path, inputs: Inputs) -> list[str]:
        fill = {"model": inputs.model, "tmp": tmp, "compressed": inputs.compressed}
        return [str(arg).format(**fill) for arg in args]

    return run


def _with_short_corpus(make: Callable[[Path, Inputs], list[str]]) -> Callable[[Path, Inputs], list[str]]:
    """``make``'s argv with a corpus of ten short notes at ``{tmp}/short`` (a few hundred tokens in all)."""

    def run(tmp: Path, inputs: Inputs) -> list[str]:
        (tmp / "short").mkdir()
        for index in range(10):
            (tmp / "short" / f"{index}.txt").write_text(f"note {index}: river stone light garden winter\n")
        return make(tmp, inputs)

    return run


def _compress(*extra: str) -> Callable[[Path, Inputs], list[str]]:
    return _argv("compress", "--model", "{model}", *extra)


def _train(*extra: str) -> Callable[[Path, Inputs], list[str]]:
    return _argv("prompt", "train", "--model", "{model}", "--source", "wikipedia", "--out", "{tmp}/prompt",
                 "--n-virtual-tokens", "3", "--steps", "2", "--eval-every", "2", "--seqlen", TINY_SEQLEN_TOKENS,
                 "--eval-windows", "2", "--device", "cpu", *extra)


def _adapter(**model_args: str) -> Callable[[Path, Inputs], Callable[[], object]]:
    """lm-eval's construction of ``--model cpt --model_args k=v,...`` (values filled like ``_argv``)."""
    from cpt_bench.lmeval.adapter import CptLM

    def run(tmp: Path, inputs: Inputs) -> Callable[[], object]:
        fill = {"model": inputs.model, "tmp": tmp, "prompt": inputs.prompt, "compressed": inputs.compressed}
        text = ",".join(f"{key}={value.format(**fill)}" for key, value in model_args.items())
        return partial(CptLM.create_from_arg_string, f"pretrained={inputs.model},{text}",
                       {"batch_size": 1, "device": "cpu"})

    return run


def _model_folder(tmp: Path, config: dict | None) -> Path:
    folder = tmp / "not-a-causal-lm"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def _not_causal(command: str) -> Callable[[Path, Inputs], list[str]]:
    def run(tmp: Path, inputs: Inputs) -> list[str]:
        folder = _model_folder(tmp, {"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 2})
        return _replace_model(COMMANDS[command](tmp, inputs), inputs, folder)

    return run


def _no_config(command: str) -> Callable[[Path, Inputs], list[str]]:
    def run(tmp: Path, inputs: Inputs) -> list[str]:
        return _replace_model(COMMANDS[command](tmp, inputs), inputs, _model_folder(tmp, None))

    return run


def _mixture_of_experts(tmp: Path, inputs: Inputs) -> list[str]:
    """``compress`` of a tiny Mixtral, whose decoder layers keep their experts' weights in a module type the
    compression engine does not know (3-D parameters)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                           max_position_embeddings=256)
    folder = tmp / "mixtral"
    MixtralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return _replace_model(COMMANDS["compress"](tmp, inputs), inputs, folder)


def _broken_copy(command: str, damage: Callable[[Path], None]) -> Callable[[Path, Inputs], list[str]]:
    """The command on a copy of the tiny model damaged by ``damage(folder)``."""

    def run(tmp: Path, inputs: Inputs) -> list[str]:
        folder = inputs.copy(inputs.model, tmp)
        damage(folder)
        return _replace_model(COMMANDS[command](tmp, inputs), inputs, folder)

    return run


def _remove_tokenizer(folder: Path) -> None:
    for path in folder.glob("*token*"):
        path.unlink()


def _replace_model(argv: list[str], inputs: Inputs, folder: Path) -> list[str]:
    return [str(folder) if arg == str(inputs.model) else arg for arg in argv]


COMMANDS = {
    "compress": _compress("--spec", "rtn-w8", "--out", "{tmp}/out"),
    "train": _train(),
    "evaluate": _argv("evaluate", "--model", "{model}", "--tasks", "cpt_piqa", "--limit", "1", "--out", "{tmp}/run"),
}


def _corrupt_compressed(tmp: Path, inputs: Inputs) -> list[str]:
    folder = inputs.copy(inputs.compressed, tmp)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return _train("--compression", str(folder))(tmp, inputs)


def _garbled_compression_json(tmp: Path, inputs: Inputs) -> list[str]:
    folder = inputs.copy(inputs.compressed, tmp)
    (folder / "compression.json").write_text('{"format": "cpt_bench.compressed/1", "spec": ')
    return _train("--compression", str(folder))(tmp, inputs)


def _corrupt_cache_entry(tmp: Path, inputs: Inputs) -> list[str]:
    """A corpus entry whose file fails its sha256, with its source archive gone and the index unreachable."""
    from cpt_bench.assets import registry
    from cpt_bench.assets.cache import CacheError

    cache = tmp / "cache"
    shutil.copytree(inputs.cache / "corpora", cache / "corpora")
    train = cache / "corpora" / "wikipedia" / "train.jsonl"
    train.write_text(train.read_text().replace("river", "rover"))
    inputs.monkeypatch.setenv("CPT_BENCH_CACHE", str(cache))

    def offline(dist, dest):
        raise CacheError(f"could not download {dist.requirement} from the package index: network unreachable")

    inputs.monkeypatch.setattr(registry, "_pip_download", offline)
    return _compress("--spec", "gptq-w4g32", "--n-windows", "1", "--seqlen", "16", "--out", str(tmp / "out"))(
        tmp, inputs)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _export_peft(change: Callable[[Path], None]) -> Callable[[Path, Inputs], list[str]]:
    """``prompt export-peft`` of a copy of the prompt damaged by ``change(folder)``."""

    def run(tmp: Path, inputs: Inputs) -> list[str]:
        folder = inputs.copy(inputs.prompt, tmp)
        change(folder)
        return ["prompt", "export-peft", str(folder), str(tmp / "peft")]

    return run


def _foreign_prompt(kind: str) -> Callable[[Path, Inputs], Callable[[], object]]:
    """A soft prompt trained for another model: hidden size 48, another tokenizer, or other weights."""

    def run(tmp: Path, inputs: Inputs) -> Callable[[], object]:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(inputs.model)
        config = LlamaConfig.from_pretrained(inputs.model)
        if kind == "hidden":
            config.hidden_size, config.intermediate_size = 48, 96
        if kind == "tokenizer":
            tokenizer = build_tiny_tokenizer()
            tokenizer.add_tokens(["<extra>"])
        torch.manual_seed(1)
        model = LlamaForCausalLM(config)
        model.name_or_path = f"other-{kind}"
        folder = save_random_prompt(tmp / f"prompt-{kind}", model, tokenizer)
        return _adapter(soft_prompt=str(folder))(tmp, inputs)

    return run


def _before_loading(make: Callable[[Path, Inputs], Invocation]) -> Callable[[Path, Inputs], Invocation]:
    """``make``'s invocation, with every way of loading weights made to fail loudly: the error must come first."""

    def run(tmp: Path, inputs: Inputs) -> Invocation:
        def loaded(*args, **kwargs):
            raise AssertionError("weights were loaded before the bad input was refused")

        for target in ("lm_eval.models.huggingface.HFLM.__init__", "cpt_bench.models.load_model",
                       "cpt_bench.lmeval.adapter.load_model", "transformers.AutoModelForCausalLM.from_pretrained"):
            inputs.monkeypatch.setattr(target, loaded)
        return make(tmp, inputs)

    return run


def _hard_prompt_file(content: str | bytes) -> Callable[[Path, Inputs], Callable[[], object]]:
    """``hard_prompt=file:TMP/prompt.txt``, the file holding ``content``."""

    def run(tmp: Path, inputs: Inputs) -> Callable[[], object]:
        path = tmp / "prompt.txt"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return _adapter(hard_prompt=f"file:{path}")(tmp, inputs)

    return run


def _adapter_on_device(device: str) -> Callable[[Path, Inputs], Callable[[], object]]:
    """``--model cpt --model_args pretrained=...,hard_prompt=paper,device=DEVICE`` on a machine without CUDA."""
    from cpt_bench.lmeval.adapter import CptLM

    def run(tmp: Path, inputs: Inputs) -> Callable[[], object]:
        inputs.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return partial(CptLM.create_from_arg_string, f"pretrained={inputs.model},hard_prompt=paper,device={device}",
                       {"batch_size": 1})

    return run


def _compression_named_like_a_folder(tmp: Path, inputs: Inputs) -> Callable[[], object]:
    """``compression=rtn-w8`` while the working folder holds a checkpoint folder called ``rtn-w8``."""
    shutil.copytree(inputs.compressed, tmp / "rtn-w8")
    inputs.monkeypatch.chdir(tmp)
    return _adapter(compression="rtn-w8")(tmp, inputs)


def _checkpoint_of_another_model(tmp: Path, inputs: Inputs) -> Callable[[], object]:
    """The tiny model's checkpoint paired with a copy of the model whose weights differ."""
    from transformers import AutoModelForCausalLM

    other = inputs.copy(inputs.model, tmp)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(other)
    return _replace_model_arg(_adapter(compression="{compressed}")(tmp, inputs), inputs, other)


def _replace_model_arg(invocation: Callable[[], object], inputs: Inputs, folder: Path) -> Callable[[], object]:
    arg_string, extra = invocation.args
    return partial(invocation.func, arg_string.replace(f"pretrained={inputs.model}", f"pretrained={folder}"), extra)


def _matrix(*extra: str, **overrides) -> Callable[[Path, Inputs], list[str]]:
    """``cpt-bench matrix CONFIG *extra`` on a tiny config of the tiny model (``tests/test_matrix.py``), the
    filled fake cache as the cache."""
    from .test_matrix import tiny_config, write_config

    def run(tmp: Path, inputs: Inputs) -> list[str]:
        inputs.monkeypatch.setenv("CPT_BENCH_CACHE", str(inputs.cache))
        filled = {key: value.format(tmp=tmp) if isinstance(value, str) else value for key, value in overrides.items()}
        config = tiny_config(inputs.model) | filled
        return ["matrix", str(write_config(tmp, config)), *extra]

    return run


def _lm_eval_cli(*args: str) -> Callable[[Path, Inputs], Callable[[], object]]:
    """lm-eval's own command line ``ARGS`` as ``cpt-lm-eval`` runs it, with a folder of text files at ``{tmp}/notes``
    (``{model}``, ``{tmp}`` filled in)."""
    from lm_eval.__main__ import cli_evaluate

    def run(tmp: Path, inputs: Inputs) -> Callable[[], object]:
        (tmp / "notes").mkdir()
        for index in range(3):
            (tmp / "notes" / f"{index}.txt").write_text(f"note {index}: river stone light garden\n")
        fill = {"model": inputs.model, "tmp": tmp}
        lm_eval_logger = logging.getLogger("lm_eval")  # lm-eval's setup_logging changes it: restored afterwards,
        # and _clear_logging_caches (the case's ``after``) drops what the loggers decided meanwhile
        for attribute in ("level", "propagate", "handlers"):
            inputs.monkeypatch.setattr(lm_eval_logger, attribute, copy.copy(getattr(lm_eval_logger, attribute)))
        inputs.monkeypatch.setattr("lm_eval.utils._LOGGING_CONFIGURED", False)
        inputs.monkeypatch.setenv("LMEVAL_LOG_LEVEL", "ERROR")  # lm-eval's own progress lines
        inputs.monkeypatch.setattr("sys.argv", ["lm_eval", *(arg.format(**fill) for arg in args)])
        return cli_evaluate

    return run


def _clear_logging_caches(tmp: Path) -> None:
    """After ``_lm_eval_cli``: ``setLevel`` clears every logger's cached level decisions (the restored attributes
    do not)."""
    logger = logging.getLogger("lm_eval")
    logger.setLevel(logger.level)


def _disk_full_compress(tmp: Path, inputs: Inputs) -> list[str]:
    """Recompressing into an existing checkpoint folder when the disk fills while writing the weights."""
    out = inputs.copy(inputs.compressed, tmp)
    real_write = os.write

    def full_disk(fd: int, data) -> int:
        if "model.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    inputs.monkeypatch.setattr(os, "write", full_disk)
    return _compress("--spec", "rtn-w4g32", "--out", str(out))(tmp, inputs)


def _read_only_out(tmp: Path, inputs: Inputs) -> list[str]:
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return _compress("--spec", "rtn-w8", "--out", str(locked / "out"))(tmp, inputs)


def _permission_denied_out(tmp: Path, inputs: Inputs) -> list[str]:
    """As ``_read_only_out``, for root too: making a folder under ``locked`` fails as for a user without rights."""
    (tmp / "locked").mkdir()
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if Path(path).parent == tmp / "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    inputs.monkeypatch.setattr(os, "mkdir", refuse)
    return _compress("--spec", "rtn-w8", "--out", str(tmp / "locked" / "out"))(tmp, inputs)


def _out_under_a_file(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "notes.txt").write_text("mine\n")
    return _compress("--spec", "rtn-w8", "--out", str(tmp / "notes.txt" / "out"))(tmp, inputs)


def _diverging_training(tmp: Path, inputs: Inputs) -> list[str]:
    """Prompt training whose 3rd training step's loss is NaN (as from a too large learning rate in bf16)."""
    from cpt_bench.recovery import training

    real, training_calls = training.prompted_loss, []

    def poisoned(model, prompt, ids, *args):
        loss = real(model, prompt, ids, *args)
        if torch.is_grad_enabled():
            training_calls.append(1)
            return loss * math.nan if len(training_calls) == 3 else loss
        return loss

    inputs.monkeypatch.setattr(training, "prompted_loss", poisoned)
    return _train("--steps", "4", "--eval-every", "2")(tmp, inputs)


def _diverged_prompt_kept(tmp: Path) -> None:
    from cpt_bench.recovery.artifact import read_prompt

    prompt = read_prompt(tmp / "prompt")
    assert prompt.meta["stopped"] == "diverged" and prompt.meta["best"]["step"] in (0, 2)
    assert torch.isfinite(prompt.embeddings).all() and (tmp / "prompt" / "checkpoint.pt").is_file()


def _nan_model_training(tmp: Path, inputs: Inputs) -> list[str]:
    """Prompt training on a model whose weights hold a NaN (as a broken compression may)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(inputs.model, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan
    folder = tmp / "nan-model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(inputs.model).save_pretrained(folder)
    return _replace_model(_train()(tmp, inputs), inputs, folder)


def _nothing_at(*names: str) -> Callable[[Path], None]:
    def after(tmp: Path) -> None:
        for name in names:
            assert not (tmp / name).exists(), f"{name} was created"

    return after


# ---------------------------------------------------------------------------------------------- the catalogue

SPEC_GRAMMAR = r"; valid: dense \| \(rtn\|gptq\)-w"
CASES = [
    # compression specs
    Case("spec-unknown", _compress("--spec", "int4"), rf"invalid compression spec 'int4': unknown spec{SPEC_GRAMMAR}"),
    Case("spec-bits-out-of-range", _compress("--spec", "gptq-w5g64"),
         r"invalid compression spec 'gptq-w5g64': bits 5 is not one of 2, 3, 4, 8"),
    Case("spec-sparsity-out-of-range", _compress("--spec", "sparsegpt-95"),
         r"invalid compression spec 'sparsegpt-95': sparsity 95% is outside 0-90"),
    Case("spec-group-size-unknown", _compress("--spec", "rtn-w4g48"),
         r"group size 48 is not one of 32, 64, 128 \(or none for per channel\)"),
    Case("spec-group-does-not-divide-width", _compress("--spec", "rtn-w4g64", "--out", "{tmp}/out"),
         r"spec rtn-w4g64: group size 64 does not divide the input width 32 of layer model\.layers\.0\.",
         after=_nothing_at("out")),
    Case("adapter-compression-unknown", _adapter(compression="gptq9"),
         rf"invalid compression spec 'gptq9': unknown spec{SPEC_GRAMMAR}"),
    Case("adapter-compression-mode-unknown", _adapter(compression="{compressed}", compression_mode="fast"),
         r"compression_mode must be one of simulated, real, got 'fast'"),
    # models
    Case("model-missing-compress", _compress("--model", "{tmp}/no-such-model", "--spec", "rtn-w8"),
         r"model folder .*/no-such-model does not exist; expected 'embedded' .*, a model folder or a Hugging Face id"),
    Case("model-missing-train", _train("--model", "{tmp}/no-such-model"),
         r"could not load model '.*/no-such-model': expected 'embedded' .*, a model folder"),
    Case("model-missing-adapter", _adapter(pretrained="{tmp}/no-such-model"),
         r"could not load model '.*/no-such-model': expected 'embedded' .*, a model folder"),
    Case("model-not-causal-compress", _not_causal("compress"),
         r"model '.*/not-a-causal-lm' is a 't5' model, not a causal"),
    Case("model-not-causal-train", _not_causal("train"), r"model '.*/not-a-causal-lm' is a 't5' model, not a causal"),
    Case("model-not-causal-evaluate", _not_causal("evaluate"),
         r"model '.*/not-a-causal-lm' is a 't5' model, not a causal"),
    Case("model-without-config-compress", _no_config("compress"),
         r"model folder .*/not-a-causal-lm has no config\.json"),
    Case("model-without-config-train", _no_config("train"),
         r"could not load model '.*/not-a-causal-lm': expected 'embedded' .*, a model folder"),
    Case("model-weights-truncated-train", _broken_copy("train", lambda f: _truncate(f / "model.safetensors")),
         r"could not load the weights \(expected .*\) of model '.*' from .*: .*(deserializ|header|incomplete)"),
    Case("model-weights-truncated-evaluate", _broken_copy("evaluate", lambda f: _truncate(f / "model.safetensors")),
         r"could not load model '.*' from .*: .*(deserializ|header|incomplete)"),
    Case("model-without-tokenizer-compress", _broken_copy("compress", _remove_tokenizer),
         r"could not load the tokenizer \(expected tokenizer\.json or its type's tokenizer files\) of model '.*' "
         r"from .*: Couldn't instantiate the backend tokenizer"),
    # soft prompt artifacts
    Case("prompt-wrong-hidden-size", _foreign_prompt("hidden"),
         r"prompt has hidden size 48 but model .* has 32: it cannot be used with this model"),
    Case("prompt-wrong-tokenizer", _foreign_prompt("tokenizer"),
         r"prompt was trained for tokenizer .* but tokenizer .* differs .*; pass allow_cross_model=True"),
    Case("prompt-wrong-model", _foreign_prompt("model"),
         r"prompt was trained for model 'other-model' but model .* has a different token embedding matrix"),
    Case("prompt-missing", _adapter(soft_prompt="{tmp}/no-such-prompt"),
         r"no-such-prompt is not a prompt folder: prompt\.safetensors is missing"),
    Case("prompt-truncated-safetensors", _export_peft(lambda f: _truncate(f / "prompt.safetensors")),
         r"prompt\.safetensors fails its sha256 check", after=_nothing_at("peft")),
    Case("prompt-json-corrupt", _export_peft(lambda f: _truncate(f / "prompt.json")),
         r"prompt\.json is not valid JSON", after=_nothing_at("peft")),
    Case("prompt-json-missing-field", _export_peft(
        lambda f: (f / "prompt.json").write_text(json.dumps(
            {k: v for k, v in json.loads((f / "prompt.json").read_text()).items() if k != "sha256"}))),
         r"prompt\.json lacks .*sha256", after=_nothing_at("peft")),
    # compressed checkpoints and the cache
    Case("compressed-checkpoint-corrupt", _corrupt_compressed,
         r"model\.safetensors is corrupted: sha256 .* differs from .* recorded in compression\.json"),
    Case("compressed-manifest-corrupt", _garbled_compression_json,
         r"cannot read compressed checkpoint manifest .*compression\.json"),
    Case("cache-entry-corrupt-and-unrebuildable", _corrupt_cache_entry,
         r"cache entry .*corpora/wikipedia is unusable \(file train\.jsonl fails its sha256 check\) and could not "
         r"be rebuilt: .*could not download gensim==4\.4\.0"),
    # corpora too short, counts out of range
    Case("calibration-seqlen-longer-than-context", _before_loading(
        _compress("--spec", "gptq-w4g32", "--n-windows", "1", "--seqlen", "100000", "--out", "{tmp}/out")),
         r"^--seqlen: 100000 tokens exceed model .*tiny-model.*'s context of 512 tokens$", after=_nothing_at("out")),
    Case("calibration-seqlen-longer-than-corpus", _with_short_corpus(
        _compress("--spec", "gptq-w4g32", "--n-windows", "1", "--seqlen", "500", "--corpus", "text:{tmp}/short",
                  "--out", "{tmp}/out")),
         r"corpus 'text:.*/short' train split has \d+ tokens, too short for calibration windows of 500 tokens",
         after=_nothing_at("out")),
    Case("compress-checkpoint-format-unknown", _before_loading(
        _compress("--spec", "gptq-w4g32", "--export-gptq", "{tmp}/gptq", "--checkpoint-format", "gptq_v3")),
         r"^--checkpoint-format must be one of gptq, gptq_v2, got 'gptq_v3'$", after=_nothing_at("gptq")),
    Case("calibration-windows-zero", _compress("--spec", "gptq-w4g32", "--n-windows", "0"),
         r"calibration setting n_windows must be a positive integer, got 0"),
    Case("calibration-seqlen-negative", _compress("--spec", "gptq-w4g32", "--seqlen", "-8"),
         r"calibration setting seqlen must be a positive integer, got -8"),
    Case("prompt-seqlen-longer-than-context", _before_loading(_train("--seqlen", "100000")),
         r"^--n-virtual-tokens 3 \+ --seqlen 100000: 100003 tokens exceed model .*tiny-model.*'s context of 512 "
         r"tokens$"),
    Case("prompt-seqlen-longer-than-corpus", _with_short_corpus(_train("--seqlen", "500", "--source",
                                                                       "text:{tmp}/short")),
         r"train split of 'text:.*/short' has \d+ tokens, fewer than seqlen 500"),
    Case("prompt-steps-zero", _train("--steps", "0"), r"soft prompt setting steps must be a positive integer, got 0"),
    Case("prompt-steps-negative", _train("--steps", "-5"),
         r"soft prompt setting steps must be a positive integer, got -5"),
    Case("prompt-tokens-zero", _train("--n-virtual-tokens", "0"),
         r"soft prompt setting n_virtual_tokens must be a positive integer, got 0"),
    Case("prompt-resume-without-checkpoint", _train("--resume"),
         r"--resume: no checkpoint at .*checkpoint\.pt; start without --resume"),
    Case("prompt-lr-too-large", _train("--lr", "1e38"), r"soft prompt setting lr must be a positive number at most "
         r"10, got 1e\+38"),
    Case("prompt-training-diverges", _diverging_training,
         r"training diverged at step 3 \(the training loss or gradient is nan\); kept the best soft prompt so "
         r"far \(step [02]\) in .*prompt", after=_diverged_prompt_kept),
    Case("prompt-model-computes-nan", _nan_model_training,
         r"the validation loss before any training is nan: model '.*nan-model' \(dense\) computes non-finite"),
    Case("evaluate-unknown-task", _argv("evaluate", "--model", "{model}", "--tasks", "nope"),
         r"unknown task\(s\) nope; expected lm-eval task or group names"),
    Case("evaluate-limit-zero", _argv("evaluate", "--limit", "0"),
         r"limit_items must be a positive count or omitted, got 0"),
    Case("evaluate-seqlen-zero", _argv("evaluate", "--seqlen", "0"),
         r"seqlen and batch size must be positive, got 0 and 8"),
    Case("evaluate-seqlen-longer-than-context", _before_loading(
        _argv("evaluate", "--model", "{model}", "--tasks", "cpt_ppl_milton", "--seqlen", "4096")),
         r"^--seqlen: 4096 tokens exceed model .*tiny-model.*'s context of 512 tokens$"),
    Case("evaluate-batch-size-negative", _argv("evaluate", "--batch-size", "-1"),
         r"seqlen and batch size must be positive, got 1024 and -1"),
    # lm-eval model_args of the cpt adapter
    Case("adapter-soft-and-hard-prompt", _adapter(soft_prompt="{prompt}", hard_prompt="paper"),
         r"give one of hard_prompt, soft_prompt, lora, eora and idp, not soft_prompt and hard_prompt"),
    Case("adapter-prefix-cache-not-a-bool", _adapter(hard_prompt="paper", prefix_cache="maybe"),
         r"prefix_cache must be true or false, got 'maybe'"),
    Case("adapter-hard-prompt-empty", _adapter(hard_prompt=""), r"^unknown hard prompt ''; expected a registered name"),
    Case("adapter-hard-prompt-misspelt", _before_loading(_adapter(hard_prompt="papr")),
         r"^unknown hard prompt 'papr' \(did you mean 'paper'\?\); expected a registered name \(paper, paper_long\), "
         r"text:TEXT or file:PATH$"),
    Case("adapter-hard-prompt-text-empty", _before_loading(_adapter(hard_prompt="text:")),
         r"^hard prompt 'text:' is empty: expected text:TEXT with some text$"),
    Case("adapter-hard-prompt-file-missing", _before_loading(_adapter(hard_prompt="file:{tmp}/prompt.txt")),
         r"^hard prompt file .*prompt\.txt not found; expected file:PATH of a UTF-8 text file$"),
    Case("adapter-hard-prompt-file-empty", _before_loading(_hard_prompt_file(" \n")),
         r"^hard prompt file .*prompt\.txt is empty; expected the prompt's text$"),
    Case("adapter-hard-prompt-file-not-utf8", _before_loading(_hard_prompt_file(b"\xff\xfe")),
         r"^hard prompt file .*prompt\.txt cannot be read as UTF-8 text: .*codec can't decode"),
    Case("adapter-hard-prompt-text-cut-at-a-comma", _before_loading(_adapter(hard_prompt="text:Answer, briefly.")),
         r"^unknown model_arg ' briefly\.' for the cpt model \(lm-eval splits model_args at commas, also inside a "
         r"text: hard prompt: quote the value, hard_prompt=\"text:\.\.\.\", or give it as file:PATH\); accepted: "),
    Case("adapter-prompt-position-unknown", _before_loading(_adapter(hard_prompt="paper", prompt_position="last")),
         r"^prompt_position must be one of after_bos, first, got 'last'$"),
    Case("compress-layer-type-unknown", _mixture_of_experts, r"holds weights in Mixtral\w+"),
    Case("adapter-prompt-fills-the-context", _adapter(soft_prompt="{prompt}", max_length="5"),
         r"a prompt of 5 tokens leaves no room in a context of 5 tokens"),
    # arguments and files checked before anything loads (issue 10)
    Case("adapter-model-arg-misspelt", _before_loading(_adapter(compresion="rtn-w8")),
         r"unknown model_arg 'compresion' for the cpt model \(did you mean 'compression'\?\); accepted: .*compression"),
    Case("adapter-device-not-a-device", _adapter_on_device("gpu"),
         r"device 'gpu' is not a torch device; expected cpu, cuda, cuda:N or auto"),
    Case("adapter-prompt-folder-missing-before-loading", _before_loading(_adapter(soft_prompt="{tmp}/no-such-prompt")),
         r"no-such-prompt is not a prompt folder: prompt\.safetensors is missing"),
    Case("adapter-compression-both-spec-and-folder", _compression_named_like_a_folder,
         r"compression 'rtn-w8' is both a compression spec and an existing path; write \./rtn-w8 for the folder"),
    Case("adapter-compression-folder-without-manifest", _adapter(compression="{tmp}"),
         r"compression '.*' is a folder without compression\.json or GPTQ quantization settings; expected a "
         r"compressed checkpoint folder"),
    Case("adapter-checkpoint-of-another-model", _checkpoint_of_another_model,
         r"checkpoint .* was compressed from model '.*' \(weights [0-9a-f]{12}\), not from '.*'"),
    Case("train-source-not-a-corpus", _before_loading(_train("--source", "wikipedai")),
         r"--source 'wikipedai' is not a corpus spec: expected a built-in corpus"),
    Case("train-compression-not-a-spec", _before_loading(_train("--compression", "gptq-w5")),
         r"--compression 'gptq-w5' is neither a compressed checkpoint folder nor a valid spec"),
    Case("matrix-out-cannot-be-created", _matrix("--out", "/proc/forbidden/run"),
         r"--out /proc/forbidden/run: cannot create the folder \(.*\); expected a folder that exists or can be "
         r"created"),
    Case("matrix-dry-run-model-missing", _matrix("--dry-run", model="{tmp}/no-such-model"),
         r"could not load model '.*no-such-model': expected 'embedded' .*, a model folder or a Hugging Face id"),
    Case("matrix-dry-run-task-unknown", _matrix("--dry-run", targets=[{"task": "cpt_ppl_klingon", "limit": 2}]),
         r"targets\[0\]\.task: unknown task 'cpt_ppl_klingon'"),
    Case("matrix-dry-run-generative-target", _before_loading(_matrix("--dry-run", targets=[
        {"task": "cpt_ppl_wikipedia", "limit": 2}, {"task": "cpt_gsm8k_cot", "limit": 2, "metric": "acc"}])),
         r"^targets\[1\]\.metric: task 'cpt_gsm8k_cot' reports no metric 'acc'; expected one of "
         r"exact_match,strict-match, exact_match,flexible-extract$"),
    Case("matrix-dry-run-metric-not-reported", _before_loading(_matrix("--dry-run", targets=[
        {"task": "cpt_winogrande", "limit": 2, "metric": "acc_norm"}])),
         r"^targets\[0\]\.metric: task 'cpt_winogrande' reports no metric 'acc_norm'; expected one of "
         r"acc$"),
    Case("matrix-dry-run-metric-of-another-filter", _before_loading(_matrix("--dry-run", targets=[
        {"task": "cpt_piqa", "limit": 2, "metric": "acc,strict-match"}])),
         r"^targets\[0\]\.metric: task 'cpt_piqa' reports no metric 'acc,strict-match'; expected one of "
         r"acc, acc_norm$"),
    Case("matrix-dry-run-prompt-longer-than-context",
         _matrix("--dry-run", prompts={"soft": {"sources": ["wikipedia"], "trained_at": ["rtn-w4g32"],
                                                "training": {"n_virtual_tokens": 500, "seqlen": 16}}}),
         r"prompts\.soft\.training n_virtual_tokens 500 \+ seqlen 16: 516 tokens exceed model .*'s context of 512 "
         r"tokens"),
    Case("matrix-dry-run-source-repeated",
         _matrix("--dry-run", prompts={"soft": {"sources": ["wikipedia", "wikipedia"], "trained_at": ["rtn-w4g32"]}}),
         r"config .*: prompts\.soft\.sources\[1\]: 'wikipedia' repeats sources\[0\]; expected each once$"),
    Case("matrix-dry-run-ppl-window-and-prompt-exceed-context", _matrix("--dry-run", ppl_seqlen=500),
         r"ppl_seqlen 500 \+ the longest prompt \(\d+ tokens\): \d+ tokens exceed model .*'s context of 512 tokens"),
    # lm-eval's command line
    Case("lm-eval-corpus-for-a-task-with-its-own", _lm_eval_cli(
        "--model", "hf", "--model_args", "pretrained={model}", "--tasks", "cpt_ppl", "--include_path", str(TASKS_DIR),
        "--metadata", '{{"corpus": "text:{tmp}/notes"}}', "--device", "cpu"),
         r"^metadata corpus 'text:.*/notes': only task cpt_ppl_corpus takes a corpus; this task scores its own corpus "
         r"'wikipedia' \(score 'text:.*/notes' with --tasks cpt_ppl_corpus", after=_clear_logging_caches),
    # output folders and disks
    Case("out-not-writable", _read_only_out, r"cannot (write|access) .*locked/out.*: Permission denied",
         needs_non_root=True),
    Case("out-permission-denied-simulated", _permission_denied_out,
         r"--out .*locked/out: cannot create the folder \(Permission denied\)"),
    Case("out-under-a-file", _out_under_a_file,
         r"--out .*notes\.txt/out: cannot create the folder \(Not a directory\)"),
    Case("disk-full-while-writing", _disk_full_compress,
         r"cannot write .*model\.safetensors: No space left on device"),
]


# ---------------------------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def shared(_filled_fake_cache, tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """The tiny model, a prompt for it, it compressed by rtn-w8, the filled fake cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt_bench.compress import Spec, compress_to_folder
    from cpt_bench.compress.spec import CalibrationSettings

    root = tmp_path_factory.mktemp("bad-inputs")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.name_or_path = str(tiny_model_dir)
    prompt = save_random_prompt(root / "prompt", model, AutoTokenizer.from_pretrained(tiny_model_dir))
    compressed = root / "compressed"
    compress_to_folder(str(tiny_model_dir), Spec.parse("rtn-w8"), CalibrationSettings(), compressed)
    return tiny_model_dir, prompt, compressed, _filled_fake_cache


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    """No progress bars on stderr (ours and transformers' "Loading weights"): what is left is the error report."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    def silent(*args, **kwargs):
        return tqdm(*args, **kwargs | {"disable": True})

    for module in ("cpt_bench.compress.sequential", "cpt_bench.recovery.training"):
        monkeypatch.setattr(f"{module}.tqdm", silent)
    transformers_logging.disable_progress_bar()
    yield
    transformers_logging.enable_progress_bar()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _invoke(invocation: Invocation, capsys, monkeypatch) -> str:
    """Run the invocation as its user would (``cpt-bench ARGV``, or ``cpt-lm-eval`` reaching the callable); return
    the one error line."""
    if isinstance(invocation, list):
        prog, code = "cpt-bench", cli.main(invocation)
    else:
        prog = "cpt-lm-eval"
        monkeypatch.setattr("lm_eval.__main__.cli_evaluate", invocation)
        with pytest.raises(SystemExit) as caught:
            lmeval_cli.main()
        code = caught.value.code
    err = capsys.readouterr().err
    assert code == 2, f"exit status {code}, not 2"
    assert err.endswith("\n") and err.count("\n") == 1, f"stderr is not one line:\n{err}"
    assert err.startswith(f"{prog}: error: ")
    return err.removeprefix(f"{prog}: error: ").rstrip("\n")


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_one_line(case: Case, shared, tmp_path, monkeypatch, capsys):
    if case.needs_non_root and os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not apply")
    inputs = Inputs(*shared, monkeypatch)
    monkeypatch.setenv("CPT_BENCH_CACHE", str(inputs.cache))
    invocation = case.run(tmp_path, inputs)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    message = _invoke(invocation, capsys, monkeypatch)
    assert re.search(case.message, message), f"{message!r} does not match {case.message!r}"
    monkeypatch.undo()  # e.g. a patched os.write, before reading the files back
    after = _snapshot(tmp_path)
    changed = [name for name, data in before.items() if after.get(name) != data]
    assert not changed, f"files lost or overwritten: {changed}"
    leftovers = [str(p) for p in tmp_path.rglob("*") if LEFTOVER.search(p.name)]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    if case.after:
        case.after(tmp_path)


def test_catalogue_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 22


def test_cpt_lm_eval_reports_our_errors_in_one_line(monkeypatch, capsys):
    from cpt_bench.lmeval.adapter import CptLM

    def ours() -> None:  # what lm-eval does with --model cpt --model_args soft_prompt=p,hard_prompt=paper
        CptLM.create_from_arg_string("soft_prompt=p,hard_prompt=paper", {})

    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", ours)
    with pytest.raises(SystemExit) as caught:
        lmeval_cli.main()
    assert caught.value.code == 2
    assert capsys.readouterr().err == ("cpt-lm-eval: error: give one of hard_prompt, soft_prompt, lora, eora and "
                                       "idp, not soft_prompt and hard_prompt\n")


def _library_value_error(*args, **kwargs):
    """Stands in for a library call that fails on what our code passes it: torch raises the ValueError."""
    return torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(4, dtype=torch.long))


def _assert_reported_as_bug(caught: pytest.ExceptionInfo, capsys) -> None:
    """The error kept its type, message and traceback (through torch) and carries the bug note; no one-liner."""
    assert "Expected input batch_size (2) to match target batch_size (4)" in str(caught.value)
    assert caught.value.__notes__ == [BUG_NOTE]
    assert any("torch" in str(entry.path) for entry in caught.traceback)
    assert "error:" not in capsys.readouterr().err


def test_a_library_error_through_our_code_keeps_its_traceback_and_gets_the_bug_note(shared, tmp_path, monkeypatch,
                                                                                     capsys):
    from cpt_bench.compress import CalibrationSettings, Spec, compress_to_folder

    model, _, _, cache = shared
    monkeypatch.setenv("CPT_BENCH_CACHE", str(cache))
    monkeypatch.setattr("cpt_bench.compress.checkpoints.compress_model", _library_value_error)
    with pytest.raises(ValueError) as caught:  # cpt-bench
        cli.main(["compress", "--model", str(model), "--spec", "rtn-w8", "--out", str(tmp_path / "a")])
    _assert_reported_as_bug(caught, capsys)

    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: compress_to_folder(
        str(model), Spec.parse("rtn-w8"), CalibrationSettings(), tmp_path / "b"))
    with pytest.raises(ValueError) as caught:  # cpt-lm-eval, the error raised below our code
        lmeval_cli.main()
    _assert_reported_as_bug(caught, capsys)


def test_cpt_lm_eval_passes_lm_evals_own_errors_through_untouched(monkeypatch, capsys):
    from lm_eval.api.registry import get_model

    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: get_model("no-such-model"))
    with pytest.raises(ValueError, match="no model for this name found") as caught:
        lmeval_cli.main()
    assert not getattr(caught.value, "__notes__", None)
    assert capsys.readouterr().err == ""
