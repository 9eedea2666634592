"""One writer per run directory: :class:`RunLock`.

A run directory has one writer at a time: ``robustdrop track`` (new run or ``--resume``) and a
sweep cell hold the run's lock while they write, and a second writer refuses with one line that
names the holder. The lock is ``fcntl.flock`` on ``RUN/.lock``: the kernel releases it when the
holding process ends, however it ends (``kill -9``, out of memory, node reboot), so a lock left by
a killed process never blocks a later ``--resume``. The file carries the holder (pid, host, start
time) for the message only, and is removed when the lock is released.

Shared file systems: Linux implements ``flock`` on NFS (v3 with lockd, v4) as a POSIX lock that
every client sees, so two machines of a cluster or of a Ray sweep exclude each other there too.
Where the file system has no locks at all (some NFS mounts without lockd, Lustre without
``-o flock``: ``flock`` fails with ENOLCK / EOPNOTSUPP / ENOSYS) the lock falls back to creating
``RUN/.lock`` exclusively (``O_EXCL``); such a lock can outlive a killed holder, so it is taken
over when its holder is a process of this host that no longer exists, and otherwise the message
says which file to delete once no process uses the run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from robustdrop._files import write_error
from robustdrop.errors import FileWriteError, RobustdropError

try:
    import fcntl
except ImportError:  # not POSIX: only the O_EXCL fallback
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = ".lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """The exclusive write lock of the run directory ``run_dir`` (which must exist).

    Use as a context manager, or :meth:`acquire` / :meth:`release`. Not reentrant.

    Raises (on acquiring):
        RobustdropError: another process holds the lock (the line names its pid, host and start).
        FileWriteError: the lock file cannot be created (read-only or full file system, no permission).

    Examples:
        >>> with RunLock("runs/fgsm-quick"):
        ...     ...  # the only writer of runs/fgsm-quick until the block ends
    """

    def __init__(self, run_dir: str | os.PathLike, *, name: str = LOCK_NAME, wait: str | None = None):
        """``name``: the lock file in ``run_dir``; ``wait``: instead of refusing, print this line
        (with the holder) and wait for the holder to finish (where ``flock`` works)."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        self.wait = wait
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        if fcntl is None:  # not POSIX: exclusive creation only
            self._fd = self._create_exclusive()
            return self
        for _ in range(10):  # retried only when the file was replaced between open and lock
            fd, created = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                if self.wait is None:
                    os.close(fd)
                    raise RobustdropError(self._busy_message(holder)) from None
                print(f"{self.wait} ({_holder_text(holder)})", flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise FileWriteError(write_error(self.path, exc, what="lock")) from exc
                if created:  # no flock here, but this call created the file exclusively: that is the lock
                    _write_holder(fd)
                    self._fd = fd
                    return self
                os.close(fd)
                self._fd = self._create_exclusive()
                return self
            if _same_file(fd, self.path):  # the previous holder may have removed it meanwhile
                _write_holder(fd)
                self._fd = fd
                return self
            os.close(fd)
        raise RobustdropError(f"cannot lock {self.path}: it keeps being replaced; is another robustdrop process "
                              "starting on this run?")

    def release(self) -> None:
        """Remove the lock file and release the lock (the file goes first, while still held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    # -- internals -------------------------------------------------------------------------------
    def _open(self) -> tuple[int, bool]:
        """The lock file opened for flock, and whether this call created it."""
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
            except FileExistsError:
                return os.open(self.path, flags), False
        except FileNotFoundError as exc:
            if self.run_dir.is_dir():  # removed between the two opens by a releasing holder: try again
                return self._open()
            raise FileWriteError(write_error(self.path, exc, what="lock")) from exc
        except OSError as exc:
            raise FileWriteError(write_error(self.path, exc, what="lock")) from exc

    def _create_exclusive(self) -> int:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileExistsError:
                holder = _read_holder_file(self.path)
                if _is_dead_local(holder):  # a killed process of this host: take its lock over
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                    continue
                raise RobustdropError(self._busy_message(holder, stale_hint=True)) from None
            except OSError as exc:
                raise FileWriteError(write_error(self.path, exc, what="lock")) from exc
            _write_holder(fd)
            return fd
        raise RobustdropError(self._busy_message(_read_holder_file(self.path), stale_hint=True))

    def _busy_message(self, holder: dict, stale_hint: bool = False) -> str:
        text = (f"run directory {self.run_dir} is in use by another robustdrop process ({_holder_text(holder)}); "
                "wait for it to end "
                "or stop it first (its checkpoint is then resumable)")
        if stale_hint:
            text += f"; if no process uses this run any more, delete {self.path}"
        return text


def _holder_text(holder: dict) -> str:
    return ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "since") if holder.get(k)) or "unknown holder"


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _write_holder(fd: int) -> None:
    with contextlib.suppress(OSError):  # informative only
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)


def _read_holder(fd: int) -> dict:
    try:
        return _parse_holder(os.pread(fd, 4096, 0))
    except OSError:
        return {}


def _read_holder_file(path: Path) -> dict:
    try:
        return _parse_holder(path.read_bytes()[:4096])
    except OSError:
        return {}


def _parse_holder(data: bytes) -> dict:
    try:
        holder = json.loads(data.decode("utf-8", "replace") or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _is_dead_local(holder: dict) -> bool:
    """Whether ``holder`` is a process of this host that no longer exists."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False
