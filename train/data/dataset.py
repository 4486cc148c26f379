"""What every data set is: random-access record sources and the transforms that finish them
(:class:`Dataset`), and how the registry makes a named one (:class:`Entry`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import ml_collections
import numpy as np

Record = dict[str, Any]
TASKS = ("classification", "detection")


class RecordSource(Protocol):
    """Random access to raw records: ``len(source)`` and ``source[i]`` (grain's data-source protocol)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Random-access record sources and the transforms that finish them.

    Attributes:
      train, test: sequences of raw records (``{'image', 'label'}`` for classification).
      num_classes: number of labels.
      image_shape: ``(H, W, C)`` of a transformed image.
      train_transform: ``(record, rng) -> record`` with augmentation.
      test_transform: ``record -> record``.
      class_names: the label names, where the data set has them (else empty).
      task: what the records are for: ``"classification"`` or ``"detection"`` (records ``{'image',
        'boxes', 'classes', 'valid', 'image_id', 'scale'}`` with ``max_boxes`` box rows, see
        ``train/data/coco.py``). The training loop takes the task from here.
      max_boxes: a detection data set's box rows per record; 0 for classification.
    """

    train: RecordSource
    test: RecordSource
    num_classes: int
    image_shape: tuple[int, int, int]
    train_transform: Callable[[Record, np.random.Generator], Record]
    test_transform: Callable[[Record], Record]
    class_names: tuple[str, ...] = ()
    task: str = "classification"
    max_boxes: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Dataset task={self.task!r} must be one of {TASKS}")
        if (self.task == "detection") != (self.max_boxes > 0):
            raise ValueError(
                f"Dataset task={self.task!r} with max_boxes={self.max_boxes}: a detection data set has "
                "max_boxes >= 1, a classification one 0"
            )


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Records from in-memory arrays: ``images[i]`` uint8 ``[H, W, C]``, ``labels[i]``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Record:
        return {"image": self.images[index], "label": self.labels[index]}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One named data set of the registry (``train/data/__init__.py``).

    Attributes:
      create: ``config -> Dataset`` (reads ``data_dir``, ``image_size``, ... as the data set needs).
      read_picture: ``(picture file, image_size) -> model input`` prepared as the test records are,
        for classifying any PNG or JPEG without the data set; None for detection data sets (their
        pictures are resized and padded with a scale: ``train.inference.prepare_detection``).
    """

    create: Callable[[ml_collections.ConfigDict], Dataset]
    read_picture: Callable[[str, int], np.ndarray] | None = None
