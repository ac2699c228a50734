"""Corpus specs: parsing, every kind prepared from fixtures written here, splits, invalidation, presets offline."""

import json
import random

import pytest

import cpt_bench.lmeval  # noqa: F401  (registers the lmeval: corpus kind, as every command line does)
from cpt_bench.corpus import CorpusError, corpus_label, load_split, parse_corpus, prepare

from . import fakes

SPLITS = ("train", "validation", "test")


def _texts(rng: random.Random, n: int) -> list[str]:
    return [fakes.paragraph(rng) + f" Document {index}." for index in range(n)]


def _splits(spec) -> dict[str, list[dict]]:
    return {split: load_split(spec, split) for split in SPLITS}


def _check_disjoint(splits: dict[str, list[dict]]) -> None:
    ids = [doc["id"] for docs in splits.values() for doc in docs]
    texts = [doc["text"] for docs in splits.values() for doc in docs]
    assert len(ids) == len(set(ids)) and len(texts) == len(set(texts))
    assert all(splits[split] for split in SPLITS)


@pytest.fixture
def corpus_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_grammar_is_canonical_and_errors_are_one_line():
    for text in ("wikipedia", "c4", "text:notes/", "jsonl:data.jsonl?field=body", "hf:wikitext?config=raw",
                 "parquet:x.parquet?field=t&separator=space", "lmeval:cpt_piqa"):
        assert str(parse_corpus(text)) == text
    assert parse_corpus("ptb").separator == " " and parse_corpus("text:a").separator == "\n\n"
    assert corpus_label("text:/data/my-notes/") == "text-my-notes"
    for bad, message in (("wikipedai", "not a corpus spec"), ("xml:a.xml", "not a corpus spec"),
                         ("jsonl:a?colour=red", "option 'colour=red'"), ("text:a?config=x", "hf: datasets only"),
                         ("text:a?separator=tab", "separator 'tab'")):
        with pytest.raises(CorpusError, match=message) as caught:
            parse_corpus(bad, "--source")
        assert "\n" not in str(caught.value) and str(caught.value).startswith("--source")


def test_a_folder_of_text_files_is_one_document_per_file(corpus_cache, tmp_path):
    folder = tmp_path / "notes"
    texts = _texts(random.Random(0), 30)
    for index, text in enumerate(texts):
        (folder / f"part{index % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"part{index % 3}" / f"note{index:02d}.txt").write_text(text)
    (folder / "image.png").write_bytes(b"\x89PNG")
    splits = _splits(f"text:{folder}")
    _check_disjoint(splits)
    assert sorted(doc["text"] for docs in splits.values() for doc in docs) == sorted(texts)
    assert len(splits["test"]) == 3 and len(splits["validation"]) == 3
    assert _splits(f"text:{folder}") == splits  # deterministic


def test_an_edited_file_is_prepared_again(corpus_cache, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for index, text in enumerate(_texts(random.Random(1), 12)):
        (folder / f"{index}.txt").write_text(text)
    before = prepare(f"text:{folder}")
    (folder / "3.txt").write_text("An edited note, now different from what was prepared.")
    after = prepare(f"text:{folder}")
    assert after != before
    assert any("An edited note" in doc["text"] for split in SPLITS for doc in load_split(f"text:{folder}", split))


def test_a_single_text_file_is_cut_into_sections(corpus_cache, tmp_path):
    rng = random.Random(2)
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(fakes.paragraph(rng, 40) for _ in range(200)))  # ~96k words
    splits = _splits(f"text:{path}")
    _check_disjoint(splits)
    assert all(1900 < len(doc["text"].split()) < 2600 for docs in splits.values() for doc in docs[:-1])


def test_jsonl_csv_and_parquet_with_a_chosen_field(corpus_cache, tmp_path):
    import datasets

    texts = _texts(random.Random(3), 20)
    rows = [{"body": text, "n": index} for index, text in enumerate(texts)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for kind in ("jsonl", "csv", "parquet"):
        splits = _splits(f"{kind}:{tmp_path / f'd.{kind}'}?field=body")
        _check_disjoint(splits)
        assert sorted(doc["text"] for docs in splits.values() for doc in docs) == sorted(texts)
    with pytest.raises(CorpusError, match="has no text field 'text'.*choose one with"):
        load_split(f"jsonl:{tmp_path / 'd.jsonl'}", "train")


def test_a_saved_dataset_keeps_its_own_splits_and_carves_a_missing_one(corpus_cache, tmp_path):
    import datasets

    rng = random.Random(4)
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": _texts(rng, 40)}),
                                  "test": datasets.Dataset.from_dict({"text": ["", "kept as is", ""]})})
    saved.save_to_disk(str(tmp_path / "ds"))
    splits = _splits(f"hf:{tmp_path / 'ds'}")
    assert [doc["text"] for doc in splits["test"]] == ["", "kept as is", ""]  # rows in order, empty ones kept
    assert len(splits["validation"]) == 4 and len(splits["train"]) == 36
    assert not {d["text"] for d in splits["validation"]} & {d["text"] for d in splits["train"]}


def test_an_lmeval_task_gives_its_rendered_documents(corpus_cache, filled_fake_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_BENCH_CACHE", str(filled_fake_cache))
    splits = _splits("lmeval:cpt_piqa")
    _check_disjoint(splits)
    rows = [json.loads(line) for line in (filled_fake_cache / "zeroshot" / "piqa" / "validation.jsonl")
            .read_text().splitlines()]
    first = rows[0]
    expected = f"Question: {first['goal']}\nAnswer: {[first['sol1'], first['sol2']][first['label']]}"
    assert expected in [doc["text"] for docs in splits.values() for doc in docs]


def test_presets_offline_say_how_to_provide_the_data(corpus_cache, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CorpusError, match=r"dataset 'wikitext' is not available here .*save_to_disk\(DIR\)") as caught:
        load_split("wikitext2", "test")
    assert "\n" not in str(caught.value)


def test_corpus_command_prints_the_splits_and_exports_text_files(corpus_cache, tmp_path, tiny_model_dir, capsys):
    from cpt_bench.cli import main

    rows = [{"body": text} for text in _texts(random.Random(6), 20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    spec = f"jsonl:{tmp_path / 'd.jsonl'}?field=body"
    assert main(["corpus", spec, "--model", str(tiny_model_dir), "--export", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"corpus {spec}" in out and "wrote 20 text files" in out
    assert [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["train"], ["test"])] == [
        ["train", "16"], ["test", "2"]]
    exported = _splits(f"text:{tmp_path / 'out'}")
    assert sorted(d["text"] for docs in exported.values() for d in docs) == sorted(r["body"] for r in rows)
    assert main(["corpus", "wikipedai"]) == 2
    assert capsys.readouterr().err.strip() == ("cpt-bench: error: corpus 'wikipedai' is not a corpus spec: expected "
                                               "a built-in corpus (wikipedia, boolq_passages, shakespeare, milton), a "
                                               "preset (wikitext2, ptb, c4), or KIND:PATH_OR_NAME[?field=..&config=..&"
                                               "separator=blank_line|newline|space] with KIND one of text, jsonl, "
                                               "csv, parquet, hf, lmeval")
