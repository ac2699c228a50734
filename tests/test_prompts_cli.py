"""``cpt-bench prompt train`` / ``export-peft`` through their parsers (cli.py registers the same functions)."""

from __future__ import annotations

import argparse
import json

import pytest
from safetensors.torch import load_file

from cpt_bench.recovery.artifact import PEFT_TENSOR_KEY, read_prompt
from cpt_bench.recovery.cli_commands import add_prompt_parser
from cpt_bench.recovery.training import SoftPromptError

from .conftest import TINY_SEQLEN_TOKENS


def _run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="cpt-bench")
    add_prompt_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.run(args)


def _train_args(model, out, *extra) -> list[str]:
    return ["prompt", "train", "--model", str(model), "--source", "wikipedia", "--out", str(out),
            "--n-virtual-tokens", "3", "--steps", "2", "--eval-every", "2", "--seqlen", str(TINY_SEQLEN_TOKENS),
            "--eval-windows", "2", "--lr", "0.05", "--device", "cpu", *extra]


def test_train_then_export_peft(filled_fake_cache, tiny_model_dir, tmp_path, capsys):
    _run(_train_args(tiny_model_dir, tmp_path / "p"))
    assert "best validation token perplexity" in capsys.readouterr().out
    prompt = read_prompt(tmp_path / "p")
    assert prompt.meta["hyperparameters"]["n_virtual_tokens"] == 3 and prompt.meta["compression"] == "dense"
    _run(["prompt", "export-peft", str(tmp_path / "p"), str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 3
    assert load_file(tmp_path / "peft" / "adapter_model.safetensors")[PEFT_TENSOR_KEY].equal(prompt.embeddings)


def test_bad_hyperparameter_is_a_value_error(filled_fake_cache, tiny_model_dir, tmp_path):
    with pytest.raises(SoftPromptError, match="lr must be a positive number"):
        _run(_train_args(tiny_model_dir, tmp_path / "p", "--lr", "0"))
