"""Batched random crop + horizontal flip on the device, and its exact inverse.

The standard CIFAR augmentation (pad by ``pad``, take a random ``H x W`` window, flip it
horizontally with probability 1/2) is done for a whole batch with a single ``torch.gather``:
no per-example Python loop. :func:`invert_crop_flip` scatters a batch back into its windows
of a padded-frame tensor (APART keeps a per-example perturbation in that frame).

Random numbers are always drawn on the CPU (from the given ``torch.Generator``, else the global
CPU generator) and then moved to the device, so a seed gives the same augmentation on CPU and
CUDA, and the generator's state can be checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CropFlip", "apply_crop_flip", "invert_crop_flip", "pad_images", "padding_mask", "sample_crop_flip"]


@dataclass
class CropFlip:
    """Per-example augmentation parameters in the padded frame."""

    top: torch.Tensor  # (B,) int64 in [0, 2*pad]: first row of the window
    left: torch.Tensor  # (B,) int64 in [0, 2*pad]: first column of the window
    flip: torch.Tensor  # (B,) bool: mirror the window left-right
    pad: int

    def __len__(self) -> int:
        return int(self.top.shape[0])

    def to(self, device: torch.device | str) -> CropFlip:
        return CropFlip(self.top.to(device), self.left.to(device), self.flip.to(device), self.pad)

    def __getitem__(self, item) -> CropFlip:
        """The parameters of a subset of the examples (slice, index tensor or mask)."""
        return CropFlip(self.top[item], self.left[item], self.flip[item], self.pad)


def sample_crop_flip(
    batch_size: int,
    pad: int,
    generator: torch.Generator | None,
    device: torch.device | str | None = "cpu",
    flip: bool = True,
) -> CropFlip:
    """Draw crop offsets (uniform in ``[0, 2*pad]``) and flips (probability 1/2).

    Drawn on the CPU from ``generator`` (the global CPU generator when None) in the order
    top, left, flip, then moved to ``device``. With ``flip=False`` no flip numbers are drawn.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("sample_crop_flip needs a CPU torch.Generator (numbers are drawn on the CPU)")
    n = int(batch_size)
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator, dtype=torch.int64)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator, dtype=torch.int64)
    if flip:
        flips = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).bool()
    else:
        flips = torch.zeros(n, dtype=torch.bool)
    params = CropFlip(top, left, flips, int(pad))
    if device is not None and torch.device(device).type != "cpu":
        params = params.to(device)
    return params


def pad_images(x: torch.Tensor, pad: int, value: float = 0.0) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` by ``pad`` pixels on every side with a constant.

    ``value`` is in image units ``[0, 1]``; for uint8 images it is scaled by 255 and rounded.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if x.dim() != 4:
        raise ValueError(f"pad_images expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    fill = round(float(value) * 255) if x.dtype == torch.uint8 else float(value)
    out = torch.full((b, c, h + 2 * pad, w + 2 * pad), fill, dtype=x.dtype, device=x.device)
    out[:, :, pad : pad + h, pad : pad + w] = x
    return out


def _window_index(params: CropFlip, hp: int, wp: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Flat indices ``(B, H*W)`` into a padded ``hp x wp`` plane of each example's output pixels."""
    h, w = hp - 2 * params.pad, wp - 2 * params.pad
    if h <= 0 or w <= 0:
        raise ValueError(f"padded frame {hp}x{wp} is too small for pad={params.pad}")
    top = params.top.to(device)
    left = params.left.to(device)
    flip = params.flip.to(device)
    rows = top[:, None] + torch.arange(h, device=device)  # (B, H)
    j = torch.arange(w, device=device)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - j, j)  # (B, W)
    index = rows[:, :, None] * wp + cols[:, None, :]  # (B, H, W)
    return index.reshape(index.shape[0], h * w), h, w


def padding_mask(params: CropFlip, h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(B, H, W)`` bool: which output pixels of :func:`apply_crop_flip` come from the padding.

    Lets a loader that stores uint8 images write a padding colour that uint8 cannot hold (0.5)
    exactly into the float batch.
    """
    device = params.top.device if device is None else torch.device(device)
    p = params.pad
    rows = params.top.to(device)[:, None] + torch.arange(h, device=device)  # (B, H), padded frame
    j = torch.arange(w, device=device)
    cols = params.left.to(device)[:, None] + torch.where(params.flip.to(device)[:, None], w - 1 - j, j)  # (B, W)
    row_pad = (rows < p) | (rows >= p + h)
    col_pad = (cols < p) | (cols >= p + w)
    return row_pad[:, :, None] | col_pad[:, None, :]


def apply_crop_flip(x_padded: torch.Tensor, params: CropFlip) -> torch.Tensor:
    """Crop each example's window (and mirror it where ``flip``): ``(B,C,H+2p,W+2p) -> (B,C,H,W)``.

    One ``torch.gather``; works for any dtype (uint8 included) and returns a contiguous tensor.
    """
    b, c, hp, wp = x_padded.shape
    if len(params) != b:
        raise ValueError(f"{len(params)} crop parameters for a batch of {b}")
    index, h, w = _window_index(params, hp, wp, x_padded.device)
    flat = x_padded.reshape(b, c, hp * wp)
    out = torch.gather(flat, 2, index[:, None, :].expand(b, c, h * w))
    return out.view(b, c, h, w)


def invert_crop_flip(target_padded: torch.Tensor, x: torch.Tensor, params: CropFlip) -> None:
    """Write ``x`` (an output of :func:`apply_crop_flip`) back, un-flipped, into its window of
    ``target_padded`` in place; pixels outside each window are left untouched.

    ``x`` is cast to ``target_padded``'s dtype. ``apply_crop_flip(target_padded, params)``
    returns ``x`` afterwards.
    """
    b, c, hp, wp = target_padded.shape
    if len(params) != b:
        raise ValueError(f"{len(params)} crop parameters for a batch of {b}")
    index, h, w = _window_index(params, hp, wp, target_padded.device)
    if tuple(x.shape) != (b, c, h, w):
        raise ValueError(f"x has shape {tuple(x.shape)}, expected {(b, c, h, w)} for pad={params.pad}")
    src = x.to(device=target_padded.device, dtype=target_padded.dtype).reshape(b, c, h * w)
    full_index = index[:, None, :].expand(b, c, h * w)
    if target_padded.is_contiguous():
        target_padded.view(b, c, hp * wp).scatter_(2, full_index, src)
    else:
        tmp = target_padded.contiguous().view(b, c, hp * wp)
        tmp.scatter_(2, full_index, src)
        target_padded.copy_(tmp.view(b, c, hp, wp))
