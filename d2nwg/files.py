"""Safetensors and JSON files written atomically and read with errors that name the file;
:class:`DirectoryLock`, which keeps a directory to one writer across processes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator

import torch

from d2nwg.errors import (
    D2NWGError,
    DirectoryLockedError,
    FileFormatError,
    FileWriteError,
    StaleLockWarning,
    warn_at_caller,
)


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """Write ``tensors`` to ``path``: a temporary file in the same folder, then a rename, so a
    reader never sees a half-written file and a failed write leaves nothing behind."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
        os.close(fd)
        _default_mode(tmp)
    except OSError as exc:
        raise FileWriteError(f"{path}: cannot write here ({exc})") from exc
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, D2NWGError):
            # SafetensorError (a full disk), OSError, or a tensor safetensors cannot store
            raise FileWriteError(
                f"{path}: could not be written ({type(exc).__name__}: "
                f"{str(exc)[:300]}); nothing was left behind"
            ) from exc
        raise


def save_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``.

    ``obj`` is serialized first (NaN and Inf refused: they are not JSON), so an object that
    cannot be written leaves no file at all.
    """
    path = os.fspath(path)
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    _default_mode(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_json(path: str | os.PathLike) -> object:
    """The parsed content of a JSON file; FileFormatError naming the file if missing or invalid."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, OSError, RecursionError) as exc:  # bad syntax, encoding, deep nesting
        raise FileFormatError(f"{path}: not a readable JSON file: {exc}") from exc


