"""Datasets as uint8 ``(N, C, H, W)`` tensors.

:func:`load_dataset` understands these specs:

* ``cifar10-jpeg`` (default): the full CIFAR-10 as JPEG, embedded in the package
  (see ``embedded/README.md``; report it as "CIFAR-10 (JPEG copy)").
* ``folder:PATH``: a ``train/<class>/*`` + ``test/<class>/*`` image tree, or a
  ``.tar``/``.tar.gz``/``.tgz`` of one (optionally inside one top-level folder).
* ``cifar10``, ``cifar100``, ``svhn``: the torchvision datasets, read from ``data_dir``.

Decoded images are cached once as a uint8 file in the cache directory (``cache_dir``, else
``$ROBUSTDROP_CACHE``, else ``~/.cache/robustdrop``); the cache is read with
``torch.load(weights_only=True)``, so loading it never executes code.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from robustdrop._files import atomic_write
from robustdrop.errors import RobustdropError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_SHA256",
    "DATASET_SPECS",
    "ImageData",
    "default_cache_dir",
    "embedded_archive_path",
    "load_dataset",
    "make_synthetic",
]

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
DATASET_SPECS = ("cifar10-jpeg", "cifar10", "cifar100", "svhn", "folder:PATH")

# Bump when the layout of the cache files changes: old files are then ignored.
_CACHE_FORMAT = 1
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff"}
_SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------------------
# The container
# ---------------------------------------------------------------------------------------------


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

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (
            f"ImageData(name={self.name!r}, train={self.train_x.shape[0]}, test={self.test_x.shape[0]}, "
            f"image_shape=({c}, {h}, {w}), classes={self.num_classes})"
        )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def load_dataset(spec: str = "cifar10-jpeg", data_dir: str | None = None, cache_dir: str | None = None) -> ImageData:
    """Load a dataset by spec (see the module docstring) as uint8 CPU tensors."""
    spec = spec.strip()
    key = spec.lower()
    if key == "cifar10-jpeg":
        return _load_cifar10_jpeg(cache_dir)
    if key.startswith("folder:"):
        path = spec[len("folder:") :].strip()
        if not path:
            raise RobustdropError(
                "dataset spec 'folder:' needs a path: use folder:PATH (a train/ + test/ image tree or a .tar.gz of one)"
            )
        return _load_folder(Path(path).expanduser(), cache_dir)
    if key in _TORCHVISION:
        return _load_torchvision(key, data_dir, cache_dir)
    raise RobustdropError(
        f"unknown dataset {spec!r}: use one of cifar10-jpeg (embedded), cifar10, cifar100, svhn, "
        "or folder:PATH (a train/<class>/ + test/<class>/ image tree or a .tar.gz of one)"
    )


def default_cache_dir() -> Path:
    """``$ROBUSTDROP_CACHE``, else ``~/.cache/robustdrop``."""
    env = os.environ.get("ROBUSTDROP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "robustdrop"


def embedded_archive_path() -> Path:
    """Path of the embedded CIFAR-10 JPEG archive."""
    return Path(__file__).resolve().parent / "embedded" / "cifar10-jpeg.tar.gz"


# ---------------------------------------------------------------------------------------------
# Synthetic data for tests
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def _resolve_cache_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _cache_load(path: Path) -> ImageData | None:
    """The cached dataset at ``path``, or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != _CACHE_FORMAT:
            raise ValueError("unexpected cache layout")
        return ImageData(
            name=str(obj["name"]),
            train_x=obj["train_x"],
            train_y=obj["train_y"],
            test_x=obj["test_x"],
            test_y=obj["test_y"],
            classes=[str(c) for c in obj["classes"]],
        )
    except Exception as exc:  # a damaged cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable dataset cache {path} ({exc}); decoding again", stacklevel=3)
        return None


def _cache_save(path: Path, data: ImageData) -> None:
    """Write ``data`` to ``path`` atomically (:func:`~robustdrop._files.atomic_write`); warn on failure."""
    payload = {
        "format": _CACHE_FORMAT,
        "name": data.name,
        "classes": list(data.classes),
        "train_x": data.train_x.contiguous(),
        "train_y": data.train_y.contiguous(),
        "test_x": data.test_x.contiguous(),
        "test_y": data.test_y.contiguous(),
    }
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except RobustdropError as exc:
        warnings.warn(
            f"could not write dataset cache {path} ({exc.__cause__ or exc}); the next load will decode again",
            stacklevel=3,
        )


def _cached(path: Path, build: Callable[[], ImageData]) -> ImageData:
    data = _cache_load(path)
    if data is None:
        data = build()
        _cache_save(path, data)
    return data


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Image decoding
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Image trees (directories and tar archives)
# ---------------------------------------------------------------------------------------------


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _tree_layout(paths: Sequence[str], where: str) -> dict[str, dict[str, list[str]]]:
    """Group relative POSIX paths into ``{split: {class: [path, ...]}}``.

    Accepts ``train/<class>/<file>`` and ``test/<class>/<file>``, optionally under one top-level
    folder; files are kept in natural name order, hidden files and non-images are skipped.
    """
    parts = [p.strip("/").split("/") for p in paths]
    parts = [p for p in parts if p and not any(s.startswith(".") or s == "__MACOSX" for s in p)]
    prefix = 0
    if not any(p[0] in _SPLITS for p in parts if len(p) > 1):
        tops = {p[0] for p in parts if len(p) > 1}
        if len(tops) == 1 and any(len(p) > 2 and p[1] in _SPLITS for p in parts):
            prefix = 1
    layout: dict[str, dict[str, list[str]]] = {s: {} for s in _SPLITS}
    for p in parts:
        rel = p[prefix:]
        if len(rel) != 3 or rel[0] not in _SPLITS or Path(rel[2]).suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        layout[rel[0]].setdefault(rel[1], []).append("/".join(p))
    for split in _SPLITS:
        if not layout[split]:
            raise RobustdropError(
                f"no {split}/<class>/<image> files found in {where}: a folder dataset needs "
                "train/<class>/*.png|jpg and test/<class>/*.png|jpg (optionally inside one top-level folder)"
            )
        for files in layout[split].values():
            files.sort(key=lambda s: _natural_key(s.rsplit("/", 1)[-1]))
    return layout


