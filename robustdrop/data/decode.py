"""Image decoding: bytes to ``(C, H, W)`` uint8 tensors (batched libjpeg-turbo, PIL otherwise)."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from robustdrop.errors import RobustdropError


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _decode_jpegs_torchvision(blobs: Sequence[bytes], rgb: bool) -> list[torch.Tensor] | None:
    """Batch-decode JPEG bytes with libjpeg-turbo via torchvision; None if unavailable."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    mode = ImageReadMode.RGB if rgb else ImageReadMode.UNCHANGED
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision >= 0.29 marks its decoders deprecated
            out = decode_jpeg(tensors, mode=mode)
    except (RuntimeError, TypeError, ValueError):
        return None  # e.g. a file this build cannot decode: fall back to PIL, which names the culprit
    return list(out)


def _decode_pil(data: bytes, rgb: bool) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        gray = not rgb and im.mode in ("1", "L", "LA", "I", "I;16", "F")
        arr = np.asarray(im.convert("L" if gray else "RGB"))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _decode_images(blobs: Sequence[bytes], names: Sequence[str], rgb: bool) -> list[torch.Tensor]:
    """Decode image bytes into (C, H, W) uint8 tensors (C = 3, or 1 for grayscale when not ``rgb``).

    JPEGs go through torchvision's batched libjpeg-turbo decoder; anything else (or any JPEG it
    refuses) through PIL in a thread pool.
    """
    out: list[torch.Tensor | None] = [None] * len(blobs)
    jpeg_idx = [i for i, b in enumerate(blobs) if _is_jpeg(b)]
    if jpeg_idx:
        decoded = _decode_jpegs_torchvision([blobs[i] for i in jpeg_idx], rgb)
        if decoded is not None:
            for i, t in zip(jpeg_idx, decoded, strict=True):
                if t.shape[0] in (1, 3):  # CMYK etc. are left to PIL
                    out[i] = t
    rest = [i for i, t in enumerate(out) if t is None]

    def decode_one(i: int) -> torch.Tensor:
        try:
            return _decode_pil(blobs[i], rgb)
        except Exception as exc:
            raise RobustdropError(f"cannot decode image {names[i]}: {exc}") from exc

    if rest:
        workers = min(8, os.cpu_count() or 1, len(rest))
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for i, t in zip(rest, pool.map(decode_one, rest), strict=True):
                    out[i] = t
        else:
            for i in rest:
                out[i] = decode_one(i)
    return out  # type: ignore[return-value]


def _stack_images(images: list[torch.Tensor], names: Sequence[str], where: str) -> torch.Tensor:
    """Stack (C, H, W) uint8 images; grayscale is widened to RGB when the set is mixed."""
    if not images:
        raise RobustdropError(f"no images found in {where}")
    channels = {int(t.shape[0]) for t in images}
    if channels == {1, 3}:
        images = [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in images]
    ref_shape = tuple(images[0].shape[1:])
    for t, name in zip(images, names, strict=True):
        if tuple(t.shape[1:]) != ref_shape:
            h, w = t.shape[1:]
            raise RobustdropError(
                f"image {name} is {w}x{h} but {names[0]} is {ref_shape[1]}x{ref_shape[0]}: "
                f"all images in {where} must have one size (resize them first)"
            )
    return torch.stack(images)
