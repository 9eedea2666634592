"""Datasets as uint8 tensors, batched crop/flip on the device, epoch batching.

May import only :mod:`robustdrop.errors` and :mod:`robustdrop._files` (see ``docs/architecture.md``).
"""

from robustdrop.data.augment import (
    CropFlip,
    apply_crop_flip,
    invert_crop_flip,
    pad_images,
    padding_mask,
    sample_crop_flip,
)
from robustdrop.data.datasets import (
    CIFAR10_CLASSES,
    CIFAR10_JPEG_SHA256,
    DATASET_SPECS,
    ImageData,
    default_cache_dir,
    embedded_archive_path,
    load_dataset,
    make_synthetic,
)
from robustdrop.data.loader import Batch, TrainLoader, iterate_eval, probe_indices, split_validation

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_SHA256",
    "DATASET_SPECS",
    "Batch",
    "CropFlip",
    "ImageData",
    "TrainLoader",
    "apply_crop_flip",
    "default_cache_dir",
    "embedded_archive_path",
    "invert_crop_flip",
    "iterate_eval",
    "load_dataset",
    "make_synthetic",
    "pad_images",
    "padding_mask",
    "probe_indices",
    "sample_crop_flip",
    "split_validation",
]
