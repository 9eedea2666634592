"""The torchvision datasets (``cifar10``, ``cifar100``, ``svhn``), read from ``data_dir``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from robustdrop.data.cache import _resolve_cache_dir
from robustdrop.data.image_data import ImageData
from robustdrop.errors import RobustdropError

# spec -> (display name, folder or files the user must provide)
_TORCHVISION = {
    "cifar10": ("CIFAR-10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR-100", "cifar-100-python"),
    "svhn": ("SVHN", "train_32x32.mat and test_32x32.mat"),
}


def _data_root(spec: str, data_dir: str | None, cache_dir: str | None) -> Path:
    if data_dir or os.environ.get("ROBUSTDROP_DATA"):
        root = Path(data_dir or os.environ["ROBUSTDROP_DATA"]).expanduser()
        if not root.is_dir():  # never created as a side effect of a failed start
            where = "--data-dir" if data_dir else "$ROBUSTDROP_DATA"
            raise RobustdropError(f"{where} {root} is not a folder: give the folder that holds "
                                  f"{_TORCHVISION[spec][1]}, or use --dataset cifar10-jpeg (embedded)")
    else:
        root = _resolve_cache_dir(cache_dir)
    # Accept a path to the dataset folder itself (".../cifar-10-batches-py").
    folder = _TORCHVISION[spec][1]
    if root.name == folder and spec != "svhn":
        root = root.parent
    return root


def _torchvision_split(spec: str, root: Path, train: bool, download: bool):
    from torchvision import datasets

    if spec == "cifar10":
        return datasets.CIFAR10(root=str(root), train=train, download=download)
    if spec == "cifar100":
        return datasets.CIFAR100(root=str(root), train=train, download=download)
    return datasets.SVHN(root=str(root), split="train" if train else "test", download=download)


def _load_torchvision(spec: str, data_dir: str | None, cache_dir: str | None) -> ImageData:
    import numpy as np

    label, folder = _TORCHVISION[spec]
    root = _data_root(spec, data_dir, cache_dir)
    splits = []
    for train in (True, False):
        try:
            ds = _torchvision_split(spec, root, train, download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            created = [p for p in (root, *root.parents) if not p.exists()]  # torchvision makes the root
            try:
                ds = _torchvision_split(spec, root, train, download=True)
            except Exception as exc:
                for folder in created:  # innermost first; only folders it left empty
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                raise RobustdropError(
                    f"{label} not found in {root} and could not be downloaded (no internet?): put {folder} there, "
                    "pass --data-dir DIR or set ROBUSTDROP_DATA, or use --dataset cifar10-jpeg (embedded)"
                ) from exc
        if spec == "svhn":
            x = torch.from_numpy(np.ascontiguousarray(ds.data))  # already (N, 3, 32, 32)
            y = torch.as_tensor(np.asarray(ds.labels), dtype=torch.int64)
            classes = [str(i) for i in range(10)]
        else:
            x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
            y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
            classes = list(ds.classes)
        splits.append((x.to(torch.uint8), y))
    (train_x, train_y), (test_x, test_y) = splits
    return ImageData(spec, train_x, train_y, test_x, test_y, classes)
