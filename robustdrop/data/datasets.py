"""Datasets as uint8 ``(N, C, H, W)`` tensors.

:func:`load_dataset` understands these specs:

* ``cifar10-jpeg`` (default): the full CIFAR-10 as JPEG, embedded in the package
  (see ``embedded/README.md``; report it as "CIFAR-10 (JPEG copy)").
* ``folder:PATH``: a ``train/<class>/*`` + ``test/<class>/*`` image tree, or a
  ``.tar``/``.tar.gz``/``.tgz`` of one (optionally inside one top-level folder).
* ``cifar10``, ``cifar100``, ``svhn``: the torchvision datasets, read from ``data_dir``.

Decoded images are cached once as a uint8 file in the cache directory (``cache_dir``, else
``$ROBUSTDROP_CACHE``, else ``~/.cache/robustdrop``); the cache is read with
``torch.load(weights_only=True)``, so loading it never executes code.
"""

from __future__ import annotations

from pathlib import Path

from robustdrop.data.cache import default_cache_dir
from robustdrop.data.cifar10_jpeg import (
    CIFAR10_CLASSES,
    CIFAR10_JPEG_SHA256,
    _load_cifar10_jpeg,
    embedded_archive_path,
)
from robustdrop.data.folder import _load_folder
from robustdrop.data.image_data import ImageData
from robustdrop.data.synthetic import make_synthetic
from robustdrop.data.torchvision_data import _TORCHVISION, _load_torchvision
from robustdrop.errors import RobustdropError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_SHA256",
    "DATASET_SPECS",
    "ImageData",
    "check_dataset_spec",
    "default_cache_dir",
    "embedded_archive_path",
    "load_dataset",
    "make_synthetic",
]

DATASET_SPECS = ("cifar10-jpeg", "cifar10", "cifar100", "svhn", "folder:PATH")


def check_dataset_spec(spec: str) -> None:
    """Raise :class:`RobustdropError` unless ``spec`` names a dataset :func:`load_dataset` knows
    (without reading any file: whether the files exist is checked when loading)."""
    key = spec.strip().lower()
    if key == "cifar10-jpeg" or key in _TORCHVISION:
        return
    if key.startswith("folder:"):
        if not spec.strip()[len("folder:") :].strip():
            raise RobustdropError(
                "dataset spec 'folder:' needs a path: use folder:PATH (a train/ + test/ image tree or a .tar.gz of one)"
            )
        return
    raise RobustdropError(
        f"unknown dataset {spec!r}: use one of cifar10-jpeg (embedded), cifar10, cifar100, svhn, "
        "or folder:PATH (a train/<class>/ + test/<class>/ image tree or a .tar.gz of one)"
    )


def load_dataset(spec: str = "cifar10-jpeg", data_dir: str | None = None, cache_dir: str | None = None) -> ImageData:
    """Load a dataset by spec (see the module docstring) as uint8 CPU tensors."""
    check_dataset_spec(spec)
    spec = spec.strip()
    key = spec.lower()
    if key == "cifar10-jpeg":
        return _load_cifar10_jpeg(cache_dir)
    if key.startswith("folder:"):
        return _load_folder(Path(spec[len("folder:") :].strip()).expanduser(), cache_dir)
    return _load_torchvision(key, data_dir, cache_dir)
