"""Prompted generation through the ``cpt`` adapter (``lmeval.generation``), on tiny random models of five families.

The reference for a row is a plain ``generate`` on ``inputs_embeds = [BOS embedding (after_bos) | prompt | row]``
without padding, built from the prompt file, not from the adapter. The tokenizer adds a BOS token (so in lm-eval's
left-padded batches a row's BOS sits after its pads) and lm-eval pads with its EOS token, as the embedded model's
tokenizer does (``pad == eos``). The contexts differ in length, so a batch of four is padded unevenly, and are longer
than Gemma 3's sliding window once prompted.
"""

from __future__ import annotations

import inspect
import logging
import random

import pytest
import torch
import transformers
from lm_eval.models.huggingface import HFLM

from cpt_bench.lmeval.adapter import CptLM
from cpt_bench.lmeval.generation import GenerationSettingError, reuses_prefix_cache
from cpt_bench.recovery.artifact import export_peft, read_prompt
from cpt_bench.recovery.hard import HARD_PROMPTS
from cpt_bench.recovery.position import AFTER_BOS, FIRST

from . import fakes
from .compress_helpers import _one_thread  # noqa: F401  (autouse fixture)
from .prompt_helpers import instances
from .test_families import _save_prompt_at, bos_adding_tokenizer, save_family
from .test_lora import lora_dir  # noqa: F401  (fixture)

N_NEW = 6  # max_gen_toks
N_PROMPT = 4
CONTEXT_WORDS = (9, 2, 14, 5)  # unequal lengths: uneven left padding in a batch of four
# transformers 5.0 passes cache_position to the forward, 5.2x does not (peft 0.21's prompt tuning needs it)
GENERATE_PASSES_CACHE_POSITION = "cache_position" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters


def contexts() -> list[str]:
    rng = random.Random(11)
    return [f"Question: {fakes.sentence(rng, n)}\nAnswer:" for n in CONTEXT_WORDS]


def requests(until: list[str] | None = None, **gen_kwargs) -> list:
    settings = {"until": until or [], "max_gen_toks": N_NEW, "do_sample": False} | gen_kwargs
    return instances("generate_until", [(context, dict(settings)) for context in contexts()])


def cpt(folder, batch_size: int = 4, **kwargs) -> CptLM:
    return CptLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=batch_size, **kwargs)


def strings(lm, batch_size: int, reqs: list) -> list[str]:
    lm.batch_size_per_gpu = batch_size
    return lm.generate_until(reqs, disable_tqdm=True)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3", "opt", "gpt2"])
def family(request, tmp_path_factory):
    return save_family(request.param, bos_adding_tokenizer(), tmp_path_factory.mktemp(f"gen-{request.param}"))


def reference_tokens(model, tokenizer, prompt: torch.Tensor, position: str, ids: list[int]) -> list[int]:
    """Greedy new tokens after [prompt | row] (``first``) or [BOS | prompt | row without its BOS] (``after_bos``),
    one unpadded row, plain ``generate`` on embeddings."""
    embed = model.get_input_embeddings()
    bos = tokenizer.bos_token_id
    if position == AFTER_BOS:
        prompt = torch.cat([embed(torch.tensor([bos])), prompt])
        ids = ids[1:] if ids[0] == bos else ids
    inputs = torch.cat([prompt, embed(torch.tensor(ids))])[None]
    with torch.no_grad():
        return model.generate(inputs_embeds=inputs, max_new_tokens=N_NEW, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)[0].tolist()


def generated(lm: CptLM, texts: list[str]) -> list[list[int]]:
    """``_model_generate`` on lm-eval's own left-padded encoding of ``texts``: each row's new tokens, after
    checking that the output starts with the context and has room for every new token."""
    ids, mask = lm.tok_batch_encode(texts)
    out = lm._model_generate(ids, ids.shape[1] + N_NEW, [lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)],
                             attention_mask=mask)
    assert torch.equal(out[:, :ids.shape[1]], ids) and out.shape[1] <= ids.shape[1] + N_NEW
    return out[:, ids.shape[1]:].tolist()


