"""The corpus-kind registry: a kind is registered once, by the package that owns it, and then parses and reads."""

from __future__ import annotations

import pytest

import cpt_bench.lmeval  # noqa: F401  (registers lmeval:, as every command line does)
from cpt_bench import corpus
from cpt_bench.assets.corpora import Document
from cpt_bench.corpus import CORPUS_KINDS, CorpusError, CorpusKind, load_split, parse_corpus, register_corpus_kind
from cpt_bench.lmeval.corpus_kind import LMEVAL_CORPUS


def test_the_kinds_are_listed_once_and_lmeval_adds_its_own():
    assert list(CORPUS_KINDS) == ["text", "jsonl", "csv", "parquet", "hf", "lmeval"]
    assert CORPUS_KINDS["lmeval"] is LMEVAL_CORPUS and not LMEVAL_CORPUS.local_files
    with pytest.raises(CorpusError, match="with KIND one of text, jsonl, csv, parquet, hf, lmeval$"):
        parse_corpus("xml:a.xml")


@pytest.mark.parametrize("name", ["text", "lmeval", "builtin", "preset"])
def test_a_kind_registered_twice_or_under_a_reserved_name_is_refused(name):
    with pytest.raises(ValueError, match=f"corpus kind {name!r} is registered twice"):
        register_corpus_kind(CorpusKind(name, lambda spec: ({}, "")))


def test_a_registered_kind_parses_and_reads(monkeypatch, tmp_path):
    """A new kind is a reader and one registration: its specs parse, its splits are prepared and cached."""
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "CORPUS_KINDS", dict(CORPUS_KINDS))  # registered for this test only
    docs = [Document(f"doc{index}", "", f"document number {index} " * 20) for index in range(30)]
    register_corpus_kind(CorpusKind("numbers", lambda spec: (corpus.complete_splits({"train": docs}, spec),
                                                             corpus.content_digest([d.text for d in docs]))))
    assert str(parse_corpus("numbers:anything")) == "numbers:anything"
    splits = {split: load_split("numbers:anything", split) for split in ("train", "validation", "test")}
    assert sum(len(rows) for rows in splits.values()) == 30 and all(splits.values())
