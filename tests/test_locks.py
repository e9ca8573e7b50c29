"""d2nwg.files.directory_lock: one writer per directory, across processes.

Holders are real processes: a ``python -c`` that takes the lock and waits (then is let go,
or SIGKILLed to leave its lock behind), and forked racers for the take-over of a stale lock.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

import d2nwg
from d2nwg import files
from d2nwg.errors import D2NWGError, DirectoryLockedError, FileWriteError, StaleLockWarning
from d2nwg.files import LOCK_NAME, DirectoryLock, directory_lock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys
from d2nwg.files import directory_lock

with directory_lock(sys.argv[1]):
    with open(sys.argv[1] + "/first.txt", "w") as f:
        f.write("the first writer's file")
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes stdin
print("released", flush=True)
"""


def _holder(directory: Path) -> subprocess.Popen:
    """A process that holds the lock of ``directory`` until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        raise AssertionError(f"the holder did not take the lock: {line!r} {proc.stderr.read()}")
    return proc


def _write_lock(directory: Path, record: object, age: float = 0.0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    path.write_bytes(record if isinstance(record, bytes) else json.dumps(record).encode())
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return path


def _dead_pid() -> int:
    """The pid of a process that has finished (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_error_class():
    assert issubclass(DirectoryLockedError, FileWriteError)
    assert issubclass(DirectoryLockedError, D2NWGError) and issubclass(
        DirectoryLockedError, OSError
    )
    assert d2nwg.DirectoryLockedError is DirectoryLockedError
    assert "DirectoryLockedError" in d2nwg.__all__
    assert issubclass(StaleLockWarning, UserWarning)


def test_the_lock_file_holds_this_writer_and_goes_away(tmp_path):
    directory = tmp_path / "new" / "dir"  # created by the lock
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with directory_lock(directory) as lock:
            record = _record(directory / LOCK_NAME)
            assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
            assert abs(record["since"] - time.time()) < 60
            assert lock.held and lock.path == str(directory / LOCK_NAME)
    assert not lock.held
    assert os.listdir(directory) == []
    with directory_lock(directory):  # and can be taken again
        pass


def test_a_second_writer_gets_DirectoryLockedError(tmp_path):
    directory = tmp_path / "out"
    proc = _holder(directory)
    try:
        lock_before = (directory / LOCK_NAME).read_bytes()
        with pytest.raises(DirectoryLockedError) as info:
            with directory_lock(directory):
                (directory / "first.txt").write_text("the second writer's file")
        message = str(info.value)
        assert str(directory) in message and f"pid {proc.pid}" in message
        assert socket.gethostname() in message
        # the first writer's files are untouched
        assert (directory / "first.txt").read_text() == "the first writer's file"
        assert (directory / LOCK_NAME).read_bytes() == lock_before
        assert _record(directory / LOCK_NAME)["pid"] == proc.pid
    finally:
        out, err = proc.communicate(input="", timeout=60)
    assert proc.returncode == 0 and out.strip() == "released", err
    assert not (directory / LOCK_NAME).exists()  # the holder released it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a released lock is no stale one
        with directory_lock(directory):
            pass


def test_the_lock_of_a_killed_writer_is_taken_over_with_a_warning(tmp_path):
    directory = tmp_path / "out"
    proc = _holder(directory)
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: its pid no longer exists
    proc.stdout.close()
    proc.stderr.close()
    proc.stdin.close()
    assert _record(directory / LOCK_NAME)["pid"] == proc.pid  # left behind
    with pytest.warns(StaleLockWarning) as record:
        with directory_lock(directory):
            assert _record(directory / LOCK_NAME)["pid"] == os.getpid()
    message = str(record[0].message)
    assert str(directory) in message and f"pid {proc.pid}" in message
    assert sorted(os.listdir(directory)) == ["first.txt"]  # no lock, no renamed stale lock


def test_a_lock_with_the_pid_of_a_finished_process_is_taken_over(tmp_path):
    pid = _dead_pid()
    _write_lock(tmp_path, {"pid": pid, "host": socket.gethostname(), "since": time.time()})
    with pytest.warns(StaleLockWarning, match=f"pid {pid}"):
        with directory_lock(tmp_path):
            assert _record(tmp_path / LOCK_NAME)["pid"] == os.getpid()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"pid": 12',
        b"\xff\xfe garbage",
        b"[1, 2]",
        b'{"pid": "12", "host": "h", "since": 0}',
        b'{"pid": 0, "host": "h", "since": 0}',
        b'{"pid": true, "host": "h", "since": 0}',
        b'{"pid": 12, "since": 0}',
    ],
)
def test_an_old_unreadable_lock_file_is_taken_over(tmp_path, content):
    _write_lock(tmp_path, content, age=files.UNREADABLE_LOCK_SECONDS + 60)
    with pytest.warns(StaleLockWarning, match="unreadable lock file") as record:
        with directory_lock(tmp_path):
            assert _record(tmp_path / LOCK_NAME)["pid"] == os.getpid()
    assert str(tmp_path) in str(record[0].message)
    assert os.listdir(tmp_path) == []


def test_a_recent_unreadable_lock_file_is_held(tmp_path):
    """An empty lock file of a second ago may be one whose writer has not written it yet."""
    path = _write_lock(tmp_path, b"", age=1)
    with pytest.raises(DirectoryLockedError, match="may be creating it") as info:
        with directory_lock(tmp_path):
            pass
    assert str(tmp_path) in str(info.value)
    assert path.read_bytes() == b""  # left alone


