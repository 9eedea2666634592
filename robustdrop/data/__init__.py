"""Datasets as uint8 tensors, batched crop/flip on the device, epoch batching.

``datasets`` (the :func:`load_dataset` dispatcher) over three loaders (``cifar10_jpeg``, ``folder``,
``torchvision_data``) built from ``image_data`` (the container), ``cache``, ``decode`` and ``trees``
(folder layout and tar reading); ``synthetic`` makes test data; ``augment`` and ``loader`` feed training;
``probe`` turns a user's Dataset / DataLoader / tensors into a probe set (the Monitor's).

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
from robustdrop.data.cache import default_cache_dir
from robustdrop.data.cifar10_jpeg import CIFAR10_CLASSES, CIFAR10_JPEG_SHA256, embedded_archive_path
from robustdrop.data.datasets import DATASET_SPECS, check_dataset_spec, load_dataset
from robustdrop.data.folder import write_image_folder
from robustdrop.data.image_data import ImageData
from robustdrop.data.loader import Batch, TrainLoader, iterate_eval, probe_indices, split_validation, train_indices
from robustdrop.data.probe import NORMALIZED_HINT, as_uint8_images, probe_from
from robustdrop.data.synthetic import make_synthetic

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_SHA256",
    "DATASET_SPECS",
    "NORMALIZED_HINT",
    "Batch",
    "CropFlip",
    "ImageData",
    "TrainLoader",
    "apply_crop_flip",
    "as_uint8_images",
    "check_dataset_spec",
    "default_cache_dir",
    "embedded_archive_path",
    "invert_crop_flip",
    "iterate_eval",
    "load_dataset",
    "make_synthetic",
    "pad_images",
    "padding_mask",
    "probe_from",
    "probe_indices",
    "sample_crop_flip",
    "split_validation",
    "train_indices",
    "write_image_folder",
]