def assert_same_tokens(ours: list[int], reference: list[int], pad: int) -> None:
    """Equal up to the reference's end (which is shorter when it emitted EOS); pads after it."""
    assert ours[:len(reference)] == reference and set(ours[len(reference):]) <= {pad}


@pytest.mark.parametrize("position", [FIRST, AFTER_BOS])
def test_cached_and_concatenated_paths_equal_the_unpadded_reference(family, position, tmp_path):
    model, tokenizer = family.load(), family.tokenizer
    folder = _save_prompt_at(tmp_path / "p", family, position)
    prompt = read_prompt(folder).embeddings
    texts = contexts()
    references = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        references.append(reference_tokens(model, tokenizer, prompt, position, ids))
    assert all(len(reference) == N_NEW for reference in references)  # max_gen_toks is not cut by the prefix
    for prefix_cache in (True, False):
        lm = cpt(family.folder, soft_prompt=str(folder), prefix_cache=prefix_cache)
        assert lm.prompt_info["position"] == position
        pad = lm.tokenizer.pad_token_id
        assert pad == lm.tokenizer.eos_token_id  # as the embedded model: rows must not end at their pads
        batched = generated(lm, texts)
        alone = [generated(lm, [text])[0] for text in texts]
        for ours_batched, ours_alone, reference in zip(batched, alone, references, strict=True):
            assert_same_tokens(ours_batched, reference, pad)
            assert_same_tokens(ours_alone, reference, pad)
        reqs = requests()
        assert strings(lm, 1, reqs) == strings(lm, 4, reqs) == [lm.tok_decode(r) for r in references]


def test_sliding_window_families_generate_by_concatenation(tmp_path):
    """Gemma 2/3 and Mistral attend through sliding windows: their prefix cache is not continued in ``generate``
    (the test above checks Gemma 3 with prefix_cache=true against the reference, on contexts longer than its
    window)."""
    tokenizer = bos_adding_tokenizer()
    for name, expected in (("gemma3", False), ("mistral", False), ("gemma2", False), ("llama", True),
                           ("qwen2", True), ("opt", True), ("gpt2", True)):
        assert reuses_prefix_cache(save_family(name, tokenizer, tmp_path / name).load()) == expected, name


def test_stop_strings_are_honoured_and_start_after_the_context(family, tmp_path):
    """A stop string every context ends with does not stop generation (the criteria look only at new tokens);
    a token text that the generation produces cuts every row at its first occurrence."""
    folder = _save_prompt_at(tmp_path / "p", family, AFTER_BOS)
    for prefix_cache in (True, False):
        lm = cpt(family.folder, soft_prompt=str(folder), prefix_cache=prefix_cache)
        full = strings(lm, 4, requests())
        context_end = "wer:"  # how every context ends; a criterion that looked at the context would stop at once
        assert strings(lm, 4, requests(until=[context_end])) == full
        assert not any(context_end in text for text in full)
        words = {lm.tok_decode([token]) for row in generated(lm, contexts()) for token in row[1:]}
        words = [word for word in words if word.strip() and word.isprintable() and "\ufffd" not in word]
        stop = max(sorted(words), key=lambda word: sum(word in text for text in full))
        cut = [text.split(stop)[0] for text in full]
        assert cut != full
        assert strings(lm, 4, requests(until=[stop])) == cut
        for text, row in zip(contexts(), generated(lm, contexts()), strict=True):  # each row's first token stops it
            ids, mask = lm.tok_batch_encode([text])
            out = lm._model_generate(ids, ids.shape[1] + N_NEW, [lm.tok_decode(row[:1])], attention_mask=mask)
            assert out.shape[1] == ids.shape[1] + 1


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_hard_prompt_equals_plain_hf_on_its_text_and_the_context(family, prefix_cache):
    text = HARD_PROMPTS["paper"]
    plain = HFLM(pretrained=str(family.folder), device="cpu", dtype="float32", batch_size=4)
    expected = plain.generate_until(instances("generate_until", [(text + req.args[0], req.args[1])
                                                                 for req in requests()]), disable_tqdm=True)
    lm = cpt(family.folder, hard_prompt="paper", prefix_cache=prefix_cache)
    assert lm.prompt_info["position"] == AFTER_BOS
    assert strings(lm, 4, requests()) == expected


