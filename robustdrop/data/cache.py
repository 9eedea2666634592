"""The decoded-dataset cache: one uint8 file per dataset, read without executing code.

Decoded images are cached once in the cache directory (``cache_dir``, else ``$ROBUSTDROP_CACHE``,
else ``~/.cache/robustdrop``); the cache is read with ``torch.load(weights_only=True)`` and written
atomically (:func:`robustdrop._files.atomic_write`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from robustdrop._files import atomic_write
from robustdrop.data.image_data import ImageData
from robustdrop.errors import RobustdropError, first_line

# Bump when the layout of the cache files changes: old files are then ignored.
_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$ROBUSTDROP_CACHE``, else ``~/.cache/robustdrop``."""
    env = os.environ.get("ROBUSTDROP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "robustdrop"


def _resolve_cache_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _cache_load(path: Path) -> ImageData | None:
    """The cached dataset at ``path``, or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != _CACHE_FORMAT:
            raise ValueError("unexpected cache layout")
        return ImageData(
            name=str(obj["name"]),
            train_x=obj["train_x"],
            train_y=obj["train_y"],
            test_x=obj["test_x"],
            test_y=obj["test_y"],
            classes=[str(c) for c in obj["classes"]],
        )
    except Exception as exc:  # a damaged cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable dataset cache {path} ({first_line(exc)}); decoding it again", stacklevel=3)
        return None


def _cache_save(path: Path, data: ImageData) -> None:
    """Write ``data`` to ``path`` atomically (:func:`~robustdrop._files.atomic_write`); warn on failure."""
    payload = {
        "format": _CACHE_FORMAT,
        "name": data.name,
        "classes": list(data.classes),
        "train_x": data.train_x.contiguous(),
        "train_y": data.train_y.contiguous(),
        "test_x": data.test_x.contiguous(),
        "test_y": data.test_y.contiguous(),
    }
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except RobustdropError as exc:
        warnings.warn(
            f"could not write dataset cache {path} ({first_line(exc.__cause__ or exc)}); the next load will decode again",
            stacklevel=3,
        )


def _cached(path: Path, build: Callable[[], ImageData]) -> ImageData:
    data = _cache_load(path)
    if data is None:
        data = build()
        _cache_save(path, data)
    return data

