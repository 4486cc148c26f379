"""``imagenet``: an ImageFolder tree ``data_dir/{train,val}/<class>/*.JPEG`` decoded with PIL, or,
without that tree, TFDS's ``imagenet2012`` ``data_source`` in ``data_dir``. Training: Inception
random-resized crop (area 8-100 %, aspect 3/4-4/3) and flip; evaluation: resize to
``image_size / 0.875`` and centre crop."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from train.data.dataset import Dataset, Entry, Layout, Record, RecordSource
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_flip, resize_center_crop
from train.errors import MissingDataError

NUM_CLASSES = 1000  # ILSVRC-2012


class ImageFolderSource:
    """Records ``{'image': path, 'label'}`` from ``root/<class>/<image>``; labels index ``classes``."""

    def __init__(self, root: str, classes: Sequence[str]):
        self.files = [
            (os.path.join(root, name, file), label)
            for label, name in enumerate(classes)
            for file in sorted(os.listdir(os.path.join(root, name)))
        ]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Record:
        path, label = self.files[index]
        return {"image": path, "label": label}


def test_transform(image_size: int) -> Callable[[Record], Record]:
    return functools.partial(resize_center_crop, size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def imagenet(data_dir: str, *, image_size: int) -> Dataset:
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    classes: tuple[str, ...] = ()
    train: RecordSource
    test: RecordSource
    if os.path.isdir(train_dir):
        classes = tuple(sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir()))
        train, test = ImageFolderSource(train_dir, classes), ImageFolderSource(val_dir, classes)
        num_classes = len(classes)
    else:
        try:
            import tensorflow_datasets as tfds
        except ImportError as error:
            raise MissingDataError(
                f"{train_dir} not found (an ImageFolder tree: train/<class>/*.JPEG and val/<class>/*.JPEG) "
                "and tensorflow_datasets is not installed for its imagenet2012 data_source"
            ) from error
        keep_jpeg = {"image": tfds.decode.SkipDecoding()}
        train, test = (
            tfds.data_source("imagenet2012", split=split, data_dir=data_dir, decoders=keep_jpeg)
            for split in ("train", "validation")
        )
        num_classes = NUM_CLASSES
    stats: dict[str, Any] = dict(size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Dataset(
        train,
        test,
        num_classes=num_classes,
        image_shape=(image_size, image_size, 3),
        train_transform=functools.partial(random_resized_crop_flip, **stats),
        test_transform=test_transform(image_size),
        class_names=classes,
    )


def read_picture(path: str, image_size: int) -> np.ndarray:
    """Any picture through the evaluation resize and centre crop (the transform opens the file)."""
    return test_transform(image_size)({"image": path, "label": 0})["image"]


def create(config: ml_collections.ConfigDict) -> Dataset:
    return imagenet(os.path.expanduser(config.data_dir), image_size=config.image_size)


def layout(config: ml_collections.ConfigDict) -> Layout:
    return Layout(num_classes=NUM_CLASSES, image_shape=(config.image_size, config.image_size, 3))


ENTRY = Entry(create, layout, read_picture)
