"""Atomic file writes (the one implementation the dataset cache and the run directory share) and
the one file checksum (:func:`sha256_file`: the embedded data archive, shipped and cached referees).

A file is written to a temporary file in the same folder and moved over the target with
``os.replace``, so a killed process never leaves a torn file and a failed write leaves the previous
file as it was. It lives below :mod:`robustdrop.data` and :mod:`robustdrop.store` so both can use it
(imports point one way, see ``docs/architecture.md``); it may import only :mod:`robustdrop.errors`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from robustdrop.errors import FileWriteError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "make_folders",
    "sha256_file",
    "write_error",
]

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace ``path`` with what ``write(f)`` writes to the binary file ``f``, atomically.

    The file gets the mode the user's umask gives ordinary files (``0o666 & ~umask``), like
    ``open(path, "w")`` would; missing parent folders are created.

    Raises:
        FileWriteError: the file could not be written (disk full, no permission, read-only
            folder, ...). The previous file at ``path``, if any, is unchanged and no temporary
            file is left behind.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise FileWriteError(write_error(path, exc)) from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Create or replace ``path`` with ``data`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Create or replace ``path`` with ``text`` (UTF-8) atomically (see :func:`atomic_write`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def make_folders(path: str | os.PathLike) -> list[Path]:
    """Create the folder ``path`` and its missing parents (modes from the umask, like ``mkdir -p``).

    Returns the folders this call created, outermost first, so that a start that fails later can
    remove exactly them. Raises :class:`FileWriteError` (one line: which folder, why, what to do).
    """
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileWriteError(write_error(path, exc, what="create folder")) from exc
    return missing


def _create_temp(path: Path) -> tuple[int, Path]:
    """Open a new hidden temporary file beside ``path``.

    Unlike ``tempfile.mkstemp`` (always mode 0o600) it asks for 0o666, so the kernel applies the
    umask (and any default ACL): colleagues on a shared machine can read the results.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _OPEN_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(path.parent))


def write_error(path: Path, exc: OSError, *, what: str = "write") -> str:
    """One line: which file, why, what to do (``what``: the operation, e.g. ``create folder``)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = f"free disk space (or quota) where {path.parent} lives and run again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = f"make {path.parent} writable for you, or choose another folder, and run again"
    else:
        todo = f"check that {path.parent} is a writable folder with free space and run again"
    if what != "write":
        return f"cannot {what} {path} ({reason}): {todo}"
    return f"cannot write {path} ({reason}): {todo}; the previous file there, if any, is unchanged"


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
