"""Soft-prompt training on the tiny model: it learns, resumes exactly, validates settings, stops on NaN."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt_bench.recovery.artifact import read_prompt
from cpt_bench.recovery.soft import initial_prompt, train_soft_prompt
from cpt_bench.recovery.training import (
    CHECKPOINT,
    SoftPromptConfig,
    SoftPromptError,
    TrainingDiverged,
    TrainingError,
    trained_improved,
)

from .conftest import TINY_SEQLEN_TOKENS

SOURCE = "wikipedia"


def _settings(**overrides) -> SoftPromptConfig:
    base = {"n_virtual_tokens": 4, "init": "vocab", "lr": 0.1, "warmup_steps": 1, "steps": 6, "batch_size": 2,
            "seqlen": TINY_SEQLEN_TOKENS, "eval_every": 3, "eval_windows": 4, "seed": 0, "precision": "fp32"}
    return SoftPromptConfig(**{**base, **overrides})


@pytest.fixture
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _train(tiny, out, config, **kwargs):
    return train_soft_prompt(*tiny, config, SOURCE, out, model_name="tiny", **kwargs)


def test_training_lowers_validation_loss_and_writes_the_artifact(filled_fake_cache, tiny, tmp_path):
    folder = _train(tiny, tmp_path / "p", _settings())
    prompt = read_prompt(folder)
    curve = prompt.meta["curve"]
    assert [r["step"] for r in curve] == [0, 3, 6]
    assert curve[-1]["val_loss"] < curve[0]["val_loss"]
    assert prompt.meta["best"]["val_loss"] == min(r["val_loss"] for r in curve)
    assert prompt.embeddings.shape == (4, 32) and prompt.embeddings.dtype == torch.float32
    assert prompt.meta["compression"] == "dense" and prompt.meta["source"]["corpus"] == SOURCE
    assert prompt.meta["hyperparameters"]["lr"] == 0.1
    assert prompt.meta["improved"] is True and prompt.meta["best"]["step"] > 0 and trained_improved(prompt.meta)


def test_a_prompt_that_never_beats_its_initialisation_is_recorded_and_warned(filled_fake_cache, tiny, tmp_path,
                                                                             caplog):
    config = _settings(lr=1e-30, warmup_steps=0, steps=2, eval_every=1)  # far below float32 resolution of the prompt
    with caplog.at_level(logging.WARNING, logger="cpt_bench.recovery.training"):
        prompt = read_prompt(_train(tiny, tmp_path / "p", config))
    assert prompt.meta["improved"] is False and prompt.meta["best"]["step"] == 0 and not trained_improved(prompt.meta)
    assert torch.equal(prompt.embeddings, initial_prompt(*tiny, config))  # what is saved is the initialisation
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "never beat its initialisation in 2 steps" in warning.getMessage() and SOURCE in warning.getMessage()


def test_prompt_json_without_the_improved_field_is_judged_by_its_best_step():
    assert not trained_improved({"best": {"step": 0}}) and trained_improved({"best": {"step": 20}})


def test_resume_after_interruption_continues_the_same_curve(filled_fake_cache, tiny, tmp_path):
    straight = read_prompt(_train(tiny, tmp_path / "straight", _settings()))

    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny, tmp_path / "resumed", _settings(), on_eval=interrupt)
    assert (tmp_path / "resumed" / CHECKPOINT).is_file()
    resumed = read_prompt(_train(tiny, tmp_path / "resumed", _settings(), resume=True))
    assert resumed.meta["curve"] == straight.meta["curve"]
    assert torch.equal(resumed.embeddings, straight.embeddings)


def test_resume_with_other_settings_is_refused(filled_fake_cache, tiny, tmp_path):
    _train(tiny, tmp_path / "p", _settings(steps=3))
    with pytest.raises(TrainingError, match=r"settings differ from the checkpoint's \(lr\)"):
        _train(tiny, tmp_path / "p", _settings(steps=3, lr=0.2), resume=True)


def test_nan_loss_stops_naming_the_step_and_keeps_the_best_prompt(filled_fake_cache, tiny, tmp_path):
    model, _ = tiny
    training_forwards = {"n": 0}

    def poison(module, args, output):  # NaN embeddings in the 3rd training step's forward
        if torch.is_grad_enabled():
            training_forwards["n"] += 1
        return output * math.nan if training_forwards["n"] == 3 and torch.is_grad_enabled() else output

    handle = model.get_input_embeddings().register_forward_hook(poison)
    try:
        with pytest.raises(TrainingDiverged, match="diverged at step 3"):
            _train(tiny, tmp_path / "p", _settings(eval_every=2))
    finally:
        handle.remove()
    prompt = read_prompt(tmp_path / "p")
    assert prompt.meta["stopped"] == "diverged" and prompt.meta["best"]["step"] == 2
    assert torch.isfinite(prompt.embeddings).all()


@pytest.mark.parametrize("init", ["vocab", "sample", "text", "random"])
def test_initialisations(tiny, init):
    model, tokenizer = tiny
    config = _settings(init=init, init_text="river stone" if init == "text" else None, n_virtual_tokens=16)
    prompt = initial_prompt(model, tokenizer, config)
    assert prompt.shape == (16, 32)
    weight = model.get_input_embeddings().weight.detach()
    if init == "vocab":
        assert torch.equal(prompt, weight[:16])
    if init == "text":
        ids = tokenizer("river stone", add_special_tokens=False)["input_ids"]
        assert len(ids) < 16 and torch.equal(prompt, weight[(ids * 16)[:16]])  # repeated, then cut
    assert torch.equal(prompt, initial_prompt(model, tokenizer, config))  # seeded


@pytest.mark.parametrize("overrides, message", [
    ({"init": "first"}, "init must be one of"),
    ({"lr": 0}, "lr must be a positive number"),
    ({"n_virtual_tokens": 0}, "n_virtual_tokens must be a positive integer"),
    ({"warmup_steps": 10}, "warmup_steps must be an integer in"),
    ({"init": "text"}, "init_text must be given"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"patience": 0}, "patience must be"),
])
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(SoftPromptError, match=message) as caught:
        _settings(**overrides)
    assert "\n" not in str(caught.value)
