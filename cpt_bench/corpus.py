"""Corpus specs: one grammar wherever a corpus is named (CLI, configs, lm-eval model_args / task metadata, results).

Grammar (``str(parse_corpus(text))`` is canonical)::

    NAME                 a built-in corpus (``assets.corpora.CORPORA``: wikipedia, boolq_passages, shakespeare,
                         milton) or a preset of the paper's protocol (``PRESETS``: wikitext2, ptb, c4)
    text:PATH            a text file, or a folder of them (*.txt, *.md, *.rst, searched recursively)
    jsonl:PATH           JSON lines, one record per document
    csv:PATH             a CSV file with a header row (through ``datasets``)
    parquet:PATH         a Parquet file (through ``datasets``)
    hf:DATASET           a Hugging Face dataset: a Hub id (from the datasets cache offline, downloaded when the
                         Hub is reachable) or a folder written by ``Dataset(Dict).save_to_disk``
    lmeval:TASK          the documents of an lm-eval task, each rendered by the task's own prompt template and
                         target (``doc_to_text`` + target delimiter + the target or the correct choice); this
                         kind is registered by ``cpt_bench.lmeval`` (``lmeval.corpus_kind``), which every command
                         line and the task loaders import

Corpus kinds (``KIND:``) are a registry, ``CORPUS_KINDS``: a kind is a ``CorpusKind`` (its name and the function
reading its three splits), added with ``register_corpus_kind``; a package above this module adds its own kind so.

followed by options ``?key=value&key=value``: ``field`` (the text field of jsonl / csv / parquet / hf records,
default ``text``), ``config`` (hf: the dataset's config name), ``separator`` (how documents are joined into one
token stream: ``blank_line`` = ``"\\n\\n"``, the default, ``newline`` or ``space``).

Documents: a folder of text files gives one document per file; a single text file is cut at blank lines into
sections of about ``assets.corpora.SECTION_WORDS`` words (so splits stay disjoint by section); a record gives one
document. Splits: the source's own train / validation / test where it has them (hf datasets, lm-eval tasks, in
their order, rows kept as they are); a source without splits is split by document as the built-in corpora are
(``assets.corpora.split_documents``: deterministic, empty and duplicate documents dropped); a split a source
lacks is carved from its train split the same way. Prepared splits are cached under
``<cache>/corpora/specs/<spec>-<key>/`` where the key hashes the spec and the source's content (file bytes, the
dataset's fingerprint, the rendered task documents), so an edited file or dataset is prepared again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_bench.assets.cache import CacheError, ensure_entry
from cpt_bench.assets.corpora import (
    CORPORA,
    SECTION_WORDS,
    SPLIT_FRACTIONS,
    SPLIT_SEED,
    SPLITS,
    Document,
    prepare_corpus,
    sections,
    split_documents,
)
from cpt_bench.errors import UserError
from cpt_bench.files import (
    EXPORT_MARKER,
    OutputKind,
    ensure_replaceable,
    json_bytes,
    replacing_folder,
    write_bytes_atomic,
)

OPTIONS = ("field", "config", "separator")
DOCUMENT_SEPARATOR = "\n\n"  # how the GPTQ reference code joins WikiText-2 documents: the default
SEPARATORS = {"blank_line": DOCUMENT_SEPARATOR, "newline": "\n", "space": " "}
TEXT_SUFFIXES = (".txt", ".md", ".rst")
TEXT_EXPORT_FORMAT = "cpt_bench.corpus_export/1"
TEXT_EXPORT_KIND = OutputKind("a text export of a corpus", EXPORT_MARKER, (("format", TEXT_EXPORT_FORMAT),))
WHOLE_CORPUS = "all"  # the split name that reads every document (a corpus used for evaluation only)
_SPEC_RE = re.compile(r"(?P<kind>[a-z]+):(?P<location>[^?]+)(?:\?(?P<options>.*))?")
_KEY_HEX = 12


class CorpusError(UserError):
    """A corpus spec that cannot be parsed or read (one-line message)."""


@dataclass(frozen=True)
class SplitSource:
    """Where one split of a preset comes from: a split of the dataset and a document range [start, stop)."""

    split: str
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class Preset:
    """A corpus of the paper's protocol: a Hugging Face dataset, its text field, splits and joining rule."""

    dataset: str
    config: str | None
    field: str
    separator: str
    splits: dict[str, SplitSource]
    data_files: dict[str, str] | None = None
    description: str = ""


