"""Detection data in COCO's format: the ``coco`` data set and what every COCO-format set shares.

* ``coco``: ``data_dir/annotations/instances_{train,val}2017.json`` and the images in
  ``data_dir/{train,val}2017/`` (COCO 2017's official layout; any data set in COCO's format laid out
  the same way works). Read with PIL, one image per record, by grain workers.
* ``shapes`` (``train/data/shapes.py``) is COCO-format too and goes through the same sources and
  transforms.

An instances file is checked when it is read, with one clear error naming the image or annotation:
a box outside its image (by more than ``BOX_TOLERANCE`` pixels; within it, the box is clipped), a
category id the file does not declare, an annotation of an unknown image, a bad ``bbox``. Documented
handling, not errors: an image without annotations is kept (in training it teaches the background,
in evaluation pycocotools counts its false positives); ``iscrowd`` annotations and boxes less than
one pixel wide or high are left out of the training targets (pycocotools still uses the crowd
regions of the test split to ignore detections on them).

Records: ``{"image", "boxes", "classes", "image_id"}`` (boxes ``(y1, x1, y2, x2)`` in the image's
pixels, classes ``0..C-1`` in the order of the sorted category ids). The transforms resize the
longer side to ``image_size`` (aspect ratio kept), flip left-right at random in training,
normalise with ImageNet's statistics, pad to ``image_size x image_size`` at the bottom and right,
and pad the boxes to ``max_boxes`` rows (``valid`` marks the real ones); ``scale`` maps the model's
boxes back to the image (divide by it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from train.data.dataset import Dataset, Entry, Layout, Record
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.errors import InputError, MissingDataError

NUM_CATEGORIES = 80  # COCO 2017's instance categories
BOX_TOLERANCE = 1.0  # pixels a COCO box may reach past its image (rounding in the annotations)


def read_instances(path: str) -> dict[str, Any]:
    """A COCO instances JSON file as a dict; FileNotFoundError / ValueError saying what is wrong."""
    if not os.path.exists(path):
        raise MissingDataError(f"no COCO instances file {path}")
    with open(path) as file:
        try:
            instances = json.load(file)
        except json.JSONDecodeError as error:
            raise InputError(f"{path} is not valid JSON ({error})") from error
    for key in ("images", "annotations", "categories"):
        if not isinstance(instances, dict) or not isinstance(instances.get(key), list):
            raise InputError(f"{path} lacks the COCO key {key!r} (a list): not an instances file")
    return instances


def category_ids(instances: dict[str, Any]) -> tuple[int, ...]:
    """The sorted category ids; class ``c`` of the model is category ``category_ids(...)[c]``."""
    ids = sorted(int(category["id"]) for category in instances["categories"])
    if not ids or len(set(ids)) != len(ids):
        raise InputError(f"the instances declare category ids {ids}: need at least one, each once")
    return tuple(ids)


def class_names(instances: dict[str, Any]) -> tuple[str, ...]:
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in instances["categories"]}
    return tuple(names[i] for i in category_ids(instances))


def _image_boxes(
    image: dict[str, Any], annotations: list[dict[str, Any]], classes: dict[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes [n, 4] y1 x1 y2 x2, classes [n])`` of one image's trainable annotations, after checks."""
    height, width = image["height"], image["width"]
    boxes, labels = [], []
    for annotation in annotations:
        where = f"annotation id {annotation.get('id')} of image id {image['id']}"
        if annotation.get("category_id") not in classes:
            raise InputError(
                f"{where} has category_id {annotation.get('category_id')!r}, which the instances do not "
                f"declare (declared: {sorted(classes)})"
            )
        bbox = annotation.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not np.all(np.isfinite(np.asarray(bbox, float))):
            raise InputError(f"{where} has bbox {bbox!r}: must be [x, y, width, height] of finite numbers")
        x, y, w, h = (float(v) for v in bbox)
        if (
            w < 0
            or h < 0
            or x < -BOX_TOLERANCE
            or y < -BOX_TOLERANCE
            or (x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE)
        ):
            raise InputError(
                f"{where} has bbox {bbox} (x, y, width, height), outside its {width}x{height} image "
                f"(by more than {BOX_TOLERANCE} pixel) or of negative size: fix the annotation"
            )
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if annotation.get("iscrowd", 0) or x2 - x1 < 1 or y2 - y1 < 1:
            continue  # not a training target (see the module docstring)
        boxes.append((y1, x1, y2, x2))
        labels.append(classes[annotation["category_id"]])
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32)


@dataclasses.dataclass(frozen=True)
class CocoSource:
    """Random access to the images of a COCO instances dict, one record each (grain's protocol).

    ``load_image(image_entry) -> uint8 [H, W, 3]`` reads the pixels; every annotation is checked
    here, when the source is made.
    """

    instances: dict[str, Any]
    load_image: Callable[[dict[str, Any]], np.ndarray]
    targets: tuple[tuple[np.ndarray, np.ndarray], ...] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        images = self.instances["images"]
        by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in images}
        for annotation in self.instances["annotations"]:
            if annotation.get("image_id") not in by_image:
                raise InputError(
                    f"annotation id {annotation.get('id')} refers to image_id "
                    f"{annotation.get('image_id')!r}, which the instances do not list"
                )
            by_image[annotation["image_id"]].append(annotation)
        classes = {category: c for c, category in enumerate(category_ids(self.instances))}
        targets = tuple(_image_boxes(image, by_image[image["id"]], classes) for image in images)
        object.__setattr__(self, "targets", targets)

    def __len__(self) -> int:
        return len(self.instances["images"])

    def __getitem__(self, index: int) -> Record:
        entry = self.instances["images"][index]
        image = self.load_image(entry)
        if image.shape != (entry["height"], entry["width"], 3):
            raise InputError(
                f"image id {entry['id']} ({entry.get('file_name')}) is {image.shape[1]}x{image.shape[0]}, "
                f"but the instances say {entry['width']}x{entry['height']}"
            )
        boxes, classes = self.targets[index]
        return {"image": image, "boxes": boxes, "classes": classes, "image_id": np.int32(entry["id"])}