def test_unprompted_cpt_equals_plain_hf(family):
    plain = HFLM(pretrained=str(family.folder), device="cpu", dtype="float32", batch_size=4)
    assert strings(cpt(family.folder), 4, requests()) == plain.generate_until(requests(), disable_tqdm=True)


def peft_lm(family, folder, tmp_path) -> HFLM:
    """lm-eval's ``hf`` model with ``peft=`` the prompt in ``folder`` exported, at batch size 1."""
    return HFLM(pretrained=str(family.folder), peft=str(export_peft(folder, tmp_path / "peft")), device="cpu",
                dtype="float32", batch_size=1)


def test_soft_prompt_generation_is_greedy_under_its_peft_export(family, tmp_path):
    """The exported prompt in lm-eval's ``hf`` model: its forward, teacher-forced on our tokens, picks every one
    of them (greedy), and its own generation gives our first token, on every transformers version. The prompt
    changes the output: a prompt ignored anywhere on the way would give the unprompted strings."""
    folder = _save_prompt_at(tmp_path / "p", family, FIRST)
    peft = peft_lm(family, folder, tmp_path)
    eos = peft.tokenizer.eos_token_id
    for prefix_cache in (True, False):
        lm = cpt(family.folder, soft_prompt=str(folder), prefix_cache=prefix_cache)
        for text, row in zip(contexts(), generated(lm, contexts()), strict=True):
            row = row[:row.index(eos) + 1] if eos in row else row
            ids = peft.tok_encode(text)
            with torch.no_grad():
                logits = peft.model(input_ids=torch.tensor([ids + row])).logits[0, N_PROMPT + len(ids) - 1:-1]
            assert logits.argmax(-1).tolist() == row
        one_token = requests(max_gen_toks=1)
        assert strings(lm, 4, one_token) == peft.generate_until(one_token, disable_tqdm=True)
        prompted, unprompted = strings(lm, 4, requests()), strings(cpt(family.folder), 4, requests())
        assert sum(a != b for a, b in zip(prompted, unprompted, strict=True)) >= len(prompted) // 2


@pytest.mark.skipif(not GENERATE_PASSES_CACHE_POSITION, reason="peft 0.21's prompt-tuning generation tells the "
                    "first step by cache_position, which transformers 5.2x no longer passes: its later tokens are "
                    "not its own greedy ones (OPT fails)")
def test_soft_prompt_generates_the_strings_of_its_peft_export(family, tmp_path):
    """At batch size 1: batched, PEFT puts its virtual tokens before the pads (GPT-2 and Gemma 3 then differ)."""
    folder = _save_prompt_at(tmp_path / "p", family, FIRST)
    expected = peft_lm(family, folder, tmp_path).generate_until(requests(), disable_tqdm=True)
    for prefix_cache in (True, False):
        assert strings(cpt(family.folder, soft_prompt=str(folder), prefix_cache=prefix_cache), 4,
                       requests()) == expected


def test_lora_equals_plain_hf_with_peft(tiny_model_dir, lora_dir):  # noqa: F811
    plain = HFLM(pretrained=str(tiny_model_dir), peft=str(lora_dir), device="cpu", dtype="float32", batch_size=4)
    lm = cpt(tiny_model_dir, lora=str(lora_dir))
    assert strings(lm, 4, requests()) == plain.generate_until(requests(), disable_tqdm=True)


@pytest.mark.parametrize(("setting", "value"), [("num_beams", 2), ("repetition_penalty", 1.3),
                                                 ("no_repeat_ngram_size", 2), ("num_return_sequences", 2)])
