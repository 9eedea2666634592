"""``folder:PATH`` datasets: an image tree in a folder or a ``.tar``/``.tar.gz``/``.tgz`` of one."""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

from robustdrop.data.cache import _CACHE_FORMAT, _cached, _resolve_cache_dir
from robustdrop.data.image_data import ImageData
from robustdrop.data.trees import _IMAGE_SUFFIXES, _decode_tree, _read_tar, _tree_layout
from robustdrop.errors import RobustdropError


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


def write_image_folder(data: ImageData, path: str | os.PathLike) -> Path:
    """Write ``data`` as the ``train/<class>/NNNNN.png`` + ``test/<class>/NNNNN.png`` tree that
    ``folder:PATH`` reads back exactly (PNG is lossless; in class order). Makes a dataset that other processes can
    load by name, e.g. small synthetic data for the cells of a sweep. Returns ``path``."""
    from PIL import Image

    root = Path(path)
    for split, xs, ys in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / str(data.classes[int(y)])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = x.permute(1, 2, 0).numpy()
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(folder / f"{i:05d}.png")
    return root