def test_a_recent_unreadable_lock_file_is_waited_for(tmp_path):
    """Its writer finishes meanwhile (here: releases it), and the lock is taken."""
    path = _write_lock(tmp_path, b"")
    remover = threading.Timer(0.15, path.unlink)
    remover.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with directory_lock(tmp_path):
                assert _record(path)["pid"] == os.getpid()
    finally:
        remover.join()


def test_a_lock_from_another_host_is_held(tmp_path):
    path = _write_lock(tmp_path, {"pid": 1, "host": "elsewhere.example", "since": 0})
    with pytest.raises(DirectoryLockedError) as info:
        with directory_lock(tmp_path):
            pass
    message = str(info.value)
    assert str(tmp_path) in message and "pid 1 on host elsewhere.example" in message
    assert "cannot be checked" in message and str(path) in message
    assert _record(path)["host"] == "elsewhere.example"


def test_a_lock_of_a_running_process_on_this_host_is_held(tmp_path):
    """Here the holder is this process's parent: a running pid this test did not lock with."""
    _write_lock(tmp_path, {"pid": os.getppid(), "host": socket.gethostname(), "since": 0})
    with pytest.raises(DirectoryLockedError, match=f"pid {os.getppid()} on host"):
        with directory_lock(tmp_path):
            pass


def test_the_lock_does_not_nest(tmp_path):
    with directory_lock(tmp_path) as outer:
        with pytest.raises(DirectoryLockedError, match="does not nest") as info:
            with directory_lock(tmp_path):
                pass
        assert str(tmp_path) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        with pytest.raises(DirectoryLockedError, match="does not nest"):
            outer.acquire()  # the same lock object again
        assert outer.held and _record(tmp_path / LOCK_NAME)["pid"] == os.getpid()
    assert os.listdir(tmp_path) == []


def test_the_lock_is_released_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with directory_lock(tmp_path):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with directory_lock(tmp_path):
            pass


def test_release_leaves_a_lock_file_that_is_not_its_own(tmp_path):
    other = {"pid": 1, "host": "elsewhere.example", "since": 0}
    with directory_lock(tmp_path):
        (tmp_path / LOCK_NAME).unlink()  # e.g. removed by hand, and another writer came
        _write_lock(tmp_path, other)
    assert _record(tmp_path / LOCK_NAME) == other


def test_a_directory_that_cannot_be_created_is_a_FileWriteError(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FileWriteError, match="cannot create the directory"):
        with directory_lock(tmp_path / "file" / "sub"):
            pass


# ----------------------------------------------------------------------------------------
# Taking over a stale lock is race-free.
# ----------------------------------------------------------------------------------------
def _racer(directory: str, start, done, results) -> None:
    """Forked: take the lock when ``start`` is set; report, and hold it until ``done``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock = DirectoryLock(directory)
        start.wait()
        try:
            lock.acquire()
        except DirectoryLockedError as exc:
            results.put(("locked", os.getpid(), str(exc), len(caught)))
            return
        results.put(("won", os.getpid(), "", len(caught)))
        done.wait(60)
        lock.release()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_racing_writers_take_a_stale_lock_over_once(tmp_path):
    """Several processes find the same stale lock at once: one takes the directory (with one
    warning), every other one gets DirectoryLockedError naming the winner."""
    ctx = multiprocessing.get_context("fork")
    for round in range(3):
        directory = tmp_path / f"round{round}"
        _write_lock(directory, {"pid": _dead_pid(), "host": socket.gethostname(), "since": 0})
        start, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
        racers = [
            ctx.Process(target=_racer, args=(str(directory), start, done, results))
            for _ in range(4)
        ]
        for p in racers:
            p.start()
        start.set()
        got = [results.get(timeout=60) for _ in racers]
        done.set()
        for p in racers:
            p.join(60)
        winners = [pid for kind, pid, _, _ in got if kind == "won"]
        assert len(winners) == 1, got
        assert sum(n for *_, n in got) == 1, got  # one take-over, one warning
        for kind, _, message, _ in got:
            if kind == "locked":
                assert f"pid {winners[0]}" in message, got
        assert os.listdir(directory) == [], "the winner released it, no stale copies left"


def test_a_take_over_without_flock_puts_back_a_lock_it_did_not_judge(tmp_path, monkeypatch):
    """Without the flock, a writer may judge the stale file, then rename a new holder's file
    (created meanwhile) away: it sees another inode, and puts that file back."""
    stale = _write_lock(tmp_path, {"pid": _dead_pid(), "host": socket.gethostname(), "since": 0})
    judged = files._read_lock(str(stale))
    stale.unlink()  # another writer took it over, and created its own lock:
    new = {"pid": 1, "host": "elsewhere.example", "since": 0}
    _write_lock(tmp_path, new)
    monkeypatch.setattr(files, "_exclusive", lambda directory: _no_lock())
    reads = iter([judged])
    real = files._read_lock
    monkeypatch.setattr(files, "_read_lock", lambda path: next(reads, None) or real(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DirectoryLockedError, match="elsewhere.example"):
            with directory_lock(tmp_path):
                pass
    assert _record(tmp_path / LOCK_NAME) == new
    assert os.listdir(tmp_path) == [LOCK_NAME]


class _no_lock:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None
