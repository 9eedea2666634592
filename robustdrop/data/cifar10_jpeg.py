"""The embedded CIFAR-10 JPEG copy (``cifar10-jpeg``; see ``embedded/README.md``)."""

from __future__ import annotations

from pathlib import Path

from robustdrop._files import sha256_file
from robustdrop.data.cache import _CACHE_FORMAT, _cached, _resolve_cache_dir
from robustdrop.data.image_data import _SPLITS, ImageData
from robustdrop.data.trees import _decode_tree, _read_tar, _tree_layout
from robustdrop.errors import RobustdropError

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR10_JPEG_SHA256 = "a776ebc8fcd785d2b5314c0474afa014bbe9aac30c523a7cfb8cfedcc711cde7"


def embedded_archive_path() -> Path:
    """Path of the embedded CIFAR-10 JPEG archive."""
    return Path(__file__).resolve().parent / "embedded" / "cifar10-jpeg.tar.gz"


def _load_cifar10_jpeg(cache_dir: str | None) -> ImageData:
    archive = embedded_archive_path()
    if not archive.is_file():
        raise RobustdropError(f"the embedded CIFAR-10 JPEG archive is missing ({archive}): reinstall robustdrop")
    digest = sha256_file(archive)
    if digest != CIFAR10_JPEG_SHA256:
        raise RobustdropError(
            f"the embedded CIFAR-10 JPEG archive {archive} is damaged (sha256 {digest[:12]}..., "
            f"expected {CIFAR10_JPEG_SHA256[:12]}...): reinstall robustdrop"
        )
    cache = _resolve_cache_dir(cache_dir) / f"cifar10-jpeg-{digest[:16]}-v{_CACHE_FORMAT}.pt"

    def build() -> ImageData:
        names, blobs = _read_tar(archive)
        layout = _tree_layout(names, str(archive))
        for split in _SPLITS:
            if sorted(layout[split]) != sorted(CIFAR10_CLASSES):
                raise RobustdropError(f"{archive}: unexpected class folders in {split}/: reinstall robustdrop")
        train_x, train_y, test_x, test_y = _decode_tree(layout, blobs, CIFAR10_CLASSES, str(archive), rgb=True)
        return ImageData("cifar10-jpeg", train_x, train_y, test_x, test_y, list(CIFAR10_CLASSES))

    return _cached(cache, build)
