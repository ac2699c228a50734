"""IDP (``idp=P1;P2;...``): one prompt per document, chosen from its context only, by attention or context loss;
each group scores as its prompt alone would."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt_bench.errors import UserError
from cpt_bench.lmeval.adapter import CptLM, PromptAdapterError
from cpt_bench.recovery.artifact import read_prompt
from cpt_bench.recovery.idp import IdpKind, choose, common_prefix, prompt_score

from . import fakes
from .compress_helpers import _one_thread  # noqa: F401  (autouse fixture)
from .prompt_helpers import save_random_prompt

RULES = ["attention", "loss"]
N_DOCS = 24


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tiny, tmp_path_factory):
    """Two random soft prompts (seeds 0 and 3) between which the tiny model's choices split under both rules."""
    folder = tmp_path_factory.mktemp("idp")
    return [save_random_prompt(folder / f"p{seed}", *tiny, seed=seed) for seed in (0, 3)]


def cpt(folder, **kwargs) -> CptLM:
    return CptLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4, **kwargs)


def mc_docs(seed: int = 7, options_seed: int = 9, n: int = N_DOCS, shared_context: bool = True) -> list[Instance]:
    """Multiple-choice documents of three requests each: one context and three options as continuations
    (``shared_context``), or, Winogrande-style, the option at the end of each context and one continuation.
    ``options_seed`` draws the options only."""
    rng, options = random.Random(seed), random.Random(options_seed)
    out = []
    for doc_id in range(n):
        context = f"Question: {fakes.sentence(rng, rng.randint(2, 6))}\nAnswer:"
        for _ in range(3):
            option = " " + fakes.sentence(options, options.randint(1, 3))
            arguments = (context, option) if shared_context else (context + option, " end")
            out.append(Instance("loglikelihood", {}, arguments, len(out), metadata=("mc", doc_id, 1)))
    return out


def chosen_per_doc(lm: CptLM, requests: list[Instance]) -> dict[int, set[str]]:
    labels = lm._choose(requests)
    out: dict[int, set[str]] = {}
    for request, label in zip(requests, labels, strict=True):
        out.setdefault(request.doc_id, set()).add(label)
    return out


@pytest.mark.parametrize("rule", RULES)
def test_each_group_scores_as_its_prompt_alone_and_choices_are_counted(tiny_model_dir, prompts, rule):
    requests = mc_docs()
    lm = cpt(tiny_model_dir, idp=";".join(map(str, prompts)), idp_rule=rule)
    scores = lm.loglikelihood(requests)
    labels = [lm.idp_chosen[("mc", r.doc_id)] for r in requests]
    assert set(labels) == {"p0", "p3"}  # the tiny model splits: both groups are checked below
    for folder in prompts:
        group = [i for i, label in enumerate(labels) if label == folder.name]
        alone = cpt(tiny_model_dir, soft_prompt=str(folder)).loglikelihood([requests[i] for i in group])
        assert [scores[i][0] for i in group] == pytest.approx([score for score, _ in alone], abs=1e-5)
    info = lm.get_model_info()["prompt"]
    assert info["kind"] == "idp" and info["rule"] == rule and list(info["prompts"]) == ["p0", "p3"]
    assert info["chosen"] == dict(Counter(lm.idp_chosen.values())) and sum(info["chosen"].values()) == N_DOCS
    assert lm.model.config._attn_implementation == cpt(tiny_model_dir).model.config._attn_implementation


@pytest.mark.parametrize("rule", RULES)
def test_the_choice_reads_the_context_only_one_per_document(tiny_model_dir, prompts, rule):
    """Other options (as continuations, or ending Winogrande-style contexts) leave every choice as it was; all the
    requests of a document get one prompt."""
    lm = cpt(tiny_model_dir, idp=";".join(map(str, prompts)), idp_rule=rule)
    for shared in (True, False):
        first = chosen_per_doc(lm, mc_docs(options_seed=9, shared_context=shared))
        lm.idp_chosen.clear()
        second = chosen_per_doc(lm, mc_docs(options_seed=10, shared_context=shared))
        lm.idp_chosen.clear()
        assert first == second and all(len(labels) == 1 for labels in first.values())
        assert len(set().union(*first.values())) == 2


