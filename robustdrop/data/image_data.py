"""The container: a labelled image dataset held as uint8 ``(N, C, H, W)`` CPU tensors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

_SPLITS = ("train", "test")


@dataclass(repr=False)
class ImageData:
    """A labelled image dataset held as uint8 CPU tensors."""

    name: str
    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, C, H, W) uint8
    test_y: torch.Tensor  # (M,) int64
    classes: list[str]

    def __post_init__(self) -> None:
        for split in _SPLITS:
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{split}_x must be a uint8 (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{split}_y must be an int64 (N,) tensor matching {split}_x, got {y.dtype} {tuple(y.shape)}"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"train and test images differ in shape: {tuple(self.train_x.shape[1:])} vs {tuple(self.test_x.shape[1:])}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    def fingerprint(self) -> str:
        """Hex SHA-256 of the content (classes, then train and test images and labels): the same
        for the same examples however they were loaded, so caches can key on it."""
        h = hashlib.sha256("\0".join(self.classes).encode())
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy())
        return h.hexdigest()

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (
            f"ImageData(name={self.name!r}, train={self.train_x.shape[0]}, test={self.test_x.shape[0]}, "
            f"image_shape=({c}, {h}, {w}), classes={self.num_classes})"
        )