def _decode_tree(
    layout: dict[str, dict[str, list[str]]],
    read: Callable[[str], bytes] | dict[str, bytes],
    classes: list[str],
    where: str,
    rgb: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode both splits of a tree; labels are positions in ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    names_all: list[str] = []
    blobs_all: list[bytes] = []
    labels_all: list[int] = []
    counts = []
    for split in _SPLITS:
        unknown = sorted(set(layout[split]) - set(index))
        if unknown:
            raise RobustdropError(f"{where}: {split}/ has classes {unknown} that train/ does not have")
        n = 0
        for cls in classes:
            for name in layout[split].get(cls, []):
                blobs_all.append(read[name] if isinstance(read, dict) else read(name))
                names_all.append(name)
                labels_all.append(index[cls])
                n += 1
        counts.append(n)
    images = _decode_images(blobs_all, names_all, rgb)
    stacked = _stack_images(images, names_all, where)
    labels = torch.tensor(labels_all, dtype=torch.int64)
    n_train = counts[0]
    return stacked[:n_train], labels[:n_train], stacked[n_train:], labels[n_train:]


def _read_tar(path: Path) -> tuple[list[str], dict[str, bytes]]:
    """All regular files of a tar archive, read in one streaming pass (nothing is extracted)."""
    names: list[str] = []
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                name = member.name
                suffix = Path(name).suffix.lower()
                if suffix not in _IMAGE_SUFFIXES:
                    continue
                f = tf.extractfile(member)
                if f is None:
                    continue
                names.append(name)
                blobs[name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise RobustdropError(f"cannot read archive {path}: {exc}") from exc
    return names, blobs


def _load_cifar10_jpeg(cache_dir: str | None) -> ImageData:
    archive = embedded_archive_path()
    if not archive.is_file():
        raise RobustdropError(f"the embedded CIFAR-10 JPEG archive is missing ({archive}): reinstall robustdrop")
    digest = _sha256_file(archive)
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


def _strip_archive_suffix(name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _load_folder(path: Path, cache_dir: str | None) -> ImageData:
    if not path.exists():
        raise RobustdropError(
            f"folder dataset {path} does not exist: pass folder:PATH to a train/ + test/ image tree or a .tar.gz of one"
        )
    path = path.resolve()
    name = _strip_archive_suffix(path.name) or "folder"
    h = hashlib.sha256(f"folder-v{_CACHE_FORMAT}\0{path}\0".encode())
    if path.is_dir():
        files: list[str] = []
        for root, dirs, fnames in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for fname in sorted(fnames):
                full = Path(root) / fname
                rel = full.relative_to(path).as_posix()
                if fname.startswith(".") or full.suffix.lower() not in _IMAGE_SUFFIXES:
                    continue
                st = full.stat()
                files.append(rel)
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    elif tarfile.is_tarfile(path):
        st = path.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
        files = []
    else:
        raise RobustdropError(
            f"{path} is neither a folder nor a tar archive: pass folder:PATH to a train/ + test/ image tree or a .tar.gz of one"
        )
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40]
    cache = _resolve_cache_dir(cache_dir) / f"folder-{safe_name}-{h.hexdigest()[:16]}-v{_CACHE_FORMAT}.pt"

    def build() -> ImageData:
        if path.is_dir():
            layout = _tree_layout(files, str(path))

            def read(rel: str) -> bytes:
                return (path / rel).read_bytes()

            source: Callable[[str], bytes] | dict[str, bytes] = read
        else:
            names, blobs = _read_tar(path)
            layout = _tree_layout(names, str(path))
            source = blobs
        classes = sorted(layout["train"], key=str)
        train_x, train_y, test_x, test_y = _decode_tree(layout, source, classes, str(path), rgb=False)
        return ImageData(name, train_x, train_y, test_x, test_y, classes)

    return _cached(cache, build)


# ---------------------------------------------------------------------------------------------
# torchvision datasets
# ---------------------------------------------------------------------------------------------

# spec -> (display name, folder or files the user must provide)
_TORCHVISION = {
    "cifar10": ("CIFAR-10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR-100", "cifar-100-python"),
    "svhn": ("SVHN", "train_32x32.mat and test_32x32.mat"),
}


def _data_root(spec: str, data_dir: str | None, cache_dir: str | None) -> Path:
    if data_dir:
        root = Path(data_dir).expanduser()
    elif os.environ.get("ROBUSTDROP_DATA"):
        root = Path(os.environ["ROBUSTDROP_DATA"]).expanduser()
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
            try:
                ds = _torchvision_split(spec, root, train, download=True)
            except Exception as exc:
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
