"""Shared fixtures.

* ``synthetic_data``: a small learnable :class:`~robustdrop.data.ImageData` (512 train / 256 test,
  10 classes, 3x32x32), deterministic.
* ``cifar10_jpeg``: the embedded CIFAR-10 JPEG copy, decoded once per test session into a
  session-private cache directory (``cifar10_jpeg_cache_dir``). Treat both as read-only.
* ``one_thread``: one torch thread for the test (tiny models are fastest so on a shared CPU).
* ``image_folder``: the path of a small ``train/<class>/*.png`` + ``test/<class>/*.png`` tree
  (320 train / 128 test synthetic 16x16 images, 4 classes) for ``--dataset folder:PATH``;
  ``folder_cache``: a ``$ROBUSTDROP_CACHE`` for it, so command-line tests never touch ``~/.cache``.
* ``robustdrop_env``: the environment for a ``python -m robustdrop`` subprocess that imports the
  robustdrop under test (not another installed copy).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import robustdrop
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


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory):
    from PIL import Image

    data = make_synthetic(n_train=320, n_test=128, num_classes=4, size=16, seed=1)
    root = tmp_path_factory.mktemp("image-folder")
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / data.classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


@pytest.fixture
def folder_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path_factory.getbasetemp() / "folder-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("ROBUSTDROP_CACHE", str(cache))
    return cache


@pytest.fixture
def robustdrop_env() -> dict[str, str]:
    root = str(Path(robustdrop.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def importable(tmp_path, monkeypatch):
    """``importable(name, source)``: module ``name`` importable from the current directory (the
    test's tmp_path), as a user's own package would be; forgotten again after the test."""
    names = []

    def make(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for name in names:
        sys.modules.pop(name, None)