def load_file(entry: dict[str, Any], *, image_dir: str) -> np.ndarray:
    """The RGB pixels of ``image_dir/file_name``."""
    with Image.open(os.path.join(image_dir, entry["file_name"])) as image:
        return np.asarray(image.convert("RGB"))


def resize_pad(
    record: Record,
    rng: np.random.Generator | None,
    *,
    size: int,
    max_boxes: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Record:
    """Resize the longer side to ``size``, flip with p = 0.5 when given ``rng``, normalise, pad
    to ``size x size`` and the boxes to ``max_boxes`` (see the module docstring)."""
    image, boxes, classes = record["image"], record["boxes"], record["classes"]
    if len(boxes) > max_boxes:
        raise InputError(
            f"image id {int(record['image_id'])} has {len(boxes)} boxes, more than max_boxes={max_boxes}: "
            "raise --config.max_boxes"
        )
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    if (new_height, new_width) != (height, width):
        resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BILINEAR)
        image = np.asarray(resized)
    boxes = boxes * np.float32(scale)
    if rng is not None and rng.random() < 0.5:
        image = image[:, ::-1]
        boxes = np.stack([boxes[:, 0], new_width - boxes[:, 3], boxes[:, 2], new_width - boxes[:, 1]], axis=1)
    normalized = (np.asarray(image, np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    padded = np.zeros((size, size, 3), np.float32)
    padded[:new_height, :new_width] = normalized
    count = len(boxes)
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_boxes[:count] = boxes
    out_classes = np.zeros(max_boxes, np.int32)
    out_classes[:count] = classes
    return {
        "image": padded,
        "boxes": out_boxes,
        "classes": out_classes,
        "valid": np.arange(max_boxes) < count,
        "image_id": np.int32(record["image_id"]),
        "scale": np.float32(scale),
    }


def picture_box(box: np.ndarray, scale: float) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` in the picture's pixels of a model-input box ``(y1, x1, y2, x2)`` of a
    picture that :func:`resize_pad` scaled by ``scale``."""
    y1, x1, y2, x2 = (float(v) / float(scale) for v in box)
    return x1, y1, x2, y2


def check_detection_record(record: Record, *, split: str, max_boxes: int, num_classes: int) -> None:
    """ValueError unless the transformed record's boxes, classes and ``valid`` fit the data set."""
    if np.shape(record["boxes"]) != (max_boxes, 4) or np.shape(record["classes"]) != (max_boxes,):
        raise ValueError(
            f"a {split} record has boxes {np.shape(record['boxes'])} and classes "
            f"{np.shape(record['classes'])}; expected ({max_boxes}, 4) and ({max_boxes},)"
        )
    classes = np.asarray(record["classes"])[np.asarray(record["valid"], bool)]
    if classes.size and not (0 <= classes.min() and classes.max() < num_classes):
        raise ValueError(f"a {split} record has classes {classes.tolist()}, not all in [0, {num_classes})")


def coco_sources(data_dir: str) -> tuple[CocoSource, CocoSource]:
    """The training and validation sources of a COCO 2017 layout in ``data_dir``."""
    sources = []
    for split in ("train2017", "val2017"):
        instances = read_instances(os.path.join(data_dir, "annotations", f"instances_{split}.json"))
        image_dir = os.path.join(data_dir, split)
        if not os.path.isdir(image_dir):
            raise MissingDataError(f"no image folder {image_dir} (COCO 2017 layout: data_dir/{split}/*.jpg)")
        sources.append(CocoSource(instances, functools.partial(load_file, image_dir=image_dir)))
    if category_ids(sources[0].instances) != category_ids(sources[1].instances):
        raise InputError("the training and validation instances declare different categories")
    return sources[0], sources[1]


def detection_layout(num_classes: int, image_size: int, max_boxes: int) -> Layout:
    """The records of :func:`resize_pad` at ``image_size x image_size``."""
    return Layout(
        num_classes=num_classes,
        image_shape=(image_size, image_size, 3),
        task="detection",
        max_boxes=max_boxes,
    )


def detection_dataset(sources: tuple[CocoSource, CocoSource], image_size: int, max_boxes: int) -> Dataset:
    """A detection data set of COCO-format training and test sources, at ``image_size x image_size``."""
    train, test = sources
    transform = functools.partial(resize_pad, size=image_size, max_boxes=max_boxes)
    layout = detection_layout(len(category_ids(train.instances)), image_size, max_boxes)
    return Dataset(
        train,
        test,
        **dataclasses.asdict(layout),
        train_transform=transform,
        test_transform=functools.partial(transform, rng=None),
        class_names=class_names(train.instances),
    )


def create(config: ml_collections.ConfigDict) -> Dataset:
    sources = coco_sources(os.path.expanduser(config.data_dir))
    return detection_dataset(sources, config.image_size, config.detection.max_boxes)


def layout(config: ml_collections.ConfigDict) -> Layout:
    return detection_layout(NUM_CATEGORIES, config.image_size, config.detection.max_boxes)


ENTRY = Entry(create, layout)
