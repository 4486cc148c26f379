"""Record transforms shared by the data sets: module-level functions bound with ``functools.partial``
(picklable for grain workers)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from train.data.dataset import Record

IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def normalize(record: Record, *, mean: Sequence[float], std: Sequence[float]) -> Record:
    pixels = np.asarray(record["image"], np.float32)
    image = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return {"image": image, "label": np.int32(record["label"])}


def without_augmentation(record: Record, rng: np.random.Generator, *, transform: Callable) -> Record:
    del rng
    return transform(record)


def flip_normalize(
    record: Record, rng: np.random.Generator, *, mean: Sequence[float], std: Sequence[float]
) -> Record:
    """Flip left-right with p = 0.5, then normalise."""
    image = record["image"][:, ::-1] if rng.random() < 0.5 else record["image"]
    return normalize({"image": image, "label": record["label"]}, mean=mean, std=std)


def pad_crop_flip(
    record: Record, rng: np.random.Generator, *, pad: int, mean: Sequence[float], std: Sequence[float]
) -> Record:
    """Zero-pad by ``pad``, crop back to the original size at a random offset, flip with p = 0.5."""
    image = record["image"]
    height, width = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    image = padded[top : top + height, left : left + width]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return normalize({"image": image, "label": record["label"]}, mean=mean, std=std)


def open_image(image: str | bytes) -> Image.Image:
    """A file path (ImageFolder) or encoded bytes (TFDS without decoding) as an RGB PIL image."""
    return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image).convert("RGB")


def random_resized_crop_flip(
    record: Record, rng: np.random.Generator, *, size: int, mean: Sequence[float], std: Sequence[float]
) -> Record:
    """Inception-style crop: area 8-100 % and aspect ratio 3/4-4/3 (10 tries, then the centre
    square), resized to ``size x size``, flipped with p = 0.5."""
    image = open_image(record["image"])
    width, height = image.size
    box = None
    for _ in range(10):
        area = width * height * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_w, crop_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
            box = (left, top, left + crop_w, top + crop_h)
            break
    if box is None:
        side = min(width, height)
        box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return normalize({"image": np.asarray(image), "label": record["label"]}, mean=mean, std=std)


def resize_center_crop(record: Record, *, size: int, mean: Sequence[float], std: Sequence[float]) -> Record:
    """Shorter side resized to ``size / 0.875``, then the central ``size x size``."""
    image = open_image(record["image"])
    width, height = image.size
    scale = size / 0.875 / min(width, height)
    width, height = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (width - size) // 2, (height - size) // 2
    image = image.resize((width, height), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    return normalize({"image": np.asarray(image), "label": record["label"]}, mean=mean, std=std)


def resized_picture(path: str, *, mode: str, size: int, scale: float) -> np.ndarray:
    """``[size, size, C]`` uint8 in a data set's value range: the picture at ``path`` in PIL ``mode``,
    resized, each pixel ``round(pixel * scale)``."""
    with Image.open(path) as picture:
        resized = picture.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.round(np.asarray(resized, np.float32) * scale).astype(np.uint8)
    return pixels.reshape(size, size, -1)