_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
PRESETS: dict[str, Preset] = {
    "wikitext2": Preset("wikitext", "wikitext-2-raw-v1", "text", "blank_line",
                        {split: SplitSource(split) for split in SPLITS},
                        description="WikiText-2 (raw), rows joined with blank lines as in GPTQ and the paper"),
    "ptb": Preset("ptb_text_only", "penn_treebank", "sentence", "space",
                  {split: SplitSource(split) for split in SPLITS},
                  description="Penn Treebank, sentences joined with spaces as in GPTQ and the paper"),
    # The paper trains prompts on the first 5000 train documents and measures perplexity on the first 1100
    # validation documents, also using them for model selection; we select on the next 1100 instead.
    "c4": Preset("allenai/c4", None, "text", "space",
                 {"train": SplitSource("train", 0, 5000), "validation": SplitSource("validation", 1100, 2200),
                  "test": SplitSource("validation", 0, 1100)}, data_files=_C4_FILES,
                 description="C4 (en): the first 5000 train documents; test = the first 1100 validation "
                             "documents (the paper's), validation = the next 1100"),
}


def grammar() -> str:
    """What a corpus spec may be, for error messages (the registered kinds at the time of asking)."""
    return (f"a built-in corpus ({', '.join(CORPORA)}), a preset ({', '.join(PRESETS)}), or KIND:PATH_OR_NAME"
            f"[?field=..&config=..&separator={'|'.join(SEPARATORS)}] with KIND one of {', '.join(CORPUS_KINDS)}")


@dataclass(frozen=True)
class CorpusSpec:
    """A parsed corpus spec: ``kind`` (``builtin``, ``preset`` or a name in ``CORPUS_KINDS``), ``location`` (name,
    path, dataset id or task) and options."""

    kind: str
    location: str
    field: str = "text"
    config: str | None = None
    separator_name: str = "blank_line"

    @property
    def separator(self) -> str:
        """The text placed between documents when they are joined into one token stream."""
        return SEPARATORS[self.separator_name]

    @property
    def is_named(self) -> bool:
        """A built-in corpus or preset (no path, no options)."""
        return self.kind in ("builtin", "preset")

    def __str__(self) -> str:
        if self.is_named:
            return self.location
        options = [f"field={self.field}"] if self.field != "text" else []
        options += [f"config={self.config}"] if self.config else []
        options += [f"separator={self.separator_name}"] if self.separator_name != "blank_line" else []
        return f"{self.kind}:{self.location}" + (f"?{'&'.join(options)}" if options else "")


Reader = Callable[[CorpusSpec], tuple[dict[str, list[Document]], str]]


@dataclass(frozen=True)
class CorpusKind:
    """One ``KIND:LOCATION`` corpus kind: ``read(spec)`` gives its splits (``{"train": [Document], ...}``, the
    source's own splits, any of the three; ``complete_splits`` carves the rest) and a fingerprint of its content
    (the cache key); ``local_files``: the location is a path whose files' sizes and times say when to read it again."""

    name: str
    read: Reader
    local_files: bool = False


CORPUS_KINDS: dict[str, CorpusKind] = {}


def register_corpus_kind(kind: CorpusKind) -> None:
    """Make ``KIND:`` specs of ``kind.name`` parse and read; a name registered twice is a bug (ValueError)."""
    if kind.name in CORPUS_KINDS or kind.name in ("builtin", "preset"):
        raise ValueError(f"corpus kind {kind.name!r} is registered twice")
    CORPUS_KINDS[kind.name] = kind


