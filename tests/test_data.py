"""Tests for robustdrop.data: datasets, cache, crop/flip, loaders."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from robustdrop.data import (
    CIFAR10_CLASSES,
    CropFlip,
    ImageData,
    TrainLoader,
    apply_crop_flip,
    embedded_archive_path,
    invert_crop_flip,
    iterate_eval,
    load_dataset,
    make_synthetic,
    pad_images,
    probe_indices,
    sample_crop_flip,
    split_validation,
)
from robustdrop.errors import RobustdropError

# ---------------------------------------------------------------------------------------------
# cifar10-jpeg (embedded)
# ---------------------------------------------------------------------------------------------


def test_cifar10_jpeg_shapes_and_labels(cifar10_jpeg: ImageData):
    d = cifar10_jpeg
    assert d.name == "cifar10-jpeg"
    assert d.classes == CIFAR10_CLASSES and d.num_classes == 10
    assert d.image_shape == (3, 32, 32)
    assert d.train_x.shape == (50_000, 3, 32, 32) and d.test_x.shape == (10_000, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8 and d.test_x.dtype == torch.uint8
    assert d.train_y.dtype == torch.int64 and d.test_y.dtype == torch.int64
    assert torch.equal(torch.bincount(d.train_y, minlength=10), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(d.test_y, minlength=10), torch.full((10,), 1000))
    # class by class, in CIFAR-10 order
    assert torch.equal(d.test_y, torch.arange(10).repeat_interleave(1000))
    assert int(d.test_y[3000]) == CIFAR10_CLASSES.index("cat") == 3


def test_cifar10_jpeg_pixels_match_the_file(cifar10_jpeg: ImageData):
    with tarfile.open(embedded_archive_path(), "r:gz") as tf:
        for member in tf:  # test/ comes first in the archive: stop early
            if member.name == "cifar10-jpeg/test/cat/0000.jpg":
                data = tf.extractfile(member).read()
                break
    ref = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    # the first test cat; decoders (libjpeg-turbo in both) may differ by rounding at most
    diff = (cifar10_jpeg.test_x[3000].int() - ref.int()).abs()
    assert int(diff.max()) <= 2


def test_cifar10_jpeg_second_load_hits_cache(cifar10_jpeg: ImageData, cifar10_jpeg_cache_dir):
    files = list(cifar10_jpeg_cache_dir.glob("cifar10-jpeg-*.pt"))
    assert len(files) == 1 and files[0].stat().st_size > 50_000 * 3 * 32 * 32
    assert not list(cifar10_jpeg_cache_dir.glob("*.tmp"))
    again = load_dataset("cifar10-jpeg", cache_dir=str(cifar10_jpeg_cache_dir))
    assert torch.equal(again.train_x, cifar10_jpeg.train_x) and torch.equal(again.test_y, cifar10_jpeg.test_y)
    assert again.classes == cifar10_jpeg.classes


# ---------------------------------------------------------------------------------------------
# folder:PATH
# ---------------------------------------------------------------------------------------------

_COUNTS = {"train": {"zebra": 3, "ant": 2}, "test": {"zebra": 1, "ant": 2}}


def _write_tree(root, size=(6, 5), odd_one=None):
    """A train/ + test/ PNG tree; pixel (0,0) red channel encodes (split, class, i)."""
    expected = {}
    for split, classes in _COUNTS.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                value = 10 * (split == "test") + 100 * (cls == "zebra") + i
                w, h = odd_one if odd_one and (split, cls, i) == ("test", "ant", 1) else size
                img = np.full((h, w, 3), 50, dtype=np.uint8)
                img[0, 0, 0] = value
                Image.fromarray(img).save(root / split / cls / f"img{i}.png")
                expected[(split, cls, i)] = value
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return expected


def _check_tree(d: ImageData):
    assert d.classes == ["ant", "zebra"]  # sorted by name
    assert d.image_shape == (3, 5, 6)
    assert d.train_x.shape[0] == 5 and d.test_x.shape[0] == 3
    assert d.train_y.tolist() == [0, 0, 1, 1, 1] and d.test_y.tolist() == [0, 0, 1]
    assert d.train_x[:, 0, 0, 0].tolist() == [0, 1, 100, 101, 102]  # file order within class
    assert d.test_x[:, 0, 0, 0].tolist() == [10, 11, 110]
    assert int(d.train_x[0, 1, 2, 3]) == 50


def test_folder_directory(tmp_path):
    _write_tree(tmp_path / "mydata")
    cache = tmp_path / "cache"
    d = load_dataset(f"folder:{tmp_path / 'mydata'}", cache_dir=str(cache))
    assert d.name == "mydata"
    _check_tree(d)
    assert len(list(cache.glob("folder-*.pt"))) == 1
    _check_tree(load_dataset(f"folder:{tmp_path / 'mydata'}", cache_dir=str(cache)))  # from the cache


def test_folder_tar_gz_with_top_level_folder(tmp_path):
    _write_tree(tmp_path / "src" / "mydata")
    archive = tmp_path / "mydata.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "mydata", arcname="mydata")
    d = load_dataset(f"folder:{archive}", cache_dir=str(tmp_path / "cache"))
    assert d.name == "mydata"
    _check_tree(d)


def test_folder_tar_without_top_level_folder(tmp_path):
    _write_tree(tmp_path / "src")
    archive = tmp_path / "flat.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(tmp_path / "src" / "train", arcname="train")
        tf.add(tmp_path / "src" / "test", arcname="test")
    _check_tree(load_dataset(f"folder:{archive}", cache_dir=str(tmp_path / "cache")))


def test_folder_mismatched_sizes_is_an_error(tmp_path):
    _write_tree(tmp_path / "bad", odd_one=(7, 5))
    with pytest.raises(RobustdropError, match="one size"):
        load_dataset(f"folder:{tmp_path / 'bad'}", cache_dir=str(tmp_path / "cache"))


def test_folder_missing_or_empty_is_an_error(tmp_path):
    with pytest.raises(RobustdropError):
        load_dataset(f"folder:{tmp_path / 'nope'}", cache_dir=str(tmp_path / "cache"))
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(RobustdropError, match="train/<class>"):
        load_dataset(f"folder:{tmp_path / 'empty'}", cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------
# torchvision specs and bad specs
# ---------------------------------------------------------------------------------------------


def test_cifar10_missing_names_the_options(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(self):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    monkeypatch.delenv("ROBUSTDROP_DATA", raising=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RobustdropError) as info:
        load_dataset("cifar10", data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
    msg = str(info.value)
    assert "\n" not in msg
    assert "--data-dir" in msg and "ROBUSTDROP_DATA" in msg and "cifar10-jpeg" in msg and "cifar-10-batches-py" in msg


def test_cifar10_reads_batches_folder(tmp_path, monkeypatch):
    """A tiny fake cifar-10-batches-py (checksums patched out) is read as uint8 NCHW."""
    import pickle

    import torchvision.datasets

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    raw = {}
    for name, _ in torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        raw[name] = data
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0, 1, 2, 9]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES}, f)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(
        torchvision.datasets.CIFAR10, "_load_meta", lambda self: setattr(self, "classes", CIFAR10_CLASSES)
    )
    d = load_dataset("cifar10", data_dir=str(folder))  # the batches folder itself is accepted too
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8 and d.train_y.tolist()[:4] == [0, 1, 2, 9]
    assert torch.equal(d.test_x.reshape(4, -1), torch.from_numpy(raw["test_batch"]))


def test_unknown_spec_lists_valid_ones():
    with pytest.raises(RobustdropError, match="cifar10-jpeg.*folder:PATH"):
        load_dataset("imagenet")


# ---------------------------------------------------------------------------------------------
# make_synthetic
# ---------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_learnable(synthetic_data: ImageData):
    again = make_synthetic(seed=0)
    assert torch.equal(again.train_x, synthetic_data.train_x) and torch.equal(again.test_y, synthetic_data.test_y)
    assert not torch.equal(make_synthetic(seed=1).train_x, synthetic_data.train_x)
    d = synthetic_data
    assert d.train_x.shape == (512, 3, 32, 32) and d.test_x.shape == (256, 3, 32, 32) and d.num_classes == 10

    # nearest class mean (after removing each image's mean brightness) separates the classes
    def feats(x):
        f = x.float().flatten(1) / 255
        return f - f.mean(1, keepdim=True)

    means = torch.stack([feats(d.train_x[d.train_y == c]).mean(0) for c in range(10)])
    pred = torch.cdist(feats(d.test_x), means).argmin(1)
    assert (pred == d.test_y).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------
# crop / flip
# ---------------------------------------------------------------------------------------------


def _reference_crop_flip(xp, params):
    pad = params.pad
    h, w = xp.shape[2] - 2 * pad, xp.shape[3] - 2 * pad
    out = []
    for i in range(xp.shape[0]):
        t, left = int(params.top[i]), int(params.left[i])
        win = xp[i, :, t : t + h, left : left + w]
        out.append(win.flip(-1) if bool(params.flip[i]) else win)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_crop_flip_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(16, 3, 8, 10, generator=g) * 255).to(dtype)
    xp = pad_images(x, 3, value=0.5)
    assert xp.shape == (16, 3, 14, 16)
    fill = 128 if dtype == torch.uint8 else 0.5
    assert bool((xp[:, :, :3] == fill).all()) and torch.equal(xp[:, :, 3:11, 3:13], x)
    params = sample_crop_flip(16, 3, g, "cpu")
    assert int(params.top.min()) >= 0 and int(params.top.max()) <= 6 and params.flip.dtype == torch.bool
    out = apply_crop_flip(xp, params)
    assert out.dtype == dtype and out.shape == (16, 3, 8, 10) and out.is_contiguous()
    assert torch.equal(out, _reference_crop_flip(xp, params))


def test_invert_crop_flip_round_trips():
    g = torch.Generator().manual_seed(1)
    pad = 4
    params = sample_crop_flip(12, pad, g, "cpu")
    target = torch.randn(12, 3, 40, 40, generator=g)
    before = target.clone()
    x = torch.randn(12, 3, 32, 32, generator=g)
    invert_crop_flip(target, x, params)
    assert torch.equal(apply_crop_flip(target, params), x)
    # outside each window nothing changed
    mask = torch.ones_like(target, dtype=torch.bool)
    for i in range(12):
        t, left = int(params.top[i]), int(params.left[i])
        mask[i, :, t : t + 32, left : left + 32] = False
    assert torch.equal(target[mask], before[mask])
    # the window holds x un-flipped
    i = int(params.flip.nonzero()[0])
    t, left = int(params.top[i]), int(params.left[i])
    assert torch.equal(target[i, :, t : t + 32, left : left + 32], x[i].flip(-1))
    # non-contiguous targets are written in place too
    nc = torch.zeros(40, 40, 3, 12).permute(3, 2, 0, 1)
    invert_crop_flip(nc, x, params)
    assert torch.equal(apply_crop_flip(nc, params), x)


def test_crop_flip_identity_and_determinism():
    x = torch.rand(5, 3, 6, 6)
    params = sample_crop_flip(5, 0, torch.Generator().manual_seed(0), "cpu", flip=False)
    assert torch.equal(apply_crop_flip(pad_images(x, 0), params), x)
    a = sample_crop_flip(64, 4, torch.Generator().manual_seed(7), "cpu")
    b = sample_crop_flip(64, 4, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(a.top, b.top) and torch.equal(a.left, b.left) and torch.equal(a.flip, b.flip)
    assert a.flip.any() and not a.flip.all() and a.top.unique().numel() == 9
    sub = a[2:5]
    assert isinstance(sub, CropFlip) and len(sub) == 3 and sub.pad == 4


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------


def test_train_loader_covers_epoch_and_is_deterministic(synthetic_data: ImageData):
    d = synthetic_data
    loader = TrainLoader(d.train_x, d.train_y, 100, device="cpu", pad=4)
    assert len(loader) == 6
    batches = list(loader.epoch(torch.Generator().manual_seed(3)))
    assert [b.x.shape[0] for b in batches] == [100] * 5 + [12]
    seen = torch.cat([b.index for b in batches])
    assert torch.equal(seen.sort().values, torch.arange(512))
    b0 = batches[0]
    assert b0.x.dtype == torch.float32 and b0.x.shape == (100, 3, 32, 32)
    assert float(b0.x.min()) >= 0 and float(b0.x.max()) <= 1
    assert torch.equal(b0.y, d.train_y[b0.index])
    expected = apply_crop_flip(pad_images(d.train_x[b0.index], 4), b0.crop).float() / 255
    assert torch.equal(b0.x, expected)
    again = list(loader.epoch(torch.Generator().manual_seed(3)))
    assert all(torch.equal(a.x, b.x) and torch.equal(a.index, b.index) for a, b in zip(batches, again, strict=True))
    other = next(iter(loader.epoch(torch.Generator().manual_seed(4))))
    assert not torch.equal(other.index, b0.index)
    assert len(TrainLoader(d.train_x, d.train_y, 100, device="cpu", drop_last=True)) == 5


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_loader_pad_value_is_exact(synthetic_data: ImageData, channels_last):
    """The APART authors pad with 0.5, which uint8 cannot hold (128/255 = 0.50196): the float
    batch gets exactly 0.5 on padding pixels and the image pixels unchanged."""
    d = synthetic_data
    loader = TrainLoader(d.train_x, d.train_y, 64, device="cpu", pad=4, pad_value=0.5, channels_last=channels_last)
    b = next(iter(loader.epoch(torch.Generator().manual_seed(5))))
    ones = torch.ones(len(b.index), 1, 32, 32, dtype=torch.uint8)
    from_pad = apply_crop_flip(pad_images(ones * 0, 4, 1.0), b.crop)[:, 0].bool()  # 1 where padding
    assert from_pad.any() and not from_pad.all()
    images = apply_crop_flip(pad_images(d.train_x[b.index], 4), b.crop).float() / 255
    assert (b.x.permute(1, 0, 2, 3)[:, from_pad] == 0.5).all()
    assert torch.equal(b.x.permute(1, 0, 2, 3)[:, ~from_pad], images.permute(1, 0, 2, 3)[:, ~from_pad])
    # A representable value (0) takes the plain uint8 path.
    plain = TrainLoader(d.train_x, d.train_y, 64, device="cpu", pad=4, pad_value=0.0)
    assert not plain._fill_pad and loader._fill_pad


def test_train_loader_no_augment_and_channels_last(synthetic_data: ImageData):
    d = synthetic_data
    loader = TrainLoader(d.train_x, d.train_y, 64, device="cpu", augment=False, channels_last=True)
    b = next(iter(loader.epoch(torch.Generator().manual_seed(0))))
    assert b.crop is None
    assert b.x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(b.x, d.train_x[b.index].float() / 255)


def test_iterate_eval_fixed_order(synthetic_data: ImageData):
    d = synthetic_data
    batches = list(iterate_eval(d.test_x, d.test_y, 100, "cpu"))
    assert [x.shape[0] for x, _ in batches] == [100, 100, 56]
    assert torch.equal(torch.cat([x for x, _ in batches]), d.test_x.float() / 255)
    assert torch.equal(torch.cat([y for _, y in batches]), d.test_y)


def test_split_validation():
    tr, va = split_validation(1000, 100, seed=5)
    assert tr.numel() == 900 and va.numel() == 100
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(1000))
    tr2, va2 = split_validation(1000, 100, seed=5)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, split_validation(1000, 100, seed=6)[1])
    assert split_validation(10, 0, seed=0)[1].numel() == 0


def test_probe_indices_class_balanced():
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 50, 50, 50, 50, 50, 50, 50, 50, 3]))
    idx = probe_indices(labels, 100, seed=0)
    assert idx.numel() == 100 and idx.unique().numel() == 100
    counts = torch.bincount(labels[idx], minlength=10)
    # class 9 gives all it has; the rest is spread round-robin, lowest labels first
    assert counts.tolist() == [11] * 7 + [10] * 2 + [3]
    balanced = torch.arange(10).repeat(30)
    assert torch.equal(torch.bincount(balanced[probe_indices(balanced, 50, seed=1)]), torch.full((10,), 5))
    assert torch.equal(probe_indices(labels, 100, seed=0), idx)
    assert not torch.equal(probe_indices(labels, 100, seed=1), idx)
