"""A lock on a run folder, so two runs never write into the same folder at once.

``with RunLock(run_dir): ...`` creates ``run_dir/run.lock`` with ``O_CREAT | O_EXCL`` (atomic on local file
systems and NFSv3+), holding JSON ``{pid, hostname, started, boot_id, start_ticks}``: the owner's pid and host,
when it took the lock, the kernel's boot id and the owner's start time in clock ticks since boot
(``/proc/<pid>/stat`` field 22), so a pid reused by another process after a crash or a reboot is not mistaken
for the owner. An existing lock whose owner is alive on this host is refused with ``RunLockError``; one whose
owner is gone is taken over with a warning. A lock held from another host is never taken over automatically.

Taking over is race-safe: the stale lock is renamed to a unique name (only one contender can move a given
file) and checked to be the very file judged stale before it is deleted; every contender then retries the
``O_EXCL`` create, which exactly one wins. Releasing removes the lock only while it is still this holder's.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from cpt_bench.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
_READ_TRIES = 20  # a lock created a moment ago may not hold its JSON yet: re-read for up to ~1 s
_READ_PAUSE_S = 0.05
_ACQUIRE_TRIES = 10
_STAT_STATE, _STAT_START_TICKS = 0, 19  # indices of fields 3 and 22 of /proc/<pid>/stat after the ")"


class RunLockError(UserError):
    """A run folder is locked by a live process or its lock cannot be judged (one-line message)."""


def boot_id() -> str | None:
    """This boot's id (Linux), or None where the kernel does not expose one."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (after the command name), or None when not readable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), or None when unknown."""
    fields = _proc_stat(pid)
    return int(fields[_STAT_START_TICKS]) if fields else None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    fields = _proc_stat(pid)
    return not (fields and fields[_STAT_STATE] == "Z")  # a zombie has finished its work


def owner_alive(record: dict[str, Any]) -> bool:
    """Whether the process that wrote lock ``record`` (on this host) still runs: same boot, pid present,
    and, when recorded, the same process start time (else the pid was reused)."""
    if record.get("boot_id") and boot_id() and record["boot_id"] != boot_id():
        return False
    if not _pid_exists(record["pid"]):
        return False
    recorded, current = record.get("start_ticks"), process_start_ticks(record["pid"])
    return recorded is None or current is None or recorded == current


def _lock_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "hostname": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "boot_id": boot_id(), "start_ticks": process_start_ticks(os.getpid())}


class RunLock:
    """Exclusive use of a run folder for the duration of a ``with`` block (see the module docstring).

    Raises ``RunLockError`` on entry when another live process holds the folder.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._content: bytes | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the lock file, taking over a stale one; raises ``RunLockError`` when the folder is busy."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        content = (json.dumps(_lock_record(), sort_keys=True) + "\n").encode()
        for _ in range(_ACQUIRE_TRIES):
            if self._try_create(content):
                self._content = content
                return
            self._take_over_if_stale()
        raise RunLockError(f"could not lock run folder {self.run_dir}: {self.path} keeps changing hands")

    def release(self) -> None:
        """Remove the lock file if it is still the one this holder wrote."""
        if self._content is None:
            return
        try:
            ours = self.path.read_bytes() == self._content
        except FileNotFoundError:
            ours = False
        if ours:
            self.path.unlink()
        else:
            log.warning("run lock %s was removed or replaced while held; leaving it as it is", self.path)
        self._content = None

    def _try_create(self, content: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, content)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return True

    def _read_existing(self) -> tuple[bytes, dict[str, Any]] | None:
        """The current lock's bytes and record; None once it is gone. Raises when it stays unreadable."""
        problem = ""
        for _ in range(_READ_TRIES):
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None
            try:
                record = json.loads(raw)
                if isinstance(record, dict) and isinstance(record.get("pid"), int):
                    return raw, record
                problem = "no pid in it"
            except (json.JSONDecodeError, UnicodeDecodeError):
                problem = "not JSON" if raw else "empty"
            time.sleep(_READ_PAUSE_S)
        raise RunLockError(f"run folder {self.run_dir} has an unreadable lock file {self.path} ({problem}); "
                           "remove it if no run is using that folder")

    def _take_over_if_stale(self) -> None:
        """Remove the current lock if its owner is gone; raise ``RunLockError`` if it is alive or elsewhere."""
        existing = self._read_existing()
        if existing is None:
            return
        raw, record = existing
        where = (f"run folder {self.run_dir} is locked by pid {record['pid']} on {record.get('hostname')} "
                 f"since {record.get('started')}")
        remedy = f"wait for it or remove {self.path} if that process is gone"
        if record.get("hostname") != socket.gethostname():
            raise RunLockError(f"{where} (another host: whether it still runs cannot be checked from here); {remedy}")
        if owner_alive(record):
            raise RunLockError(f"{where}; {remedy}")
        self._remove_stale(raw, record)

    def _remove_stale(self, raw: bytes, record: dict[str, Any]) -> None:
        """Move the stale lock aside under a unique name; delete it if it is the file judged stale, else put
        back what was moved (a contender took the lock over in between)."""
        moved = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another contender moved it first
        if moved.read_bytes() == raw:
            moved.unlink()
            log.warning("took over run folder %s: its lock was held by pid %s on %s since %s, which is gone",
                        self.run_dir, record["pid"], record.get("hostname"), record.get("started"))
            return
        try:
            os.link(moved, self.path)
        except FileExistsError:
            log.warning("run lock %s changed hands during a takeover; a lock was displaced", self.path)
        moved.unlink()
