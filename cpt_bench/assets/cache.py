"""The on-disk cache of downloaded and derived assets.

Layout: ``<root>/<entry name>/`` holds the entry's files plus ``manifest.json`` (size and sha256 of
every file, and where the entry came from). An entry is built into a temporary sibling folder that takes
the old entry's place only when complete (``files.replacing_folder``), so a crash never leaves a half-built
entry that reads as valid, nor no entry where one was; an entry whose manifest is missing or whose files do
not match it is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpt_bench.errors import UserError
from cpt_bench.files import replacing_folder, sha256_of, write_json_atomic

log = logging.getLogger(__name__)

CACHE_ENV = "CPT_BENCH_CACHE"
MANIFEST = "manifest.json"


class CacheError(UserError):
    """A cache entry could not be built or read (one-line message for the user)."""


def cache_root() -> Path:
    """The cache folder: ``$CPT_BENCH_CACHE``, else ``$XDG_CACHE_HOME/cpt_bench``, else ``~/.cache/cpt_bench``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "cpt_bench"


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        records[rel] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return records


def entry_problem(folder: Path) -> str | None:
    """Why the entry at ``folder`` is not usable, or None when it is complete and matches its manifest."""
    manifest_path = folder / MANIFEST
    if not folder.exists():
        return "missing"
    if not manifest_path.exists():
        return "no manifest (incomplete build)"
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc.__class__.__name__})"
    for rel, record in files.items():
        path = folder / rel
        if not path.is_file():
            return f"file {rel} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"file {rel} has {path.stat().st_size} bytes, manifest says {record['bytes']}"
        if sha256_of(path) != record["sha256"]:
            return f"file {rel} fails its sha256 check"
    return None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a valid entry (call ``ensure_entry`` first)."""
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def _build(build: Callable[[Path], dict[str, Any]], tmp: Path, folder: Path, problem: str) -> dict[str, Any]:
    """``build(tmp)``; when rebuilding an unusable entry fails, say so along with why it was unusable."""
    try:
        return build(tmp)
    except CacheError as error:
        if problem == "missing":
            raise
        raise CacheError(f"cache entry {folder} is unusable ({problem}) and could not be rebuilt: {error}") from error


def ensure_entry(name: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Return the folder of cache entry ``name``, building it first when missing or corrupt.

    ``build(tmp_folder)`` writes the entry's files into ``tmp_folder`` and returns provenance
    (source, licence, counts) that is stored in the manifest beside each file's size and sha256.
    """
    folder = cache_root() / name
    problem = entry_problem(folder)
    if problem is None:
        return folder
    if problem != "missing":
        log.warning("cache entry %s is unusable (%s); rebuilding it", folder, problem)
    with replacing_folder(folder) as tmp:
        provenance = _build(build, tmp, folder, problem)
        write_json_atomic(tmp / MANIFEST, {"name": name, **provenance, "files": _file_records(tmp)})
    return folder
