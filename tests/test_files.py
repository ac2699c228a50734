"""Atomic folder replacement (``cpt_bench.files.replacing_folder``): the target is never missing, a failure keeps it."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from cpt_bench import files
from cpt_bench.files import FOLDER_TEMP_SUFFIX, replacing_folder


def _contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)


def _fill(folder: Path, version: str) -> None:
    (folder / "sub").mkdir()
    (folder / "a.txt").write_text(f"a {version}")
    (folder / "sub" / "b.txt").write_text(f"b {version}")


def test_builds_a_new_folder_when_there_is_none(tmp_path):
    target = tmp_path / "parent" / "entry"
    with replacing_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".entry.") and tmp.name.endswith(
            FOLDER_TEMP_SUFFIX)
        assert not any(tmp.iterdir()) and not target.exists()
        _fill(tmp, "new")
    assert _contents(target) == {"a.txt": "a new", "sub/b.txt": "b new"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert _siblings(target) == []


def test_replaces_an_existing_folder_and_removes_the_old_contents(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    _fill(target, "old")
    (target / "only-old.txt").write_text("gone afterwards")
    with replacing_folder(target) as tmp:
        assert _contents(target)["a.txt"] == "a old"  # the old folder stays in place while the new one is built
        _fill(tmp, "new")
    assert _contents(target) == {"a.txt": "a new", "sub/b.txt": "b new"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert _siblings(target) == []


@pytest.mark.parametrize("existing", [True, False])
def test_a_failure_inside_the_block_keeps_the_old_folder_and_leaves_no_temp(tmp_path, existing):
    target = tmp_path / "entry"
    if existing:
        target.mkdir()
        _fill(target, "old")
    with pytest.raises(RuntimeError, match="build failed"), replacing_folder(target) as tmp:
        _fill(tmp, "new")
        raise RuntimeError("build failed")
    assert (_contents(target) == {"a.txt": "a old", "sub/b.txt": "b old"}) if existing else not target.exists()
    assert _siblings(target) == []


def _replace_while_watching(target: Path, rounds: int) -> list[int]:
    """Replace ``target`` ``rounds`` times while a thread checks it constantly; the rounds it saw it missing."""
    missing, done, current = [], threading.Event(), [0]

    def watch() -> None:
        while not done.is_set():
            if not (target / "a.txt").is_file():
                missing.append(current[0])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for current[0] in range(rounds):
            with replacing_folder(target) as tmp:
                _fill(tmp, str(current[0]))
    finally:
        done.set()
        watcher.join()
    assert _contents(target)["a.txt"] == f"a {rounds - 1}" and _siblings(target) == []
    return missing


def test_target_is_never_missing_while_it_is_replaced(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    _fill(target, "first")
    assert _replace_while_watching(target, rounds=200) == []


def _watch_every_step(monkeypatch, target: Path) -> list[tuple[str, bool]]:
    """After every file-system step of ``replacing_folder`` (renames, exchange, removal, fsync): its name and
    whether ``target`` was complete then."""
    seen: list[tuple[str, bool]] = []

    def spy(name: str, step):
        def run(*args, **kwargs):
            result = step(*args, **kwargs)
            seen.append((name, (target / "a.txt").is_file()))
            return result
        return run

    monkeypatch.setattr(os, "rename", spy("rename", os.rename))
    monkeypatch.setattr(shutil, "rmtree", spy("rmtree", shutil.rmtree))
    for name in ("_renameat2_exchange", "_fsync_folder"):
        monkeypatch.setattr(files, name, spy(name, getattr(files, name)))
    return seen


def test_after_every_step_the_target_is_complete(tmp_path, monkeypatch):
    target = tmp_path / "entry"
    target.mkdir()
    _fill(target, "old")
    seen = _watch_every_step(monkeypatch, target)
    with replacing_folder(target) as tmp:
        _fill(tmp, "new")
    assert [name for name, _ in seen] == ["_renameat2_exchange", "_fsync_folder", "rmtree"]
    assert all(complete for _, complete in seen)


def test_without_rename_exchange_the_fallback_still_replaces(tmp_path, monkeypatch):
    """A file system without RENAME_EXCHANGE (renameat2 fails with EINVAL): rename aside, then into place; the
    documented gap between the first two renames is seen by the step watcher (so its check above can fail)."""
    def unsupported(a: Path, b: Path) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(b))

    monkeypatch.setattr(files, "_renameat2_exchange", unsupported)
    target = tmp_path / "entry"
    target.mkdir()
    _fill(target, "old")
    seen = _watch_every_step(monkeypatch, target)
    with replacing_folder(target) as tmp:
        _fill(tmp, "new")
    assert _contents(target) == {"a.txt": "a new", "sub/b.txt": "b new"}
    assert _siblings(target) == []
    assert [complete for name, complete in seen if name == "rename"] == [False, True, True]


def test_a_settled_file_is_hashed_once_and_again_when_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    old = os.stat(path).st_mtime - 60
    os.utime(path, (old, old))  # settled: unmodified for a minute
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k))
    first = files.sha256_of(path)
    assert files.sha256_of(path) == first and reads == [path]  # the second call trusts the unchanged file
    path.write_bytes(b"b" * 1000)  # same size, new modification time: hashed again, every time while fresh
    assert files.sha256_of(path) != first and files.sha256_of(path) != first and len(reads) == 3
    replaced = tmp_path / "new.bin"
    replaced.write_bytes(b"c" * 1000)
    os.utime(replaced, (old, old))
    os.replace(replaced, path)  # another file under the name, with an old time: hashed again (new inode)
    assert files.sha256_of(path) == files.sha256_of(path) != first and len(reads) == 4
