"""Image trees: the ``train/<class>/*`` + ``test/<class>/*`` layout, in a folder or a tar archive."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from robustdrop.data.decode import _decode_images, _stack_images
from robustdrop.data.image_data import _SPLITS
from robustdrop.errors import RobustdropError

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff"}


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