def parse_corpus(text: str | CorpusSpec, what: str = "corpus") -> CorpusSpec:
    """Parse a corpus spec (see the module docstring); ``what`` names the setting in errors. Raises ``CorpusError``.

    Only the syntax is checked here (cheap, for configs and command lines); paths and datasets are read on use.
    """
    if isinstance(text, CorpusSpec):
        return text
    if not isinstance(text, str) or not text:
        raise CorpusError(f"{what} {text!r}: expected {grammar()}")
    if text in CORPORA:
        return CorpusSpec("builtin", text)
    if text in PRESETS:
        return CorpusSpec("preset", text, separator_name=PRESETS[text].separator)
    match = _SPEC_RE.fullmatch(text)
    if not match or match["kind"] not in CORPUS_KINDS:
        raise CorpusError(f"{what} {text!r} is not a corpus spec: expected {grammar()}")
    options = _options(match["options"], text, what)
    if options.get("separator", "blank_line") not in SEPARATORS:
        raise CorpusError(f"{what} {text!r}: separator {options['separator']!r} is not one of "
                          f"{', '.join(SEPARATORS)}")
    if "config" in options and match["kind"] != "hf":
        raise CorpusError(f"{what} {text!r}: option config applies to hf: datasets only")
    return CorpusSpec(match["kind"], match["location"], options.get("field", "text"), options.get("config"),
                      options.get("separator", "blank_line"))


def _options(raw: str | None, text: str, what: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in (raw or "").split("&") if raw else []:
        key, equals, value = item.partition("=")
        if not equals or key not in OPTIONS or not value:
            expected = ", ".join(f"{option}=..." for option in OPTIONS)
            raise CorpusError(f"{what} {text!r}: option {item!r} is not one of {expected}")
        options[key] = value
    return options


def corpus_label(spec: str | CorpusSpec) -> str:
    """A short name for tables and file names: the name of a named corpus, else the file / dataset / task name."""
    spec = parse_corpus(spec)
    if spec.is_named:
        return spec.location
    return f"{spec.kind}-{Path(spec.location.rstrip('/')).name or spec.location}"


def load_split(spec: str | CorpusSpec, split: str) -> list[dict]:
    """Documents ``{"id", "title", "text"}`` of one split (train / validation / test) of a corpus, in order;
    ``all`` (``WHOLE_CORPUS``): every document, the three splits one after another."""
    if split == WHOLE_CORPUS:
        return [doc for name in SPLITS for doc in load_split(spec, name)]
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r} for corpus {spec}; expected one of {', '.join(SPLITS)} or "
                          f"{WHOLE_CORPUS} (every document)")
    folder = prepare(spec)
    with open(folder / f"{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def export_text(spec: str | CorpusSpec, out: Path) -> int:
    """Write every document of every split as ``out/<split>/<index>.txt`` (UTF-8) and ``files.EXPORT_MARKER``
    (the corpus and its counts), atomically, the folder replaced whole; returns how many documents. ``out`` must be
    new, empty or an earlier export (``files.OutputPathError`` otherwise). ``text:OUT`` then reads them back, split
    anew by document."""
    ensure_replaceable(Path(out), TEXT_EXPORT_KIND, "--export")
    counts = {}
    with replacing_folder(Path(out)) as folder:
        for split in SPLITS:
            (folder / split).mkdir()
            docs = load_split(spec, split)
            for index, doc in enumerate(docs):
                (folder / split / f"{index:06d}.txt").write_text(doc["text"] + "\n", encoding="utf-8")
            counts[split] = len(docs)
        write_bytes_atomic(folder / EXPORT_MARKER, json_bytes({"format": TEXT_EXPORT_FORMAT, "corpus": str(spec),
                                                                "documents": counts}))
    return sum(counts.values())


def prepare(spec: str | CorpusSpec) -> Path:
    """The cache folder holding ``{train,validation,test}.jsonl`` of a corpus, prepared when missing or stale."""
    spec = parse_corpus(spec)
    if spec.kind == "builtin":
        return prepare_corpus(spec.location)
    return _prepared(str(spec), _stat_signature(spec))


@functools.lru_cache(maxsize=32)
def _prepared(text: str, signature: tuple) -> Path:
    """Read the source once per process and content state (``signature``: file sizes and times, when files)."""
    spec = parse_corpus(text)
    splits, fingerprint = _read(spec)
    key = hashlib.sha256(json.dumps([text, fingerprint]).encode()).hexdigest()[:_KEY_HEX]
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", corpus_label(spec))

    def build(tmp: Path) -> dict:
        counts = {}
        for split, docs in splits.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for doc in docs:
                    handle.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}, ensure_ascii=False))
                    handle.write("\n")
            counts[split] = {"documents": len(docs), "words": sum(len(d.text.split()) for d in docs)}
        return {"spec": text, "content_fingerprint": fingerprint, "counts": counts}

    return ensure_entry(f"corpora/specs/{stem}-{key}", build)