@pytest.mark.parametrize("rule", RULES)
def test_the_rules_choose_as_computed_by_hand(tiny_model_dir, tiny, prompts, rule):
    """Attention: mean over layers, heads and context tokens of the weight summed over the prompt's tokens (eager
    attention); loss: mean next-token loss of the context's tokens after the prompt."""
    _, tokenizer = tiny
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    embeddings = [read_prompt(folder).embeddings for folder in prompts]
    lm = cpt(tiny_model_dir, idp=";".join(map(str, prompts)), idp_rule=rule)
    requests = mc_docs()[::3]
    expected = []
    for request in requests:
        ids = torch.tensor(lm.tok_encode(request.args[0]))
        scores = []
        for prompt in embeddings:
            inputs = torch.cat([prompt, eager.get_input_embeddings()(ids)])[None]
            with torch.no_grad():
                out = eager(inputs_embeds=inputs, output_attentions=True)
            n = prompt.shape[0]
            mass = sum(layer[0, :, n:, :n].sum(-1).mean() for layer in out.attentions) / len(out.attentions)
            loss = torch.nn.functional.cross_entropy(out.logits[0, n - 1:-1], ids)
            scores.append(float(mass) if rule == "attention" else -float(loss))
            assert prompt_score(eager, prompt, n, ids, rule, _no_autocast) == pytest.approx(scores[-1], abs=1e-5)
        expected.append(prompts[choose(scores)].name)
    assert lm._choose(requests) == expected


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_generation_under_idp_equals_each_chosen_prompt_alone(tiny_model_dir, prompts):
    rng = random.Random(3)
    requests = [Instance("generate_until", {}, (f"Question: {fakes.sentence(rng, rng.randint(2, 8))}\nAnswer:",
                                                {"until": [], "max_gen_toks": 5, "do_sample": False}), i,
                         metadata=("gen", i, 1)) for i in range(N_DOCS)]
    lm = cpt(tiny_model_dir, idp=";".join(map(str, prompts)), idp_rule="loss")
    strings = lm.generate_until(requests, disable_tqdm=True)
    labels = [lm.idp_chosen[("gen", r.doc_id)] for r in requests]
    assert set(labels) == {"p0", "p3"} and sum(lm.prompt_info["chosen"].values()) == N_DOCS
    for folder in prompts:
        group = [i for i, label in enumerate(labels) if label == folder.name]
        alone = cpt(tiny_model_dir, soft_prompt=str(folder)).generate_until([requests[i] for i in group], True)
        assert [strings[i] for i in group] == alone


def test_hard_and_soft_prompts_mix_and_perplexity_is_refused(tiny_model_dir, prompts):
    lm = cpt(tiny_model_dir, idp=f"paper;text:Answer briefly.\n;{prompts[0]}")
    info = lm.prompt_info
    assert list(info["prompts"]) == ["paper", "text16", "p0"] and info["rule"] == "attention"
    assert info["n_tokens"] == max(member["n_tokens"] for member in info["prompts"].values())
    soft = read_prompt(prompts[0]).embeddings  # what the soft member's folder stores, float32
    assert soft.dtype == torch.float32
    assert [member["stored_bytes"] for member in info["prompts"].values()] == [0, 0, soft.numel() * 4]
    assert info["stored_bytes"] == soft.numel() * 4 == IdpKind().added_bytes(info)  # the set stores its soft member
    with pytest.raises(PromptAdapterError, match="^idp cannot score rolling loglikelihoods"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text",), 0)])


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert common_prefix([[5, 6]]) == [5, 6] and common_prefix([[1], [2]]) == []


@pytest.mark.parametrize(("args", "message"), [
    ({"idp": "paper"}, "^idp='paper' names one prompt; IDP chooses among two or more"),
    ({"idp": "paper;"}, "^idp='paper;' has an empty prompt"),
    ({"idp": "paper;paper"}, "^idp='paper;paper' names 'paper' twice"),
    ({"idp": "paper;papr"}, "^unknown hard prompt 'papr' \\(did you mean 'paper'\\?\\)"),
    ({"idp": "paper;runs/no-such-prompt"}, "^idp prompt 'runs/no-such-prompt': no such soft-prompt folder"),
    ({"idp": "paper;paper_long", "idp_rule": "best"}, "^idp_rule must be one of attention, loss, got 'best'$"),
    ({"hard_prompt": "paper", "idp_rule": "loss"}, "^idp_rule 'loss' is given without idp$"),
])
def test_bad_idp_arguments_are_refused_before_loading(tmp_path, args, message):
    with pytest.raises(UserError, match=message) as error:
        CptLM(pretrained=str(tmp_path / "no-model"), **args)
    assert "\n" not in str(error.value)
