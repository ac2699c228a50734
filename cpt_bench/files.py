"""Atomic writes of files and folders: what every result, artifact and cache entry is written through.

A reader sees either the old version or the complete new one, never a partial write:

- files (``write_bytes_atomic`` and friends) are written to a hidden temp file beside the target (``.<name>.*.tmp``),
  fsynced, renamed into place, and the folder fsynced;
- folders (``replacing_folder``) are built in a hidden temp folder beside the target (``.<name>.*.building``) and
  exchanged with the old folder in one step, so the target path never goes missing.

Replacing is only ever right for an output cpt_bench wrote before (a re-run): every writer first calls
``ensure_replaceable(path, kind, flag)``, which accepts a new or empty folder or one it recognises as an output of
the same ``OutputKind`` (by a marker file that kind always writes), and refuses anything else in one line.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_bench.errors import UserError

FILE_TEMP_SUFFIX = ".tmp"
FOLDER_TEMP_SUFFIX = ".building"
_HASH_CHUNK_BYTES = 1 << 20
_SETTLED_SECONDS = 2.0  # sha256_of remembers only files unmodified for this long
_HASHED: dict[tuple, str] = {}  # sha256_of's digests by (path, device, inode, size, mtime ns)
_FILE_MODE, _FOLDER_MODE = 0o644, 0o755
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
# errnos of a kernel or file system without RENAME_EXCHANGE (ENOSYS: no renameat2; EINVAL: flag unsupported)
_NO_EXCHANGE_ERRNOS = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP)
# The marker of an export whose own format has no place to say it was written by cpt_bench (a PEFT adapter, a
# GPTQ-format checkpoint, a corpus as text files): a JSON object with the export's ``format`` and its source.
EXPORT_MARKER = "cpt_bench_export.json"
_MARKER_JSON_MAX_BYTES = 1 << 24  # a JSON marker (a per-layer record of a large model included) is smaller
_MARKER_TEXT_HEAD_BYTES = 1 << 16  # a text marker shows its text (a page title) within its first bytes
_NAMES_SHOWN = 3  # foreign entries named in a refusal


class OutputPathError(UserError):
    """An output path a writer must not use: a file where a folder goes, a folder of other files, or a path that
    cannot be created (one-line message naming the flag and the path)."""


@dataclass(frozen=True)
class OutputKind:
    """A kind of output folder, and how a writer recognises one it wrote before (and so may replace).

    Attributes:
        name: what one is, with its article, for messages (e.g. ``"a compressed checkpoint"``).
        marker: a file every output of this kind holds (e.g. ``compression.json``).
        fields: ``(key, value)`` pairs the marker, a JSON object, must hold (e.g. its ``format``; value ``None``:
            the key, with any value); empty: any JSON object.
        contains: for a text marker instead: a text it holds (``fields`` is then not read).
        ignored: names that do not make a folder non-empty (e.g. a lock file left by a killed run).
    """

    name: str
    marker: str
    fields: tuple[tuple[str, Any], ...] = ()
    contains: str | None = None
    ignored: tuple[str, ...] = ()

    def recognises(self, folder: Path) -> bool:
        """Whether ``folder`` holds this kind's marker, with its fields (or its text)."""
        path = Path(folder) / self.marker
        limit = _MARKER_TEXT_HEAD_BYTES if self.contains is not None else _MARKER_JSON_MAX_BYTES + 1
        try:
            with open(path, "rb") as handle:
                data = handle.read(limit)
        except OSError:
            return False
        if self.contains is not None:
            return self.contains.encode("utf-8") in data
        if len(data) > _MARKER_JSON_MAX_BYTES:
            return False
        try:
            record = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        return isinstance(record, dict) and all(key in record and value in (None, record[key])
                                                for key, value in self.fields)


