"""A user's images as robustdrop's data: ``(images uint8 (N, C, H, W), labels int64 (N,))``.

What the :class:`robustdrop.Monitor` (and ``robustdrop diagnose``) accept as a probe set: a
PyTorch ``Dataset`` of ``(image, label)`` items (tensors or PIL images), a ``DataLoader`` of
``(x, y)`` batches, ``(images, labels)`` tensors, or a robustdrop dataset name. Images are uint8,
or float in [0, 1]; float images are stored as uint8 rounded to 1/255, as every robustdrop probe is.
Images that are already normalized (values outside [0, 1]) are refused with what to pass instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from robustdrop.data.datasets import load_dataset
from robustdrop.data.loader import probe_indices
from robustdrop.errors import RobustdropError

__all__ = ["NORMALIZED_HINT", "as_uint8_images", "probe_from"]

NORMALIZED_HINT = ("they look normalized already; pass the images in [0, 1] (e.g. transforms.ToTensor() without "
                   "Normalize) and give normalize=(mean, std) (diagnose: --normalize)")


def as_uint8_images(images: torch.Tensor, what: str) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 from uint8, or from floats in [0, 1] (rounded to 1/255 as every
    robustdrop probe is stored); a one-line error for anything else."""
    if images.dim() == 3:  # (N, H, W): one channel
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise RobustdropError(f"{what}: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.is_floating_point():
        raise RobustdropError(f"{what}: images must be uint8 or float in [0, 1], got {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RobustdropError(f"{what}: images contain NaN or inf")
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise RobustdropError(f"{what}: image values span [{lo:.3g}, {hi:.3g}], outside [0, 1]: {NORMALIZED_HINT}")
    return (images.float() * 255).round_().clamp_(0, 255).to(torch.uint8)


def _as_labels(labels: Any, n: int, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1 or len(labels) != n:
        raise RobustdropError(f"{what}: labels must be {n} whole class numbers (N,), got {labels.dtype} "
                              f"{tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    if n and int(labels.min()) < 0:
        raise RobustdropError(f"{what}: labels must be >= 0")
    return labels


def _item_image(image: Any) -> torch.Tensor:
    """One dataset image as a tensor: a tensor as it is, a PIL image / array as (C, H, W)."""
    if isinstance(image, torch.Tensor):
        return image
    array = torch.as_tensor(np.asarray(image))
    return array.unsqueeze(0) if array.dim() == 2 else array.permute(2, 0, 1)


def _read_items(dataset: Any, index: Iterable[int]) -> tuple[torch.Tensor, list[int]]:
    images, labels = [], []
    for i in index:
        item = dataset[int(i)]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise RobustdropError("probe: a Dataset's items must be (image, label) pairs")
        images.append(_item_image(item[0]))
        labels.append(int(item[1]))
    return torch.stack(images) if images else torch.empty(0), labels


def probe_from(probe: Any, *, probe_size: int, seed: int, classes: Sequence[str] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """The probe set as ``(uint8 images (N, C, H, W), int64 labels (N,), class names, dataset name)``.

    ``probe``: a dataset name (``"cifar10-jpeg"``: its test split), ``(images, labels)`` tensors,
    a ``DataLoader`` of ``(x, y)`` batches or a ``Dataset`` of ``(image, label)`` items; images
    uint8, or float in [0, 1]. Of ``N > probe_size`` examples the seeded class-balanced subset
    that ``robustdrop track`` takes (:func:`~robustdrop.data.probe_indices`) is kept (``probe_size``
    0: all). Only the chosen items of a Dataset with ``targets`` are read.
    """
    name = "custom"
    what = "probe"
    if isinstance(probe, str):
        data = load_dataset(probe)
        images, labels, classes, name = data.test_x, data.test_y, classes or data.classes, probe
    elif isinstance(probe, (tuple, list)) and len(probe) == 2 and isinstance(probe[0], torch.Tensor):
        images, labels = probe
        labels = _as_labels(labels, len(images), what)
    elif isinstance(probe, torch.utils.data.DataLoader):
        xs, ys = [], []
        for batch in probe:
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise RobustdropError("probe: the DataLoader gave no batches")
        images, labels = torch.cat(xs), _as_labels(torch.cat(ys), sum(len(x) for x in xs), what)
        classes = classes or getattr(probe.dataset, "classes", None)
    elif hasattr(probe, "__getitem__") and hasattr(probe, "__len__"):
        classes = classes or getattr(probe, "classes", None)
        targets = getattr(probe, "targets", None)
        if targets is not None and len(targets) == len(probe):
            labels = _as_labels(targets, len(probe), what)
            keep = _subset(labels, probe_size, seed)
            images, picked = _read_items(probe, keep.tolist())
            return _finish(images, torch.tensor(picked, dtype=torch.int64), classes, name)
        images, picked = _read_items(probe, range(len(probe)))
        labels = torch.tensor(picked, dtype=torch.int64)
    else:
        raise RobustdropError(f"probe must be a Dataset, a DataLoader, (images, labels) tensors or a dataset name "
                              f"such as 'cifar10-jpeg', got {type(probe).__name__}")
    if len(labels) == 0:
        raise RobustdropError("probe is empty; give at least one labelled image")
    keep = _subset(labels, probe_size, seed)
    return _finish(images[keep], labels[keep], classes, name)


def _subset(labels: torch.Tensor, probe_size: int, seed: int) -> torch.Tensor:
    n = len(labels)
    if probe_size <= 0 or probe_size >= n:
        return torch.arange(n)
    return probe_indices(labels, probe_size, seed)


def _finish(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None, name: str
            ) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    images = as_uint8_images(images.detach().cpu(), "probe")
    labels = labels.detach().cpu().to(torch.int64)
    return images, labels, [str(c) for c in classes] if classes else [], name
