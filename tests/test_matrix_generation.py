"""Generative targets in the matrix config: identity, defaults and one-line refusals (no model loaded)."""

from __future__ import annotations

import pytest

from cpt_bench.matrix.config import ConfigError, Target, config_from_dict
from cpt_bench.matrix.paired import generations_record


def _config(target: dict) -> dict:
    return {"name": "g", "targets": [target]}


def test_gen_kwargs_are_part_of_the_target_identity():
    short = Target("cpt_coqa", limit=4, gen_kwargs={"max_gen_toks": 8})
    long = Target("cpt_coqa", limit=4, gen_kwargs={"max_gen_toks": 32})
    assert short.name == "cpt_coqa+max_gen_toks=8" and long.name == "cpt_coqa+max_gen_toks=32"
    assert len({short, long, Target("cpt_coqa", limit=4, gen_kwargs={"max_gen_toks": 8})}) == 2
    assert Target("cpt_coqa", gen_kwargs={"until": ["\n", "Q:"]}).name == "cpt_coqa+until=\\n|Q:"


def test_generative_target_defaults_to_its_first_metric_and_filter():
    assert Target("cpt_coqa").metric == "em"
    assert Target("cpt_nq_open").metric == "exact_match,remove_whitespace"
    assert Target("cpt_piqa").metric == "acc"
    assert Target("cpt_coqa").is_generative and not Target("cpt_piqa").is_generative


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"max_gen_toks": 0}, r"targets\[0\]\.gen_kwargs\.max_gen_toks: got 0, expected a positive integer"),
    ({"do_sample": True}, r"gen_kwargs\.do_sample: got True, expected false"),
    ({"temperature": 0.7}, r"gen_kwargs\.temperature: got 0\.7, expected 0"),
    ({"top_k": 5}, r"gen_kwargs\.top_k: unknown generation setting; expected some of max_gen_toks, until"),
    ({"until": []}, r"gen_kwargs\.until: got \[\], expected a stop string"),
])
def test_bad_gen_kwargs_are_one_line_errors(gen_kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        config_from_dict(_config({"task": "cpt_coqa", "limit": 4, "gen_kwargs": gen_kwargs}))
    assert "\n" not in str(error.value)


def test_generations_keep_filtered_responses_answers_and_the_context_tail():
    samples = [{"filtered_resps": [" no"], "target": ["no"], "arguments": [("x" * 700 + "Q: ok?\n\nA:", {})]},
               {"filtered_resps": [" yes"], "target": "yes", "arguments": [("short", {})]}]
    record = generations_record(samples)
    assert record["responses"] == [" no", " yes"] and record["answers"] == [["no"], "yes"]
    assert record["inputs"][0].startswith("…") and record["inputs"][0].endswith("Q: ok?\n\nA:")
    assert len(record["inputs"][0]) == record["input_chars"] + 1 and record["inputs"][1] == "short"
