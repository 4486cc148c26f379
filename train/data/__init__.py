"""The data sets of ``python -m train``: one registry, one file per family.

Adding a data set is one file with its :class:`~train.data.dataset.Entry` and one line in
:data:`REGISTRY`. The grain pipelines that read any :class:`~train.data.dataset.Dataset` are in
``train/data/pipeline.py``.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from train.data import cifar, coco, digits, imagenet, same_different, shapes
from train.data.dataset import Dataset, Entry, Layout
from train.errors import InputError

REGISTRY: dict[str, Entry] = {
    "digits": digits.ENTRY,
    "same_different": same_different.ENTRY,
    "cifar10": cifar.entry("cifar10"),
    "cifar100": cifar.entry("cifar100"),
    "imagenet": imagenet.ENTRY,
    "coco": coco.ENTRY,
    "shapes": shapes.ENTRY,
}


def entry(name: str) -> Entry:
    """The registry's entry ``name``; InputError naming the choices."""
    if name not in REGISTRY:
        raise InputError(f"dataset={name!r} must be one of {tuple(REGISTRY)}")
    return REGISTRY[name]


def create_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The data set named by ``config.dataset``."""
    return entry(config.dataset).create(config)


def layout(config: ml_collections.ConfigDict) -> Layout:
    """The layout of the data set named by ``config.dataset``, reading no data."""
    return entry(config.dataset).layout(config)


def read_picture(dataset: str, image_size: int, path: str) -> np.ndarray:
    """``picture file -> model input`` for a classifier trained on ``dataset``, prepared as its test
    records are (any PNG or JPEG, any size: resized to the data set's images), without its records."""
    read = entry(dataset).read_picture
    if read is None:
        raise ValueError(
            f"dataset={dataset!r} is a detection data set: its pictures are resized and padded "
            "(train.inference.prepare_detection)"
        )
    return read(path, image_size)
