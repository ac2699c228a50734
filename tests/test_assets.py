"""The asset pipeline on fake registry archives: parsing, splits, idempotence, corruption recovery."""

from __future__ import annotations

import json
import logging
import random

import pytest

from cpt_bench.assets import asset_status, cache
from cpt_bench.assets.corpora import CORPORA, SPLITS, Document, load_split, prepare_corpus, split_documents
from cpt_bench.assets.registry import Distribution, download
from cpt_bench.assets.zeroshot import ZERO_SHOT_SETS, load_zeroshot


def _docs(n: int) -> list[Document]:
    return [Document(f"doc/{i}", f"Doc {i}", f"text number {i}") for i in range(n)]


@pytest.mark.parametrize("n_docs", [3, 10, 57, 300])
def test_splits_are_disjoint_cover_everything_and_follow_fractions(n_docs):
    splits = split_documents(_docs(n_docs))
    ids = {split: {d.id for d in docs} for split, docs in splits.items()}
    assert set(splits) == set(SPLITS)
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    assert set().union(*ids.values()) == {d.id for d in _docs(n_docs)}
    assert all(ids[split] for split in SPLITS)
    if n_docs >= 57:
        assert abs(len(ids["test"]) - 0.1 * n_docs) <= 1 and abs(len(ids["validation"]) - 0.1 * n_docs) <= 1


def test_splits_are_deterministic_and_ignore_input_order():
    docs = _docs(40)
    shuffled = docs[:]
    random.Random(7).shuffle(shuffled)
    assert split_documents(docs) == split_documents(shuffled)
    assert split_documents(docs, seed=1) != split_documents(docs)


def test_duplicate_and_empty_documents_are_dropped_before_splitting():
    docs = _docs(10) + [Document("dup", "", "text number 3"), Document("empty", "", "")]
    ids = {d.id for docs_ in split_documents(docs).values() for d in docs_}
    assert "dup" not in ids and "empty" not in ids and len(ids) == 10


def test_too_few_documents_is_a_clear_error():
    with pytest.raises(cache.CacheError, match="at least 3 distinct documents, got 2"):
        split_documents(_docs(2))


def test_wikipedia_reader_strips_markup_and_skips_redirects_and_other_namespaces(fake_cache):
    docs = [d for split in SPLITS for d in load_split("wikipedia", split)]
    assert len(docs) == 12
    assert all(d["id"].startswith("wikipedia/Article ") for d in docs)
    text = "\n".join(d["text"] for d in docs)
    for markup in ("{{", "[[", "'''", "Category:", "File:", "thumb"):
        assert markup not in text
    assert "is a stream" in text  # link text kept, template dropped


def test_shakespeare_skips_folio_copies_and_milton_dedupes_and_sections(fake_cache):
    shakespeare = [d["id"] for split in SPLITS for d in load_split("shakespeare", split)]
    assert sorted(shakespeare) == [f"shakespeare/play_{i}" for i in range(10)]
    milton = [d for split in SPLITS for d in load_split("milton", split)]
    assert {d["id"].rsplit("/", 1)[0] for d in milton} == {"milton/paradise"}
    assert len(milton) >= 3
    assert all(len(d["text"].split()) < 2 * 2000 for d in milton)


def test_corpus_splits_on_disk_are_disjoint(fake_cache):
    for name in CORPORA:
        texts = {split: {d["text"] for d in load_split(name, split)} for split in SPLITS}
        assert not (texts["train"] & texts["test"] or texts["train"] & texts["validation"]
                    or texts["validation"] & texts["test"]), name


def test_zeroshot_sets_use_the_builtin_schemas(fake_cache):
    split, arc = load_zeroshot("arc_easy")
    assert split == "test" and len(arc) == 6  # one doc per native_id, not one per request
    assert set(arc[0]) == {"id", "question", "choices", "answerKey"}
    assert arc[0]["choices"]["label"] == ["A", "B", "C", "D"] and not arc[0]["question"].startswith("Question:")
    _, boolq = load_zeroshot("boolq")
    assert set(boolq[0]) == {"passage", "question", "label"} and boolq[1]["label"] == 1
    _, lambada = load_zeroshot("lambada_openai")
    assert len(lambada[0]["text"].split(" ")) == 20
    assert {name for name in ZERO_SHOT_SETS} == {
        "piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa", "lambada_openai"}


def test_preparing_twice_downloads_once_and_leaves_files_untouched(fake_cache):
    folder = prepare_corpus("wikipedia")
    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert prepare_corpus("wikipedia") == folder
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert fake_cache.downloads == ["gensim"]
    assert asset_status("corpora/wikipedia") == "cached"


def test_missing_entry_is_rebuilt(fake_cache):
    import shutil

    folder = prepare_corpus("shakespeare")
    expected = (folder / "test.jsonl").read_text()
    shutil.rmtree(folder)
    assert asset_status("corpora/shakespeare") == "missing"
    assert (prepare_corpus("shakespeare") / "test.jsonl").read_text() == expected


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_file", "bad_manifest", "no_manifest"])
def test_corrupt_entry_is_reported_and_rebuilt(fake_cache, caplog, damage):
    folder = prepare_corpus("milton")
    target = folder / "train.jsonl"
    expected = target.read_bytes()
    if damage == "flip_byte":
        data = bytearray(expected)
        data[10] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(expected[: len(expected) // 2])
    elif damage == "delete_file":
        target.unlink()
    elif damage == "bad_manifest":
        (folder / cache.MANIFEST).write_text("{not json")
    else:
        (folder / cache.MANIFEST).unlink()
    problem = asset_status("corpora/milton")
    assert problem != "cached"
    with caplog.at_level(logging.WARNING):
        rebuilt = prepare_corpus("milton")
    assert "corpora/milton is unusable" in caplog.text and problem in caplog.text
    assert (rebuilt / "train.jsonl").read_bytes() == expected
    assert asset_status("corpora/milton") == "cached"


def test_manifest_records_provenance_and_checksums(fake_cache):
    manifest = json.loads((prepare_corpus("wikipedia") / cache.MANIFEST).read_text())
    assert manifest["source"] == "PyPI gensim==4.4.0" and "CC BY-SA" in manifest["licence"]
    assert set(manifest["files"]) == {"train.jsonl", "validation.jsonl", "test.jsonl"}
    assert manifest["counts"]["train"]["documents"] >= 1


def test_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path))
    with pytest.raises(cache.CacheError) as info:
        download(Distribution("cpt-bench-no-such-package-xyz", "0.0.1", "none"))
    message = str(info.value)
    assert "cpt-bench-no-such-package-xyz==0.0.1" in message and "\n" not in message
    assert not (tmp_path / "downloads" / "cpt-bench-no-such-package-xyz-0.0.1").exists()


def test_unknown_corpus_names_the_choices(fake_cache):
    with pytest.raises(cache.CacheError, match="unknown corpus 'wikitext'; expected one of wikipedia, "):
        prepare_corpus("wikitext")
