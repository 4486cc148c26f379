"""A synthetic detection data set: circles, squares and triangles of any colour on clutter.

Made for checking detection end to end on a CPU in minutes (``python -m train --config
train/configs/shapes_aa_retinanet.py``): every box and class is known exactly, and the data comes in
COCO's format, so it goes through the same pipeline and the same pycocotools evaluation as COCO.

Each ``size x size`` RGB image has a dim noisy background, clutter (thin line segments and dots of
random colours, never larger than ``CLUTTER_MAX`` pixels across in both directions) and 1 to
``max_objects`` objects. An object is a filled circle, square or triangle (apex up), ``MIN_SIDE`` to
``max_side`` pixels across, in a bright random colour that is independent of its class; objects do not
overlap (their boxes are ``GAP`` pixels apart) and are drawn over the clutter. The class is the shape.
A box is the tight box of the object's pixels, in COCO's ``[x, y, width, height]`` with pixel-edge
coordinates (a single pixel at column 3, row 5 is ``[3, 5, 1, 1]``).

As a data set: 2000 training images (seed 0) and 500 test images (seed 1) of 128x128, generated in
memory, through the COCO-format sources and transforms of ``train/data/coco.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import ml_collections
import numpy as np

from train.data.coco import CocoSource, detection_dataset, detection_layout
from train.data.dataset import Dataset, Entry, Layout

CLASSES = ("circle", "square", "triangle")
MIN_SIDE, GAP, CLUTTER_MAX = 10, 2, 6


@dataclasses.dataclass(frozen=True)
class Shapes:
    """``images`` uint8 ``[N, size, size, 3]`` and their COCO-format ``instances`` dict
    (image ``i`` has id ``i + 1`` and file name ``{i:05d}.png``; category ids ``1..3``)."""

    images: np.ndarray
    instances: dict[str, Any]


def shape_mask(kind: str, side: int) -> np.ndarray:
    """``[side, side]`` bool: the pixels (by their centres) of a ``kind`` object filling the square."""
    centre = (np.arange(side) + 0.5) / side  # pixel centres in [0, 1]
    y, x = np.meshgrid(centre, centre, indexing="ij")
    if kind == "circle":
        return (y - 0.5) ** 2 + (x - 0.5) ** 2 <= 0.25
    if kind == "square":
        return np.ones((side, side), bool)
    if kind == "triangle":  # apex at the top centre, base along the bottom edge
        return np.abs(x - 0.5) <= y / 2
    raise ValueError(f"kind={kind!r} must be one of {CLASSES}")


def _clutter(image: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Draw ``count`` dots and thin line segments (at most CLUTTER_MAX pixels across) into ``image``."""
    size = image.shape[0]
    for _ in range(count):
        colour = rng.integers(40, 256, size=3)
        y, x = rng.integers(0, size - CLUTTER_MAX, size=2)
        if rng.random() < 0.5:  # a dot of 1-2 pixels
            side = rng.integers(1, 3)
            image[y : y + side, x : x + side] = colour
        else:  # a 1-pixel line of CLUTTER_MAX pixels, horizontal, vertical or diagonal
            dy, dx = [(0, 1), (1, 0), (1, 1)][rng.integers(3)]
            steps = np.arange(CLUTTER_MAX)
            image[y + dy * steps, x + dx * steps] = colour


def _place(
    rng: np.random.Generator, side: int, size: int, boxes: list[tuple[int, int, int]]
) -> tuple[int, int]:
    """A top-left corner for a ``side`` square inside the image, GAP pixels from every box in
    ``boxes`` (``(top, left, side)``); ``(-1, -1)`` when 50 tries find none."""
    for _ in range(50):
        top, left = rng.integers(0, size - side + 1, size=2)
        if all(
            top + side + GAP <= other_top
            or other_top + other_side + GAP <= top
            or left + side + GAP <= other_left
            or other_left + other_side + GAP <= left
            for other_top, other_left, other_side in boxes
        ):
            return int(top), int(left)
    return -1, -1


def generate(count: int, *, seed: int, size: int = 128, max_objects: int = 4, max_side: int = 40) -> Shapes:
    """``count`` images drawn from ``np.random.default_rng(seed)``; the same arguments give the same data."""
    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    if not MIN_SIDE <= max_side <= size:
        raise ValueError(f"max_side={max_side} must be in [{MIN_SIDE}, size={size}]")
    if max_objects < 1:
        raise ValueError(f"max_objects={max_objects} must be >= 1")
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 30, size=(count, size, size, 3), dtype=np.uint8)  # dim noise
    annotations: list[dict[str, Any]] = []
    for index, image in enumerate(images):
        _clutter(image, rng, count=int(rng.integers(size // 8, size // 4)))
        placed: list[tuple[int, int, int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            side = int(rng.integers(MIN_SIDE, max_side + 1))
            top, left = _place(rng, side, size, placed)
            if top < 0:
                continue
            placed.append((top, left, side))
            label = int(rng.integers(len(CLASSES)))
            mask = shape_mask(CLASSES[label], side)
            image[top : top + side, left : left + side][mask] = rng.integers(100, 256, size=3)
            rows, cols = np.nonzero(mask)
            x, y = left + int(cols.min()), top + int(rows.min())
            width, height = int(cols.max() - cols.min()) + 1, int(rows.max() - rows.min()) + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": [x, y, width, height],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                }
            )
    instances = {
        "images": [
            {"id": i + 1, "file_name": f"{i:05d}.png", "height": size, "width": size} for i in range(count)
        ],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
    }
    return Shapes(images, instances)


DATASET_SIZE, TRAIN_IMAGES, TEST_IMAGES = 128, 2000, 500


def load_array(entry: dict[str, Any], *, images: np.ndarray) -> np.ndarray:
    """Image id ``i`` is ``images[i - 1]``."""
    return images[entry["id"] - 1]


def shapes_sources() -> tuple[CocoSource, CocoSource]:
    """The training (seed 0) and test (seed 1) sources."""
    sources = []
    for count, seed in ((TRAIN_IMAGES, 0), (TEST_IMAGES, 1)):
        data = generate(count, seed=seed, size=DATASET_SIZE)
        sources.append(CocoSource(data.instances, functools.partial(load_array, images=data.images)))
    return sources[0], sources[1]


def create(config: ml_collections.ConfigDict) -> Dataset:
    return detection_dataset(shapes_sources(), DATASET_SIZE, config.detection.max_boxes)


def layout(config: ml_collections.ConfigDict) -> Layout:
    return detection_layout(len(CLASSES), DATASET_SIZE, config.detection.max_boxes)


ENTRY = Entry(create, layout)
