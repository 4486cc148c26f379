"""``cifar10`` / ``cifar100``: the official python tarballs in ``config.data_dir``, downloaded there
(md5-checked) when absent and ``config.download`` is set. Training augmentation: zero-pad 4, random
32x32 crop, random horizontal flip."""

from __future__ import annotations

import functools
import os
import pickle
import tarfile
from typing import IO, Any

import ml_collections
import numpy as np

from train.data.dataset import ArraySource, Dataset, Entry, Layout
from train.data.download import fetch
from train.data.transforms import normalize, pad_crop_flip, resized_picture

FILES: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train=[f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
        test=["cifar-10-batches-py/test_batch"],
        label_key=b"labels",
        num_classes=10,
        meta=("cifar-10-batches-py/batches.meta", b"label_names"),
    ),
    "cifar100": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["cifar-100-python/train"],
        test=["cifar-100-python/test"],
        label_key=b"fine_labels",
        num_classes=100,
        meta=("cifar-100-python/meta", b"fine_label_names"),
    ),
}
IMAGE_SHAPE = (32, 32, 3)
MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
TEST_TRANSFORM = functools.partial(normalize, mean=MEAN, std=STD)


def _extract(tar: tarfile.TarFile, member: str) -> IO[bytes]:
    """The file ``member`` of ``tar``; ValueError when it is not a regular file."""
    file = tar.extractfile(member)
    if file is None:
        raise ValueError(f"{tar.name!r}: {member} is not a regular file")
    return file


def cifar(name: str, data_dir: str, *, download: bool) -> Dataset:
    spec = FILES[name]
    path = fetch(data_dir, spec["url"], spec["md5"], download=download)

    def load(tar: tarfile.TarFile, members: list[str]) -> ArraySource:
        batches = [pickle.load(_extract(tar, member), encoding="bytes") for member in members]
        images = np.concatenate([batch[b"data"] for batch in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([batch[spec["label_key"]] for batch in batches]).astype(np.int32)
        return ArraySource(images.transpose(0, 2, 3, 1), labels)  # N, 32, 32, 3

    def class_names(tar: tarfile.TarFile) -> tuple[str, ...]:
        member, key = spec["meta"]
        if member not in tar.getnames():  # the official tarballs have it
            return ()
        return tuple(name.decode() for name in pickle.load(_extract(tar, member), encoding="bytes")[key])

    with tarfile.open(path) as tar:
        train, test, names = load(tar, spec["train"]), load(tar, spec["test"]), class_names(tar)
    return Dataset(
        train,
        test,
        num_classes=spec["num_classes"],
        image_shape=IMAGE_SHAPE,
        train_transform=functools.partial(pad_crop_flip, pad=4, mean=MEAN, std=STD),
        test_transform=TEST_TRANSFORM,
        class_names=names,
    )


def read_picture(path: str, image_size: int) -> np.ndarray:
    """Any picture as RGB resized to 32x32."""
    del image_size  # always 32x32
    return TEST_TRANSFORM({"image": resized_picture(path, mode="RGB", size=32, scale=1.0), "label": 0})[
        "image"
    ]


def entry(name: str) -> Entry:
    def create(config: ml_collections.ConfigDict) -> Dataset:
        return cifar(name, os.path.expanduser(config.data_dir), download=config.download)

    def layout(config: ml_collections.ConfigDict) -> Layout:
        del config  # always 32x32
        return Layout(num_classes=FILES[name]["num_classes"], image_shape=IMAGE_SHAPE)

    return Entry(create, layout, read_picture)