def test_settings_a_prefix_cannot_honour_are_refused_in_one_line(tiny_model_dir, setting, value):
    lm = cpt(tiny_model_dir, hard_prompt="paper")
    with pytest.raises(GenerationSettingError, match=f"generation setting {setting}={value} .from gen_kwargs. "
                                                     "cannot be used with a prompt") as caught:
        lm.generate_until(requests(**{setting: value}), disable_tqdm=True)
    assert "\n" not in str(caught.value)


def test_left_truncation_is_reported_once(tiny_model_dir, tmp_path, caplog):
    """A window of 40 tokens: prompt (4) + max_gen_toks (6) leave 30 for a context; the two longer contexts are
    cut, reported in one warning with the requests and tokens counted by hand."""
    from .prompt_helpers import save_random_prompt

    model = HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32")
    folder = save_random_prompt(tmp_path / "p", model.model, model.tokenizer, N_PROMPT)
    lm = cpt(tiny_model_dir, soft_prompt=str(folder), max_length=40)
    texts = contexts()
    lengths = [len(lm.tok_encode(text)) for text in texts]
    cut = [max(0, n - (40 - N_PROMPT - N_NEW)) for n in lengths]
    assert sum(c > 0 for c in cut) >= 2 and min(cut) == 0
    reqs = instances("generate_until", [(text, {"until": [], "max_gen_toks": N_NEW}) for text in texts])
    with caplog.at_level(logging.WARNING):
        outputs = strings(lm, 2, reqs)
    reports = [r.getMessage() for r in caplog.records if "cut from the left" in r.getMessage()]
    assert reports == [f"{sum(c > 0 for c in cut)} of 4 generation requests were cut from the left to fit prompt + "
                       f"context + max_gen_toks into the model's window of 40 tokens: {sum(cut)} context tokens "
                       f"dropped in all, at most {max(cut)} from one request"]
    assert all(outputs)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        strings(lm, 2, [reqs[cut.index(0)]])
    assert not [r for r in caplog.records if "cut from the left" in r.getMessage()]


def test_sampling_draws_the_same_tokens_on_both_paths(tiny_model_dir):
    """``do_sample`` with a temperature reaches ``generate`` (seeded draws equal on both paths, unlike greedy)."""
    outputs = []
    for prefix_cache in (True, False):
        lm = cpt(tiny_model_dir, hard_prompt="paper", prefix_cache=prefix_cache)
        torch.manual_seed(0)
        outputs.append(strings(lm, 4, requests(do_sample=True, temperature=5.0)))
    assert outputs[0] == outputs[1] != strings(lm, 4, requests())


@pytest.mark.e2e
def test_hard_prompt_on_the_embedded_model_equals_plain_hf_on_its_text():
    """SmolLM2 (pad == eos, no BOS added): four hand-written NQ-style questions in lm-eval's ``nq_open`` form;
    prefix cache and concatenation, batch sizes 1 and 4, and plain ``hf`` reading the prompt's text agree."""
    from cpt_bench.assets.model import resolve_model

    questions = ["what is the capital of france", "who wrote romeo and juliet",
                 "what is the largest planet in the solar system", "who painted the mona lisa"]
    settings = {"until": ["\n", ".", ","], "max_gen_toks": 12, "do_sample": False}

    def nq(prefix: str = "") -> list:
        return instances("generate_until", [(f"{prefix}Answer these questions:\n\nQ: {q}?\nA:", dict(settings))
                                            for q in questions])

    plain = HFLM(pretrained=str(resolve_model("embedded")), device="cpu", dtype="float32", batch_size=4)
    expected = plain.generate_until(nq(HARD_PROMPTS["paper"]), disable_tqdm=True)
    assert expected != plain.generate_until(nq(), disable_tqdm=True)
    for prefix_cache in (True, False):
        lm = cpt("embedded", hard_prompt="paper", prefix_cache=prefix_cache)
        assert strings(lm, 1, nq()) == strings(lm, 4, nq()) == expected
