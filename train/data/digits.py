"""``digits``: scikit-learn's bundled 8x8 grey digits (1797 images, 10 classes); a fixed stratified
split gives 1437 training and 360 test images. No augmentation. Needs no download: the default
data set of ``python -m train``."""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from train.data.dataset import ArraySource, Dataset, Entry, Layout
from train.data.transforms import normalize, resized_picture, without_augmentation

MEAN, STD = (4.886,), (6.018,)  # of the training split, on the 0..16 scale
TEST_TRANSFORM = functools.partial(normalize, mean=MEAN, std=STD)
LAYOUT = Layout(num_classes=10, image_shape=(8, 8, 1))


def digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.uint8)[..., None]  # N, 8, 8, 1 with values 0..16
    train_x, test_x, train_y, test_y = train_test_split(
        images, data.target.astype(np.int32), test_size=360, stratify=data.target, random_state=0
    )
    return Dataset(
        ArraySource(train_x, train_y),
        ArraySource(test_x, test_y),
        num_classes=LAYOUT.num_classes,
        image_shape=LAYOUT.image_shape,
        train_transform=functools.partial(without_augmentation, transform=TEST_TRANSFORM),
        test_transform=TEST_TRANSFORM,
        class_names=tuple(str(digit) for digit in range(10)),
    )


def read_picture(path: str, image_size: int) -> np.ndarray:
    """Any picture as grey, resized to 8x8 and scaled to the data set's 0..16 range."""
    del image_size  # always 8x8
    pixels = resized_picture(path, mode="L", size=8, scale=16 / 255)
    return TEST_TRANSFORM({"image": pixels, "label": 0})["image"]


def create(config: ml_collections.ConfigDict) -> Dataset:
    del config  # nothing to configure
    return digits()


ENTRY = Entry(create, lambda config: LAYOUT, read_picture)
