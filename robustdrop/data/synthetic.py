"""Synthetic data for tests: a small, learnable, deterministic image dataset."""

from __future__ import annotations

import torch

from robustdrop.data.image_data import ImageData


def make_synthetic(
    n_train: int = 512,
    n_test: int = 256,
    num_classes: int = 10,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> ImageData:
    """A small, learnable, deterministic image dataset.

    Each class has a smooth random colour template (a 4x4 field upsampled to ``size``); an image
    is its class template with a random contrast and brightness plus pixel noise. A linear model
    or a small CNN separates the classes easily, but not from a single pixel.
    """
    if num_classes < 1 or n_train < 0 or n_test < 0 or size < 1 or channels < 1:
        raise ValueError("make_synthetic needs num_classes, size, channels >= 1 and n_train, n_test >= 0")
    g = torch.Generator().manual_seed(int(seed))
    low = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    templates = (templates - 0.5) * 0.8  # zero-centred, in [-0.4, 0.4]

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n, dtype=torch.int64) % num_classes
        y = y[torch.randperm(n, generator=g)]
        contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
        brightness = 0.5 + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
        noise = 0.08 * torch.randn(n, channels, size, size, generator=g)
        x = brightness + contrast * templates[y] + noise
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    return ImageData(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=[f"class{i}" for i in range(num_classes)],
    )
