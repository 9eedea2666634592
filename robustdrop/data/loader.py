"""Epoch batching on the device, evaluation batches, validation split and the probe subset.

:class:`TrainLoader` keeps the whole training set as uint8 on the device (pre-padded once when
augmenting), so a batch costs one row gather, one crop/flip gather and one conversion to float.
All randomness of an epoch (the permutation, then every example's crop and flip) is drawn from
the caller's CPU ``torch.Generator`` when :meth:`TrainLoader.epoch` is called, so the same
generator state always gives the same batches, on CPU and CUDA alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from robustdrop.data.augment import CropFlip, apply_crop_flip, pad_images, padding_mask, sample_crop_flip

__all__ = ["Batch", "TrainLoader", "iterate_eval", "probe_indices", "split_validation"]


@dataclass
class Batch:
    """One training batch."""

    x: torch.Tensor  # (B, C, H, W) float32 in [0, 1], augmented, on the device
    y: torch.Tensor  # (B,) int64 on the device
    index: torch.Tensor  # (B,) int64 on the device: rows of the training tensor
    crop: CropFlip | None  # the augmentation applied, on the device (None when augmentation is off)


def _to_float(x_uint8: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x_uint8.to(dtype=torch.float32, memory_format=fmt).div_(255.0)


def _check_images(images_uint8: torch.Tensor, labels: torch.Tensor) -> None:
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(
            f"images must be a uint8 (N, C, H, W) tensor, got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != images_uint8.shape[0]:
        raise ValueError(f"labels must be (N,) with N = {images_uint8.shape[0]}, got {tuple(labels.shape)}")


class TrainLoader:
    """Shuffled, augmented training batches from uint8 images held on ``device``.

    Args:
        images_uint8: ``(N, C, H, W)`` uint8 images (any device).
        labels: ``(N,)`` integer labels.
        batch_size: examples per batch.
        device: where the data and the batches live.
        augment: random crop (after padding by ``pad`` with ``pad_value``) + horizontal flip.
        pad: padding of the random crop; 0 means flips only.
        pad_value: padding colour in ``[0, 1]``. Stored as ``round(255 * pad_value)``; a value
            that uint8 cannot hold (the APART authors' 0.5) is written exactly into the float batch.
        drop_last: drop the last, smaller batch.
        channels_last: return ``x`` in ``torch.channels_last`` memory format.
    """

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        device: torch.device | str,
        augment: bool = True,
        pad: int = 4,
        pad_value: float = 0.0,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> None:
        _check_images(images_uint8, labels)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.augment = bool(augment)
        self.pad = int(pad) if augment else 0
        self.pad_value = float(pad_value)
        self.drop_last = bool(drop_last)
        self.channels_last = bool(channels_last)
        self.num_examples = int(images_uint8.shape[0])
        images = images_uint8.to(self.device)
        if self.augment and self.pad > 0:
            images = pad_images(images, self.pad, self.pad_value)
        self.images = images.contiguous()  # uint8, padded when augmenting
        stored = torch.tensor(round(self.pad_value * 255), dtype=torch.float32) / 255
        self._fill_pad = self.augment and self.pad > 0 and bool(stored != torch.tensor(self.pad_value))
        self.labels = labels.to(device=self.device, dtype=torch.int64)

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the batches (without padding)."""
        c, hp, wp = self.images.shape[1:]
        return (int(c), int(hp) - 2 * self.pad, int(wp) - 2 * self.pad)

    def epoch(self, generator: torch.Generator, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch, from batch ``start`` on (a run resumed in mid-epoch).

        Draws, at call time and from the CPU ``generator``: ``randperm(N)``, then (when augmenting)
        the crop/flip parameters of all N examples in permutation order (see
        :func:`~robustdrop.data.augment.sample_crop_flip`); the draw does not depend on ``start``.
        """
        if generator is None or generator.device.type != "cpu":
            raise ValueError("TrainLoader.epoch needs a CPU torch.Generator")
        perm = torch.randperm(self.num_examples, generator=generator)
        params = sample_crop_flip(self.num_examples, self.pad, generator, self.device) if self.augment else None
        return self._batches(perm.to(self.device), params, start)

    def _batches(self, perm: torch.Tensor, params: CropFlip | None, start: int = 0) -> Iterator[Batch]:
        for i in range(start, len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, self.num_examples))
            index = perm[sl]
            xb = self.images.index_select(0, index)
            crop = None
            if params is not None:
                crop = params[sl]
                xb = apply_crop_flip(xb, crop)
            x = _to_float(xb, self.channels_last)
            if self._fill_pad:
                h, w = x.shape[-2:]
                x.masked_fill_(padding_mask(crop, h, w)[:, None], self.pad_value)
            yield Batch(x=x, y=self.labels.index_select(0, index), index=index, crop=crop)


def iterate_eval(
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches in fixed order: ``x`` float32 in ``[0, 1]`` on ``device``, ``y`` int64."""
    _check_images(images_uint8, labels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images_uint8.shape[0]
    for start in range(0, n, batch_size):
        xb = images_uint8[start : start + batch_size].to(device, non_blocking=True)
        yb = labels[start : start + batch_size].to(device=device, dtype=torch.int64, non_blocking=True)
        yield _to_float(xb, channels_last), yb


def split_validation(num_examples: int, num_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, val_idx)``: a seeded random split of ``range(num_examples)``, each sorted."""
    if not 0 <= num_val <= num_examples:
        raise ValueError(f"num_val must be in [0, {num_examples}], got {num_val}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(num_examples, generator=g)
    val_idx = perm[:num_val].sort().values
    train_idx = perm[num_val:].sort().values
    return train_idx, val_idx


def train_indices(num_examples: int, num_val: int, seed: int, subset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, val_idx)`` of a run: :func:`split_validation`, then (``subset`` > 0) a seeded
    random ``subset`` of the training indices, sorted (the datasets are stored class by class)."""
    train_idx, val_idx = split_validation(num_examples, num_val, seed)
    if subset:
        pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(int(seed)))
        train_idx = train_idx[pick[:subset].sort().values]
    return train_idx, val_idx


def probe_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A fixed, seeded, class-balanced subset of ``n`` indices into ``labels`` (sorted).

    Every class gets ``n // K`` examples and the first ``n % K`` classes one more; a class with
    too few examples gives all it has and the rest comes from the other classes, round-robin.
    """
    labels = labels.detach().to("cpu", torch.int64).reshape(-1)
    total = labels.shape[0]
    if not 0 <= n <= total:
        raise ValueError(f"probe size must be in [0, {total}], got {n}")
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    if int(labels.min()) < 0:
        raise ValueError("labels must be >= 0")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(total, generator=g)
    lab = labels[perm]
    # Rank of each example among its class, in permutation order.
    sorted_lab, order = torch.sort(lab, stable=True)
    counts = torch.bincount(sorted_lab)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(total) - starts[sorted_lab]
    # Round-robin over classes: all rank-0 examples (by class), then rank 1, ...
    num_classes = int(counts.shape[0])
    key = rank * num_classes + lab
    chosen = perm[torch.argsort(key)[:n]]
    return chosen.sort().values
