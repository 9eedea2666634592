"""Shared fixtures.

* ``synthetic_data``: a small learnable :class:`~robustdrop.data.ImageData` (512 train / 256 test,
  10 classes, 3x32x32), deterministic.
* ``cifar10_jpeg``: the embedded CIFAR-10 JPEG copy, decoded once per test session into a
  session-private cache directory (``cifar10_jpeg_cache_dir``). Treat both as read-only.
"""

from __future__ import annotations

import pytest

from robustdrop.data import ImageData, load_dataset, make_synthetic


@pytest.fixture(scope="session")
def synthetic_data() -> ImageData:
    return make_synthetic(n_train=512, n_test=256, num_classes=10, size=32, channels=3, seed=0)


@pytest.fixture(scope="session")
def cifar10_jpeg_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("robustdrop-cache")


@pytest.fixture(scope="session")
def cifar10_jpeg(cifar10_jpeg_cache_dir) -> ImageData:
    return load_dataset("cifar10-jpeg", cache_dir=str(cifar10_jpeg_cache_dir))
