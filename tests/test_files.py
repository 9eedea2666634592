"""Atomic writes (robustdrop._files): readable by colleagues, never torn, a clear error on failure."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch
from PIL import Image

from robustdrop import _files
from robustdrop._files import atomic_write, atomic_write_bytes, atomic_write_text
from robustdrop.data import load_dataset
from robustdrop.errors import RobustdropError
from robustdrop.store import RunStore, metric_row


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    target = tmp_path / "new" / "file.txt"
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    assert mode(target) == 0o666 & ~mask
    atomic_write_text(target, "again")  # replacing keeps the umask mode too
    assert mode(target) == 0o666 & ~mask


def test_run_files_are_readable_by_the_group(tmp_path, umask):
    umask(0o022)
    store = RunStore.create(tmp_path, "r")
    store.write_json(RunStore.CONFIG, {"a": 1})
    store.log_metrics([metric_row(1, 1, "train", "loss", 1.0)])
    store.flush()
    store.save_checkpoint("last", {"w": torch.zeros(2)})
    for name in ("config.json", "metrics.csv", "metrics.parquet", "events.jsonl", "checkpoints/last.pt"):
        assert mode(store.path / name) == 0o644, name


def test_stream_writer_and_bytes(tmp_path):
    atomic_write(tmp_path / "t.pt", lambda f: torch.save({"x": torch.arange(3)}, f))
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["x"], torch.arange(3))
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def _fail(code: int):
    def boom(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return boom


@pytest.mark.parametrize(("code", "hint"), [(errno.ENOSPC, "free disk space"), (errno.EROFS, "writable"),
                                            (errno.EIO, "writable folder")])
def test_failed_replace_keeps_the_previous_file(tmp_path, monkeypatch, code, hint):
    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "old")
    monkeypatch.setattr(_files.os, "replace", _fail(code))
    with pytest.raises(RobustdropError, match=hint) as info:
        atomic_write_text(target, "new")
    message = str(info.value)
    assert str(target) in message and "\n" not in message and "unchanged" in message
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary file left


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "last.pt"
    atomic_write_bytes(target, b"previous")

    def write(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RobustdropError, match=r"cannot write .*last\.pt \(No space left on device\): free disk space"):
        atomic_write(target, write)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_non_os_errors_propagate_and_clean_up(tmp_path):
    def write(f):
        f.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f", write)
    assert list(tmp_path.iterdir()) == []


def test_run_store_flush_failure_is_a_user_error(tmp_path, monkeypatch):
    store = RunStore.create(tmp_path, "r")
    store.log_metrics([metric_row(1, 1, "train", "loss", 1.0)])
    monkeypatch.setattr(_files.os, "replace", _fail(errno.EACCES))
    with pytest.raises(RobustdropError, match="metrics.parquet"):
        store.flush()
    assert list(store.path.iterdir()) == []


def test_dataset_cache_write_failure_only_warns(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (4, 4), (40 * i, 80, 120)).save(folder / f"{i}.png")
    cache = tmp_path / "cache"
    monkeypatch.setattr(_files.os, "replace", _fail(errno.ENOSPC))
    with pytest.warns(UserWarning, match="could not write dataset cache .*No space left"):
        data = load_dataset(f"folder:{root}", cache_dir=str(cache))
    assert data.train_x.shape == (4, 3, 4, 4)
    assert list(cache.iterdir()) == []  # nothing torn or temporary left in the cache
