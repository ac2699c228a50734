"""The ``cpt`` lm-eval adapter with prompts: exact against PEFT through plain HFLM and a hand computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cpt_bench.lmeval.adapter import CptLM, PromptAdapterError
from cpt_bench.recovery.artifact import PromptArtifactError, export_peft, load_prompt, read_prompt
from cpt_bench.recovery.hard import HARD_PROMPTS

from .prompt_helpers import (
    N_PROMPT_TOKENS,
    hand_loglikelihood,
    hand_rolling,
    instances,
    mc_pairs,
    rolling_texts,
    save_random_prompt,
)

CONTEXT_TOKENS = 64  # the whole context given to ``cpt``, prompt included: forces several rolling windows
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt_dir(tiny, tmp_path_factory):
    return save_random_prompt(tmp_path_factory.mktemp("prompt") / "p", *tiny)


@pytest.fixture(scope="module")
def peft_lm(prompt_dir, tiny_model_dir, tmp_path_factory):
    """Plain lm-eval ``hf`` with the exported PEFT adapter; max_length = context - virtual tokens (see notes)."""
    adapter = export_peft(prompt_dir, tmp_path_factory.mktemp("peft") / "adapter")
    return HFLM(pretrained=str(tiny_model_dir), peft=str(adapter), device="cpu", dtype="float32", batch_size=4,
                max_length=CONTEXT_TOKENS - N_PROMPT_TOKENS)


@pytest.fixture(scope="module")
def references(peft_lm, tiny, prompt_dir):
    """Loglikelihoods through PEFT, checked here against the hand computation once."""
    model, _ = tiny
    prompt = read_prompt(prompt_dir).embeddings
    mc = [score for score, _ in peft_lm.loglikelihood(instances("loglikelihood", mc_pairs()))]
    for (context, continuation), score in zip(mc_pairs(), mc, strict=True):
        context_ids, continuation_ids = peft_lm._encode_pair(context, continuation)
        assert score == pytest.approx(hand_loglikelihood(model, prompt, context_ids, continuation_ids), abs=TOLERANCE)
    short, checked = rolling_texts(n_words=6), 0
    for text, score in zip(short, peft_lm.loglikelihood_rolling(instances("loglikelihood_rolling",
                                                                          [(t,) for t in short])), strict=True):
        tokens = peft_lm.tok_encode(text)
        if len(tokens) < peft_lm.max_length:  # one window: the hand computation applies directly
            assert score == pytest.approx(hand_rolling(model, prompt, peft_lm.prefix_token_id, tokens), abs=TOLERANCE)
            checked += 1
    assert checked == len(short)
    long = rolling_texts(n_words=80)
    rolling = peft_lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in long]))
    return {"mc": mc, "rolling": rolling, "long": long}


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_soft_prompt_scores_equal_peft_and_hand(tiny_model_dir, prompt_dir, references, batch_size, prefix_cache):
    lm = CptLM(pretrained=str(tiny_model_dir), soft_prompt=str(prompt_dir), prefix_cache=prefix_cache,
               device="cpu", dtype="float32", batch_size=batch_size, max_length=CONTEXT_TOKENS)
    assert lm.max_length == CONTEXT_TOKENS - N_PROMPT_TOKENS
    mc = [score for score, _ in lm.loglikelihood(instances("loglikelihood", mc_pairs()))]
    assert mc == pytest.approx(references["mc"], abs=TOLERANCE)
    rolling = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in references["long"]]))
    assert len(lm.tok_encode(references["long"][0])) > 2 * lm.max_length  # several windows per document
    assert rolling == pytest.approx(references["rolling"], abs=TOLERANCE)
    memory = lm.memory_record()
    assert memory["prompt_tokens"] == N_PROMPT_TOKENS
    assert memory["prompt_embedding_bytes"] == N_PROMPT_TOKENS * 32 * 4
    assert (memory["prefix_cache_bytes"] > 0) == prefix_cache
    config = lm.model.config  # a position adds keys and values of every layer's kv heads to the cache
    head_dim = config.hidden_size // config.num_attention_heads
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    assert memory["kv_values_per_token"] == (per_position if prefix_cache else None)
    assert memory["model_resident_bytes"] == sum(p.numel() * 4 for p in lm.model.parameters()) + sum(
        b.numel() * b.element_size() for b in lm.model.buffers())
    assert memory["weight_formats"] == {}  # dense
    assert memory["peak_memory_bytes"] > 0


def test_hard_prompt_equals_conditioning_on_its_text(tiny_model_dir, tiny_lm):
    pairs = mc_pairs()
    lm = CptLM(pretrained=str(tiny_model_dir), hard_prompt="paper", device="cpu", dtype="float32", batch_size=8)
    ours = [score for score, _ in lm.loglikelihood(instances("loglikelihood", pairs))]
    text = HARD_PROMPTS["paper"]
    conditioned = instances("loglikelihood", [(text + context, continuation) for context, continuation in pairs])
    theirs = [score for score, _ in tiny_lm.loglikelihood(conditioned)]
    assert ours == pytest.approx(theirs, abs=TOLERANCE)
    assert lm.prompt_info["n_tokens"] == len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_hard_prompt_forms_give_one_prompt(tiny_model_dir, tmp_path):
    """A registered name, ``text:`` its text and ``file:`` a file holding it score identically; another text does
    not (the prompt is read, not ignored)."""
    requests = instances("loglikelihood", mc_pairs())
    path = tmp_path / "prompt.txt"
    path.write_text(HARD_PROMPTS["paper"], encoding="utf-8")

    def scores(prompt: str) -> list[float]:
        lm = CptLM(pretrained=str(tiny_model_dir), hard_prompt=prompt, device="cpu", dtype="float32", batch_size=8)
        return [score for score, _ in lm.loglikelihood(requests)]

    named = scores("paper")
    assert scores("text:" + HARD_PROMPTS["paper"]) == named
    assert scores(f"file:{path}") == named
    assert scores("text:Answer briefly.\n") != named


def test_hard_prompt_with_a_comma_through_lm_evals_command_line(tiny_model_dir, tmp_path, monkeypatch):
    """lm-eval's ``--model_args`` splits at commas outside quotes: a quoted ``text:`` value, a JSON ``--model_args``
    and ``file:`` carry a text with commas whole, and score identically."""
    from lm_eval._cli import HarnessCLI

    text = "First, read the question; then, answer it."
    path = tmp_path / "prompt.txt"
    path.write_text(text, encoding="utf-8")
    json_args = json.dumps({"pretrained": str(tiny_model_dir), "hard_prompt": "text:" + text})
    forms = [f'pretrained={tiny_model_dir},hard_prompt="text:{text}"', json_args,
             f"pretrained={tiny_model_dir},hard_prompt=file:{path}"]
    requests = instances("loglikelihood", mc_pairs())
    results = []
    for model_args in forms:
        monkeypatch.setattr("sys.argv", ["lm-eval", "--model", "cpt", "--tasks", "x", "--model_args", model_args])
        parsed = HarnessCLI().parse_args().model_args
        assert parsed["hard_prompt"] in ("text:" + text, f"file:{path}")
        lm = CptLM.create_from_arg_obj(parsed, {"device": "cpu", "dtype": "float32", "batch_size": 8})
        assert lm.prompt_info["text"] == text
        results.append([score for score, _ in lm.loglikelihood(requests)])
    assert results[0] == results[1] == results[2]


def test_unprompted_cpt_equals_hf(tiny_model_dir, tiny_lm):
    lm = CptLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=4)
    requests = instances("loglikelihood", mc_pairs())
    assert [s for s, _ in lm.loglikelihood(requests)] == pytest.approx([s for s, _ in tiny_lm.loglikelihood(requests)])
    assert lm.memory_record()["prompt_tokens"] == 0


def _other_model(tiny_model_dir, tmp_path, hidden: int = 32, seed: int = 1):
    torch.manual_seed(seed)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = hidden, 2 * hidden
    folder = tmp_path / f"other-{hidden}-{seed}"
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_prompt_for_another_model_is_refused_unless_overridden(tiny_model_dir, prompt_dir, tmp_path):
    other = _other_model(tiny_model_dir, tmp_path)
    with pytest.raises(PromptArtifactError, match="different token embedding matrix; pass allow_cross_model=True"):
        CptLM(pretrained=str(other), soft_prompt=str(prompt_dir), device="cpu", dtype="float32")
    lm = CptLM.create_from_arg_string(f"pretrained={other},soft_prompt={prompt_dir},allow_cross_model=true",
                                      {"device": "cpu"})  # as lm-eval parses --model_args
    assert lm.prompt_info["n_tokens"] == N_PROMPT_TOKENS


def test_prompt_of_another_hidden_size_is_refused_even_with_override(tiny_model_dir, prompt_dir, tmp_path):
    other = _other_model(tiny_model_dir, tmp_path, hidden=48)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(other), AutoTokenizer.from_pretrained(other)
    with pytest.raises(PromptArtifactError, match="hidden size 32 but model .* has 48"):
        load_prompt(prompt_dir, model, tokenizer, allow_cross_model=True)


def test_prompt_for_another_tokenizer_is_refused_unless_overridden(tiny, prompt_dir):
    model, _ = tiny
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    tokenizer.add_tokens(["zebra"])
    with pytest.raises(PromptArtifactError, match="trained for tokenizer"):
        load_prompt(prompt_dir, model, tokenizer)
    assert load_prompt(prompt_dir, model, tokenizer, allow_cross_model=True).embeddings.shape == (N_PROMPT_TOKENS, 32)


def test_changed_prompt_file_fails_its_checksum(tiny, prompt_dir, tmp_path):
    import shutil

    copy = shutil.copytree(prompt_dir, tmp_path / "copy")
    save_random_prompt(tmp_path / "other", *tiny, seed=5)
    shutil.copy(tmp_path / "other" / "prompt.safetensors", copy / "prompt.safetensors")
    with pytest.raises(PromptArtifactError, match="sha256"):
        read_prompt(copy)


def test_soft_and_hard_prompt_together_are_refused(tiny_model_dir, prompt_dir):
    with pytest.raises(PromptAdapterError, match="not soft_prompt and hard_prompt"):
        CptLM(pretrained=str(tiny_model_dir), soft_prompt=str(prompt_dir), hard_prompt="paper", device="cpu")


def test_prompt_trained_dense_applies_to_a_compressed_model(fake_cache, tiny_model_dir, prompt_dir, tiny_lm):
    """``compression=`` loads the model through cpt_bench.compress; the base-model fingerprint still matches."""
    lm = CptLM(pretrained=str(tiny_model_dir), compression="rtn-w4", soft_prompt=str(prompt_dir), device="cpu",
               dtype="float32", batch_size=4)
    assert lm.prompt_info["compression"] == "rtn-w4" and lm.prompt_info["trained_on"] == "dense"
    requests = instances("loglikelihood", mc_pairs())
    compressed = [s for s, _ in lm.loglikelihood(requests)]
    assert all(map(math.isfinite, compressed))
    assert compressed != pytest.approx([s for s, _ in tiny_lm.loglikelihood(requests)], abs=TOLERANCE)


def test_a_compressed_model_keeps_the_tokenizer_settings_hflm_is_given(fake_cache, tiny_model_dir):
    """With ``compression=`` the adapter hands HFLM the tokenizer it loaded, unless an HFLM argument changes how the
    tokenizer is built: then HFLM builds it, as plain ``hf`` would."""
    plain = CptLM(pretrained=str(tiny_model_dir), compression="rtn-w4", device="cpu", dtype="float32")
    told = CptLM(pretrained=str(tiny_model_dir), compression="rtn-w4", device="cpu", dtype="float32",
                 add_bos_token=not plain.tokenizer.add_bos_token)
    assert told.tokenizer.add_bos_token is not plain.tokenizer.add_bos_token
    assert plain.tok_encode("river stone") == CptLM(pretrained=str(tiny_model_dir), device="cpu",
                                                    dtype="float32").tok_encode("river stone")


def test_compression_may_be_a_compressed_checkpoint_folder(fake_cache, tiny_model_dir, prompt_dir, tmp_path):
    """A folder written by ``cpt-bench compress --out`` scores exactly like the same spec from the cache."""
    from cpt_bench.compress import CalibrationSettings, Spec, compress_to_folder

    folder = tmp_path / "rtn-w4"
    compress_to_folder(str(tiny_model_dir), Spec.parse("rtn-w4"), CalibrationSettings(), folder)
    by_spec, by_folder = (CptLM(pretrained=str(tiny_model_dir), compression=compression, soft_prompt=str(prompt_dir),
                                device="cpu", dtype="float32", batch_size=4) for compression in ("rtn-w4", str(folder)))
    assert by_folder.prompt_info["compression"] == by_spec.prompt_info["compression"] == "rtn-w4"
    requests = instances("loglikelihood", mc_pairs())
    assert [s for s, _ in by_folder.loglikelihood(requests)] == [s for s, _ in by_spec.loglikelihood(requests)]


def test_the_device_is_chosen_as_lm_evals_hf_model_does(fake_cache, tiny_model_dir, monkeypatch):
    """lm-eval passes its default ``cuda:0`` unless --device is given: without CUDA the cpt model runs on the CPU,
    compressed or not, as the hf model does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for compression in (None, "rtn-w4"):
        lm = CptLM.create_from_arg_string(f"pretrained={tiny_model_dir},hard_prompt=paper",
                                          {"batch_size": 1, "device": "cuda:0"} | (
                                              {"compression": compression} if compression else {}))
        assert lm.device.type == "cpu" and next(lm.model.parameters()).device.type == "cpu"
