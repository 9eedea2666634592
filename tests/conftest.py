"""Shared fixtures.

* ``synthetic_data``: a small learnable :class:`~robustdrop.data.ImageData` (512 train / 256 test,
  10 classes, 3x32x32), deterministic.
* ``cifar10_jpeg``: the embedded CIFAR-10 JPEG copy, decoded once per test session into a
  session-private cache directory (``cifar10_jpeg_cache_dir``). Treat both as read-only.
* ``one_thread``: one torch thread for the test (tiny models are fastest so on a shared CPU).
"""

from __future__ import annotations

import pytest
import torch

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


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