def read_safetensors(
    path: str | os.PathLike, *, load_tensors: bool = True, device: str | torch.device = "cpu"
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; FileFormatError if missing or unreadable."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if load_tensors else {}
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise FileFormatError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    return metadata, tensors


def loads_json(text: str, where: str, *, allow_nan: bool = False) -> object:
    """Parse JSON text read from a file; any malformed text raises FileFormatError naming
    ``where`` (the file, and the field it came from). Besides syntax errors this covers what
    ``json.loads`` raises other than JSONDecodeError: integers of more than 4300 digits
    (ValueError), nesting deep enough to exhaust the stack (RecursionError), and, unless
    ``allow_nan``, the non-JSON constants NaN, Infinity and -Infinity."""
    if not isinstance(text, str):
        raise FileFormatError(f"{where}: expected JSON text, got {type(text).__name__}")

    def no_constant(name: str) -> float:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=None if allow_nan else no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise FileFormatError(
            f"{where}: invalid JSON ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def parse_json_metadata(
    metadata: dict[str, str], key: str, path: str | os.PathLike, what: str
) -> object:
    """The JSON value stored under ``key`` in a safetensors file's metadata."""
    path = os.fspath(path)
    if key not in metadata:
        raise FileFormatError(f"{path}: no {what} (metadata key {key!r}) in the file")
    return loads_json(metadata[key], f"{path}: metadata {key!r}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf (always true for integer and bool tensors)."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if t.element_size() == 1:  # isfinite is not implemented for float8
        t = t.to(torch.float16)
    return bool(torch.isfinite(t).all())


def _default_mode(path: str) -> None:
    """mkstemp creates 0600 files; give the final file the mode open() would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ----------------------------------------------------------------------------------------
# One writer per directory.
# ----------------------------------------------------------------------------------------
LOCK_NAME = ".d2nwg.lock"
# An empty or unreadable lock file younger than this may be one that a writer is still
# writing (it creates the file, then writes its record); older, it was left by a writer
# killed in between.
UNREADABLE_LOCK_SECONDS = 5.0
_WAITS = 10  # 50 ms waits for an unreadable, recent lock file to be written
_ATTEMPTS = 20  # creates tried before giving up on a lock that keeps changing hands


class DirectoryLock:
    """Keep ``directory`` to one writer across processes: ``with DirectoryLock(d): ...``.

    Entering creates the directory if needed, then ``<directory>/.d2nwg.lock`` atomically
    (``O_CREAT | O_EXCL``), holding ``{"pid", "host", "since"}`` of this process; leaving
    removes the file if it is still this lock's (also when the body raised). Where a lock
    file exists already:

    * its holder runs on this host (``os.kill(pid, 0)`` succeeds, or fails for want of
      permission): :class:`~d2nwg.DirectoryLockedError` naming the directory, the pid and the
      host. That holder may be this very process: the lock does not nest, so a second
      ``with`` on the same directory in one process (or another of its threads) raises too.
    * its holder is on another host: whether it still runs cannot be checked from here, so
      the directory is held (DirectoryLockedError, naming the file to remove once it is known
      to be dead).
    * its holder's pid is gone from this host (killed, crashed): the lock is taken over, with
      a :class:`~d2nwg.errors.StaleLockWarning` naming the directory and the dead pid. So is
      an empty or unreadable lock file older than :data:`UNREADABLE_LOCK_SECONDS` (left by a
      writer killed between creating the file and writing its record); a younger one is
      waited for briefly, then treated as held.

    A take-over is race-free: it runs under an exclusive ``flock`` of the directory (which
    the kernel drops if its holder dies), re-reads the lock file there, and renames it to a
    unique name before the ``O_EXCL`` create is tried again, so that of two processes finding
    the same stale lock only one can take the directory. (Where flock is unavailable, the
    renamed file is also checked to be the one judged stale, by inode and content, and put
    back if it is not.)

    A pid reused by an unrelated process keeps a dead writer's lock held: the message says
    which file to remove. Filesystem errors raise :class:`~d2nwg.FileWriteError`.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._held: tuple[int, int] | None = None  # (st_dev, st_ino) of our lock file

    def __repr__(self) -> str:
        return f"DirectoryLock({self.directory!r}, held={self.held})"

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._held is not None

    def acquire(self) -> None:
        """Take the lock, or raise DirectoryLockedError (see the class docstring)."""
        if self._held is not None:
            raise DirectoryLockedError(
                f"{self.directory}: this lock is held already (pid {os.getpid()}); "
                "a directory lock does not nest"
            )
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise FileWriteError(f"{self.directory}: cannot create the directory ({exc})") from exc
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        attempts = waits = 0
        while attempts < _ATTEMPTS:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._take_over(final=waits >= _WAITS):
                    attempts += 1
                else:  # an unreadable, recent lock file: its writer may be writing it
                    waits += 1
                    time.sleep(0.05)
                continue
            except OSError as exc:
                raise FileWriteError(f"{self.path}: cannot create the lock file ({exc})") from exc
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                    stat = os.fstat(f.fileno())
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.remove(self.path)
                raise FileWriteError(f"{self.path}: cannot write the lock file ({exc})") from exc
            self._held = (stat.st_dev, stat.st_ino)
            return
        raise DirectoryLockedError(
            f"{self.directory}: the lock changed hands {_ATTEMPTS} times while this writer "
            f"tried to take it ({self.path})"
        )

    def release(self) -> None:
        """Remove the lock file if it is still this lock's; nothing if the lock is not held."""
        held, self._held = self._held, None
        if held is None:
            return
        with contextlib.suppress(OSError):
            text, stat = _read_lock(self.path)
            holder = _parse_holder(text)
            if (stat.st_dev, stat.st_ino) == held and holder and holder["pid"] == os.getpid():
                os.remove(self.path)

    def _take_over(self, final: bool) -> bool:
        """Raise DirectoryLockedError if the lock file's holder may still run, else move the
        file away (with a StaleLockWarning). False: an unreadable lock file too recent to be
        judged (raises instead when ``final``); True: try the create again."""
        with _exclusive(self.directory):
            try:
                text, stat = _read_lock(self.path)
            except FileNotFoundError:
                return True  # released meanwhile
            except OSError as exc:
                raise FileWriteError(f"{self.path}: cannot read the lock file ({exc})") from exc
            holder = _parse_holder(text)
            if holder is not None:
                self._raise_if_held(holder)
                what = f"the lock of pid {holder['pid']}, which no longer runs on this host"
            else:
                age = time.time() - stat.st_mtime
                if age < UNREADABLE_LOCK_SECONDS:
                    if not final:
                        return False
                    raise DirectoryLockedError(
                        f"{self.directory}: {self.path} is {_snippet(text)} and {age:.1f} s "
                        "old: a writer may be creating it (it is taken over once "
                        f"{UNREADABLE_LOCK_SECONDS:g} s old)"
                    )
                what = (
                    f"an unreadable lock file ({_snippet(text)}, {age:.0f} s old; a writer "
                    "killed between creating and writing it?)"
                )
            grave = f"{self.path}.stale-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(self.path, grave)
            except FileNotFoundError:
                return True
            except OSError as exc:
                raise FileWriteError(f"{self.path}: cannot move a stale lock away ({exc})") from exc
            try:  # the same file: inode (which a new file may reuse) and content
                moved_text, moved = _read_lock(grave)
                same_inode = (moved.st_dev, moved.st_ino) == (stat.st_dev, stat.st_ino)
                ours = same_inode and moved_text == text
            except OSError:
                ours = True
            if not ours:  # a new holder's file, not the stale one (no flock here): put it back
                with contextlib.suppress(OSError):
                    os.link(grave, self.path)  # (fails, rather than replace, if one exists)
                with contextlib.suppress(OSError):
                    os.remove(grave)
                return True
            with contextlib.suppress(OSError):
                os.remove(grave)
        warn_at_caller(f"{self.directory}: took over {what}", StaleLockWarning)
        return True

    def _raise_if_held(self, holder: dict) -> None:
        pid, host = holder["pid"], holder["host"]
        since = _since(holder["since"])
        if host != socket.gethostname():
            raise DirectoryLockedError(
                f"{self.directory}: locked by pid {pid} on host {host} since {since}; whether "
                f"it still runs cannot be checked from this host: if it does not, remove "
                f"{self.path}"
            )
        if pid == os.getpid():
            raise DirectoryLockedError(
                f"{self.directory}: locked by this process (pid {pid} on host {host}) since "
                f"{since}; a directory lock does not nest"
            )
        if _pid_runs(pid):
            raise DirectoryLockedError(
                f"{self.directory}: locked by another writer, pid {pid} on host {host}, since "
                f"{since} (if pid {pid} is no d2nwg writer, remove {self.path})"
            )


def directory_lock(directory: str | os.PathLike) -> DirectoryLock:
    """``with directory_lock(d):`` keeps ``d`` to this writer; see :class:`DirectoryLock`."""
    return DirectoryLock(directory)


@contextlib.contextmanager
def _exclusive(directory: str) -> Iterator[None]:
    """An exclusive flock of ``directory`` between processes (dropped by the kernel if its
    holder dies), or nothing where flock is not available."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without flock
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (drops the flock)


def _read_lock(path: str) -> tuple[str, os.stat_result]:
    """The text of a lock file and its stat, from one open file (so that they belong together)."""
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        data = f.read(4096)
    return data.decode("utf-8", errors="replace"), stat


def _parse_holder(text: str) -> dict | None:
    """The record {"pid": int > 0, "host": str, "since": number} of a lock file, or None."""
    try:
        holder = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(holder, dict):
        return None
    pid, host, since = holder.get("pid"), holder.get("host"), holder.get("since")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31:
        return None
    if not isinstance(host, str) or isinstance(since, bool) or not isinstance(since, (int, float)):
        return None
    return holder


def _pid_runs(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one this user may not signal does)."""
    if os.name == "nt":  # os.kill(pid, 0) sends CTRL_C_EVENT there: cannot check, assume so
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def _since(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return repr(t)


def _snippet(text: str) -> str:
    return f"holding {text[:40]!r}" if text else "empty"