def ensure_replaceable(path: Path, kind: OutputKind, flag: str) -> None:
    """Check, before any work, that folder ``path`` may receive an output of ``kind`` (nothing is written).

    Accepted: a path that does not exist yet but can be created (checked now, not after the work), an empty
    folder (hidden temp files of this module and ``kind.ignored`` aside), or a folder ``kind`` recognises as its own
    earlier output. Anything else raises ``OutputPathError`` naming ``flag`` (e.g. ``--out``), the path and what
    is there: a file, or the first foreign entries.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists() or path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a file, not a folder: choose an empty or new folder for "
                              f"{kind.name}")
    if not path.exists():
        _check_creatable(path, flag)
        return
    entries = sorted(entry.name for entry in path.iterdir()
                     if entry.name not in kind.ignored and not _is_temp_name(entry.name))
    if not entries or kind.recognises(path):
        return
    shown = ", ".join(entries[:_NAMES_SHOWN]) + (", ..." if len(entries) > _NAMES_SHOWN else "")
    raise OutputPathError(f"{flag} {path} holds files that are not {kind.name} cpt_bench wrote ({shown}; "
                          f"{kind.name} holds {kind.marker}): choose an empty or new folder")


def ensure_file_replaceable(folder: Path, kind: OutputKind, flag: str) -> None:
    """Check, before any work, that a writer may write its file ``kind.marker`` into ``folder``, a folder holding
    other things too (the leaderboard's pages in a results folder): ``folder`` is a folder (or can be created)
    and ``kind.marker`` is new or recognised as written by it before; else ``OutputPathError`` (see
    ``ensure_replaceable``)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{flag} {folder} is a file, not a folder: choose a folder for {kind.name}")
    if not folder.exists():
        _check_creatable(folder, flag)
        return
    target = folder / kind.marker
    if os.path.lexists(target) and not kind.recognises(folder):
        what = "a folder" if target.is_dir() else "a file cpt_bench did not write"
        raise OutputPathError(f"{flag} {folder}: {target.name} there is {what}, not {kind.name}; move it away or "
                              "choose another folder")


def _check_creatable(path: Path, flag: str) -> None:
    """Refuse (``OutputPathError`` naming ``flag``) a missing ``path`` that could not be created: its nearest
    existing ancestor must be a folder that takes a new entry, tried with a temp folder removed at once (permission
    bits alone do not tell, e.g. for root under ``/proc``)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(ancestor))
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=f".{path.name}.", suffix=FOLDER_TEMP_SUFFIX))
    except OSError as error:
        raise OutputPathError(f"{flag} {path}: cannot create the folder ({error.strerror}); expected a folder "
                              "that exists or can be created") from None


def _is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of this module's hidden temp files or folders (``.<name>.*.tmp``/``.building``)."""
    return name.startswith(".") and name.endswith((FILE_TEMP_SUFFIX, FOLDER_TEMP_SUFFIX))


def file_state(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """(device, inode, size in bytes, modification time in ns) of ``path``: what a per-process cache keyed by a
    file compares to notice that it was rewritten or replaced (as git's index does)."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks.

    Remembered for this process while the file keeps its inode, size and modification time (as git's index does):
    a cache entry is verified each time it is resolved, once per cell in a matrix, and a 1 GB model took 5-13 s a
    time. A file modified in the last ``_SETTLED_SECONDS`` is hashed every time, since a rewrite within the
    clock's granularity could leave its modification time unchanged."""
    key = (os.path.realpath(path), *file_state(path))
    if key in _HASHED:
        return _HASHED[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    if time.time() - key[-1] / 1e9 > _SETTLED_SECONDS:
        _HASHED[key] = digest.hexdigest()
    return digest.hexdigest()


def _with_path(error: OSError, path: Path) -> OSError:
    """``error`` again, naming ``path`` (a full disk reports no file name)."""
    return type(error)(error.errno, error.strerror, str(path))


def _write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new temp file beside ``path`` (fsynced, mode 0644) and return the temp file's path.

    On failure the temp file is removed and an OSError names ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=FILE_TEMP_SUFFIX)
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
            raise _with_path(error, path) from error
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

    When writing fails (e.g. the disk is full) the old file is untouched, the temp file removed, and the OSError
    names ``path``.
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


@contextmanager
def replacing_folder(target: Path) -> Iterator[Path]:
    """Yield a new empty folder to fill; on normal exit it takes ``target``'s place, old contents removed.

    The folder is a hidden sibling of ``target`` (``.<name>.*.building``, same file system), mode 0755 once in
    place. An existing ``target`` is swapped with it in one step (``exchange_paths``), so at every moment
    ``target`` is either the complete old folder or the complete new one; then the old contents are removed and
    the parent folder fsynced. When the block raises, the temp folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=FOLDER_TEMP_SUFFIX))
    except FileExistsError:  # a file where a parent folder should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target)) from None
    except OSError as error:  # name the folder asked for, not the temp folder beside it
        raise _with_path(error, target) from None
    try:
        yield tmp
        os.chmod(tmp, _FOLDER_MODE)  # mkdtemp creates 0700
        if os.path.lexists(target):
            exchange_paths(tmp, target)  # tmp now holds the old contents, removed below
        else:
            os.rename(tmp, target)
        _fsync_folder(target.parent)
    finally:
        if tmp.is_symlink():  # the old target was a link: it was exchanged, not what it points to
            tmp.unlink()
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def exchange_paths(a: Path, b: Path) -> None:
    """Swap two existing paths of one file system atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Python's ``os`` has no exchange, hence ctypes. Where the OS or file system lacks it (not Linux, glibc < 2.28,
    kernel < 3.15, some network or FUSE file systems), the fallback renames ``b`` aside, ``a`` to ``b`` and the
    aside copy to ``a``: each step is atomic, but between the first two ``b`` is briefly missing.
    """
    try:
        _renameat2_exchange(a, b)
    except OSError as error:
        if error.errno not in _NO_EXCHANGE_ERRNOS:
            raise
        aside = a.with_name(a.name.removesuffix(FOLDER_TEMP_SUFFIX) + "-old" + FOLDER_TEMP_SUFFIX)
        os.rename(b, aside)
        try:
            os.rename(a, b)
        except OSError:
            os.rename(aside, b)
            raise
        os.rename(aside, a)


def _renameat2_exchange(a: Path, b: Path) -> None:
    """``renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)``; OSError(ENOSYS) where libc has no renameat2."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), str(b))
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(b))
