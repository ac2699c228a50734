"""The on-disk cache of downloaded and derived assets.

Layout: ``<root>/<entry name>/`` holds the entry's files plus ``manifest.json`` (size and sha256 of
every file, and where the entry came from). An entry is built into a temporary sibling folder and
renamed into place only when complete, so a crash never leaves a half-built entry that reads as
valid; an entry whose manifest is missing or whose files do not match it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "CPT_BENCH_CACHE"
MANIFEST = "manifest.json"
_HASH_CHUNK_BYTES = 1 << 20
_FILE_MODE, _FOLDER_MODE = 0o644, 0o755


class CacheError(RuntimeError):
    """A cache entry could not be built or read (one-line message for the user)."""


def cache_root() -> Path:
    """The cache folder: ``$CPT_BENCH_CACHE``, else ``$XDG_CACHE_HOME/cpt_bench``, else ``~/.cache/cpt_bench``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "cpt_bench"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new temp file beside ``path`` (fsynced, mode 0644) and return the temp file's path.

    On failure the temp file is removed and an OSError names ``path`` (a full disk reports no file name).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with memoryview(data) as view:
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
            os.fsync(fd)
            os.fchmod(fd, _FILE_MODE)  # mkstemp creates 0600; results and caches are meant to be readable
        finally:
            os.close(fd)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno is not None:
            raise type(error)(error.errno, error.strerror, str(path)) from error
        raise
    return Path(tmp)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, rename, fsync the folder.

    A reader sees either the old file or the complete new one, never a partial write; when writing fails
    (e.g. the disk is full) the old file is untouched, the temp file removed, and the OSError names ``path``.
    """
    write_files_atomic(path.parent, {path.name: data})


def write_files_atomic(folder: Path, files: dict[str, bytes]) -> None:
    """Write several files of ``folder`` (name -> bytes) so that all are replaced or none is.

    Every file is first written to a temp file (see ``write_bytes_atomic``); only when all are complete are they
    renamed into place, in the order given. A failure while writing leaves every old file untouched.
    """
    staged: dict[Path, Path] = {}
    try:
        for name, data in files.items():
            staged[folder / name] = _write_temp(folder / name, data)
        for target, tmp in staged.items():
            os.replace(tmp, target)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    _fsync_folder(folder)


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` atomically (see ``write_bytes_atomic``)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_bytes(payload: Any) -> bytes:
    """``payload`` as indented, key-sorted UTF-8 JSON with a final newline (how every JSON file here is written)."""
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as ``json_bytes``, atomically (see ``write_bytes_atomic``)."""
    write_bytes_atomic(path, json_bytes(payload))


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
    except (ValueError, KeyError) as exc:
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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".building"))
    try:
        provenance = _build(build, tmp, folder, problem)
        write_json_atomic(tmp / MANIFEST, {"name": name, **provenance, "files": _file_records(tmp)})
        os.chmod(tmp, _FOLDER_MODE)  # mkdtemp creates 0700
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