def _stat_signature(spec: CorpusSpec) -> tuple:
    """(path, size, mtime) of every local file the spec reads: a changed file makes the memo above miss."""
    if spec.kind not in CORPUS_KINDS or not CORPUS_KINDS[spec.kind].local_files:
        return ()
    path = Path(spec.location).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


# --- reading each kind --------------------------------------------------------------------------------------------

def _read(spec: CorpusSpec) -> tuple[dict[str, list[Document]], str]:
    """The three splits of a (non built-in) corpus and a fingerprint of its content."""
    return _read_preset(spec) if spec.kind == "preset" else CORPUS_KINDS[spec.kind].read(spec)


def _existing_path(spec: CorpusSpec) -> Path:
    path = Path(spec.location).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus {spec}: {path} does not exist; expected a {spec.kind} file or a folder of them")
    return path


def content_digest(parts: list[str]) -> str:
    """A sha256 over the parts' own sha256s (hex): a corpus's content fingerprint."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part.encode("utf-8", "surrogatepass")).digest())
    return digest.hexdigest()


def _read_text(spec: CorpusSpec) -> tuple[dict[str, list[Document]], str]:
    path = _existing_path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"corpus {spec}: folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        docs = [Document(p.relative_to(path).as_posix(), p.stem, _read_file(p, spec).strip()) for p in files]
    else:
        docs = [Document(f"{path.name}/{index:05d}", path.stem, section.strip())
                for index, section in enumerate(sections(_read_file(path, spec), SECTION_WORDS))]
    return _split_pool(docs, spec), content_digest([f"{d.id}\0{d.text}" for d in docs])


def _read_file(path: Path, spec: CorpusSpec) -> str:
    try:
        return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as error:
        raise CorpusError(f"corpus {spec}: {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _read_records(spec: CorpusSpec) -> tuple[dict[str, list[Document]], str]:
    """jsonl / csv / parquet: a file, or a folder of files with that suffix; one record per document."""
    path = _existing_path(spec)
    files = sorted(path.rglob(f"*.{spec.kind}")) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"corpus {spec}: folder {path} holds no .{spec.kind} files")
    rows = _jsonl_rows(files, spec) if spec.kind == "jsonl" else _dataset_rows(files, spec)
    docs = [Document(f"{spec.kind}/{index:07d}", "", _field(row, spec, index)) for index, row in enumerate(rows)]
    return _split_pool(docs, spec), content_digest([d.text for d in docs])


def _jsonl_rows(files: list[Path], spec: CorpusSpec) -> list[Any]:
    rows = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise CorpusError(f"corpus {spec}: {path} line {number} is not valid JSON") from None
    return rows


def _dataset_rows(files: list[Path], spec: CorpusSpec) -> list[Any]:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.kind, data_files=[str(p) for p in files], split="train")
    except Exception as error:  # datasets reports unreadable files with many types
        raise CorpusError(f"corpus {spec}: datasets could not read {files[0]} ({type(error).__name__})") from None
    return list(dataset)


def _field(row: Any, spec: CorpusSpec, index: int) -> str:
    if not isinstance(row, dict) or not isinstance(row.get(spec.field), str):
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise CorpusError(f"corpus {spec}: record {index} has no text field {spec.field!r} (fields: {found}); "
                          "choose one with ?field=NAME")
    return row[spec.field]


def _split_pool(docs: list[Document], spec: CorpusSpec) -> dict[str, list[Document]]:
    try:
        return split_documents(docs)
    except CacheError as error:
        raise CorpusError(f"corpus {spec}: {error}") from None


def _read_hf(spec: CorpusSpec) -> tuple[dict[str, list[Document]], str]:
    dataset = _load_hf(spec, spec.location, spec.config, None)
    available = {name: dataset[name] for name in dataset}
    splits = complete_splits({name: _hf_docs(rows, spec, name) for name, rows in available.items()}, spec)
    return splits, content_digest([f"{name}\0{rows._fingerprint}" for name, rows in sorted(available.items())])


def _read_preset(spec: CorpusSpec) -> tuple[dict[str, list[Document]], str]:
    preset = PRESETS[spec.location]
    dataset = _load_hf(spec, preset.dataset, preset.config, preset.data_files)
    splits, fingerprints = {}, []
    for split, source in preset.splits.items():
        if source.split not in dataset:
            raise CorpusError(f"corpus {spec}: dataset {preset.dataset} has no {source.split} split")
        rows = dataset[source.split]
        stop = min(source.stop or len(rows), len(rows))
        chosen = rows.select(range(min(source.start, stop), stop))
        splits[split] = _hf_docs(chosen, CorpusSpec("hf", preset.dataset, preset.field), source.split, source.start)
        fingerprints.append(f"{split}\0{rows._fingerprint}\0{source}")
    return splits, content_digest(fingerprints)


def _load_hf(spec: CorpusSpec, name: str, config: str | None, data_files: dict[str, str] | None):
    """A ``DatasetDict`` from a ``save_to_disk`` folder or the Hub / datasets cache; one line when it is not there."""
    import datasets

    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(name, config, data_files=data_files)
    except Exception as error:  # datasets and the Hub raise many unrelated types for "not available"
        how = (f"datasets.load_dataset({name!r}{f', {config!r}' if config else ''}).save_to_disk(DIR) on a machine "
               "with Hub access, then use hf:DIR (or fill the datasets cache)")
        raise CorpusError(f"corpus {spec}: dataset {name!r} is not available here ({type(error).__name__}); to "
                          f"provide it, run {how}") from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def _hf_docs(rows, spec: CorpusSpec, split: str, offset: int = 0) -> list[Document]:
    if spec.field not in rows.column_names:
        raise CorpusError(f"corpus {spec}: split {split} has no text field {spec.field!r} (fields: "
                          f"{rows.column_names}); choose one with ?field=NAME")
    return [Document(f"{split}/{offset + index:07d}", "", text) for index, text in enumerate(rows[spec.field])]


def complete_splits(available: dict[str, list[Document]], spec: CorpusSpec) -> dict[str, list[Document]]:
    """The source's own train / validation / test; a source with one split is split by document; a missing
    validation or test split is carved from train (``SPLIT_FRACTIONS`` of its documents, seeded)."""
    if len(available) == 1:
        return _split_pool(next(iter(available.values())), spec)
    if "train" not in available:
        raise CorpusError(f"corpus {spec}: splits {sorted(available)} have no train split to carve the others from")
    splits = {"train": list(available["train"])}
    for split in ("validation", "test"):
        if split in available:
            splits[split] = list(available[split])
            continue
        ids = list(range(len(splits["train"])))
        random.Random(SPLIT_SEED).shuffle(ids)
        carved = set(ids[:max(1, round(SPLIT_FRACTIONS[split] * len(ids)))])
        splits[split] = [doc for index, doc in enumerate(splits["train"]) if index in carved]
        splits["train"] = [doc for index, doc in enumerate(splits["train"]) if index not in carved]
    return splits


for _kind in (CorpusKind("text", _read_text, local_files=True),
              *(CorpusKind(suffix, _read_records, local_files=True) for suffix in ("jsonl", "csv", "parquet")),
              CorpusKind("hf", _read_hf, local_files=True)):
    register_corpus_kind(_kind)
