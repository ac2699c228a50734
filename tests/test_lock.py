"""The run-folder lock: refused while its owner lives, taken over once it is gone, released on exit."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_bench.matrix.lock import LOCK_FILE, RunLock, RunLockError, boot_id, process_start_ticks

CONTENDERS = 4
ROUNDS = 3
TIMEOUT_S = 60


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def _write_lock(run_dir: Path, pid: int, **overrides) -> Path:
    record = {"pid": pid, "hostname": socket.gethostname(), "started": "2024-01-01T00:00:00+00:00",
              "boot_id": boot_id(), "start_ticks": process_start_ticks(pid)} | overrides
    path = run_dir / LOCK_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def _hold(run_dir: str, held, done) -> None:
    """Child process: take the lock, signal, keep it until told to finish."""
    with RunLock(run_dir):
        held.set()
        done.wait(TIMEOUT_S)


def _contend(run_dir: str, barrier, finished, results) -> None:
    """Child process: race for the lock; the winner keeps it until every contender has tried."""
    barrier.wait(TIMEOUT_S)
    try:
        lock = RunLock(run_dir)
        lock.acquire()
    except RunLockError as error:
        results.put(("lost", str(error)))
        finished.wait(TIMEOUT_S)
        return
    results.put(("won", os.getpid()))
    finished.wait(TIMEOUT_S)
    lock.release()


def test_lock_file_records_the_owner_and_is_removed_on_exit(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        record = json.loads(lock.path.read_text())
        assert record["pid"] == os.getpid() and record["hostname"] == socket.gethostname()
        assert record["start_ticks"] == process_start_ticks(os.getpid()) and "T" in record["started"]
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path) as lock, pytest.raises(RunLockError) as caught, RunLock(tmp_path):
        pass
    message = str(caught.value)
    assert message.startswith(f"run folder {tmp_path} is locked by pid {os.getpid()} on {socket.gethostname()}")
    assert f"remove {lock.path} if that process is gone" in message and "\n" not in message
    assert not lock.path.exists()  # the refused attempt did not remove the holder's lock, the holder did on exit


def test_lock_held_by_another_process_is_refused(tmp_path):
    context = multiprocessing.get_context("spawn")
    held, done = context.Event(), context.Event()
    child = context.Process(target=_hold, args=(str(tmp_path), held, done))
    child.start()
    try:
        assert held.wait(TIMEOUT_S)
        with pytest.raises(RunLockError, match=f"is locked by pid {child.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        done.set()
        child.join(TIMEOUT_S)
    assert child.exitcode == 0 and not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, dead, start_ticks=None)
    with caplog.at_level(logging.WARNING), RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"held by pid {dead}" in caplog.text and "which is gone" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == []  # no lock and no moved-aside stale copy left behind


@pytest.mark.parametrize("overrides", [{"start_ticks": -1}, {"boot_id": "another-boot"}],
                         ids=["recycled-pid", "rebooted"])
def test_live_pid_of_another_process_or_boot_is_not_the_owner(tmp_path, overrides):
    if process_start_ticks(os.getpid()) is None:
        pytest.skip("no /proc/<pid>/stat here: a recycled pid cannot be told apart")
    _write_lock(tmp_path, os.getppid(), **overrides)  # a pid that is alive, but not the process that wrote the lock
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    path = _write_lock(tmp_path, _dead_pid(), hostname="elsewhere.example")
    before = path.read_bytes()
    with pytest.raises(RunLockError, match=r"on elsewhere\.example since .* \(another host: .*cannot be checked"):
        RunLock(tmp_path).acquire()
    assert path.read_bytes() == before


def test_unreadable_lock_is_refused_not_removed(tmp_path, monkeypatch):
    monkeypatch.setattr("cpt_bench.matrix.lock._READ_PAUSE_S", 0)
    (tmp_path / LOCK_FILE).write_text("{half a rec")
    with pytest.raises(RunLockError, match=r"unreadable lock file .*run\.lock \(not JSON\); remove it"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).read_text() == "{half a rec"


def test_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(KeyError), RunLock(tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / LOCK_FILE).exists()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    with RunLock(tmp_path) as lock:
        other = _write_lock(tmp_path, os.getppid())
        replaced = other.read_bytes()
    assert lock.path.read_bytes() == replaced


def test_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    context = multiprocessing.get_context("spawn")
    for round_index in range(ROUNDS):
        run_dir = tmp_path / f"run{round_index}"
        _write_lock(run_dir, _dead_pid())
        barrier, finished, results = context.Barrier(CONTENDERS), context.Event(), context.Queue()
        children = [context.Process(target=_contend, args=(str(run_dir), barrier, finished, results))
                    for _ in range(CONTENDERS)]
        for child in children:
            child.start()
        outcomes = [results.get(timeout=TIMEOUT_S) for _ in children]
        finished.set()
        for child in children:
            child.join(TIMEOUT_S)
        winners = [value for kind, value in outcomes if kind == "won"]
        assert len(winners) == 1, outcomes
        for kind, message in outcomes:
            assert kind == "won" or f"is locked by pid {winners[0]} on" in message, outcomes
        assert sorted(p.name for p in run_dir.iterdir()) == []  # the winner released; no stale copies left
