"""What every data set is: random-access record sources and the transforms that finish them
(:class:`Dataset`), and how the registry makes a named one (:class:`Entry`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

Record = dict[str, Any]
TASKS = ("classification", "detection")


class RecordSource(Protocol):
    """Random access to raw records: ``len(source)`` and ``source[i]`` (grain's data-source protocol)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a data set's transformed records are, without any record: all that compiling a run needs
    (``train.aot``). Every registry entry states its layout without reading data (:class:`Entry`).

    Attributes:
      num_classes: number of labels.
      image_shape: ``(H, W, C)`` of a transformed image.
      task: what the records are for: ``"classification"`` or ``"detection"`` (records ``{'image',
        'boxes', 'classes', 'valid', 'image_id', 'scale'}`` with ``max_boxes`` box rows, see
        ``train/data/coco.py``). The training loop takes the task from here.
      max_boxes: a detection data set's box rows per record; 0 for classification.
    """

    # kw_only: Dataset's sources come first, positionally
    num_classes: int = dataclasses.field(kw_only=True)
    image_shape: tuple[int, int, int] = dataclasses.field(kw_only=True)
    task: str = dataclasses.field(default="classification", kw_only=True)
    max_boxes: int = dataclasses.field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Dataset task={self.task!r} must be one of {TASKS}")
        if (self.task == "detection") != (self.max_boxes > 0):
            raise ValueError(
                f"Dataset task={self.task!r} with max_boxes={self.max_boxes}: a detection data set has "
                "max_boxes >= 1, a classification one 0"
            )

    def batch_shapes(self, batch_size: int, *, test: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
        """The arrays of a batch of ``batch_size`` transformed records, as the pipelines
        (``train/data/pipeline.py``) yield them; test batches add ``mask`` (0 for padding)."""
        fields: dict[str, tuple[tuple[int, ...], Any]] = {"image": (self.image_shape, np.float32)}
        if self.task == "detection":
            fields |= {
                "boxes": ((self.max_boxes, 4), np.float32),
                "classes": ((self.max_boxes,), np.int32),
                "valid": ((self.max_boxes,), np.bool_),
                "image_id": ((), np.int32),
                "scale": ((), np.float32),
            }
        else:
            fields["label"] = ((), np.int32)
        if test:
            fields["mask"] = ((), np.float32)
        return {
            name: jax.ShapeDtypeStruct((batch_size, *shape), dtype) for name, (shape, dtype) in fields.items()
        }


@dataclasses.dataclass(frozen=True)
class Dataset(Layout):
    """Random-access record sources and the transforms that finish them, and their :class:`Layout`
    (``num_classes``, ``image_shape``, ``task``, ``max_boxes``: keyword arguments).

    Attributes:
      train, test: sequences of raw records (``{'image', 'label'}`` for classification).
      train_transform: ``(record, rng) -> record`` with augmentation.
      test_transform: ``record -> record``.
      class_names: the label names, where the data set has them (else empty).
    """

    train: RecordSource
    test: RecordSource
    train_transform: Callable[[Record, np.random.Generator], Record]
    test_transform: Callable[[Record], Record]
    class_names: tuple[str, ...] = ()


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
      layout: ``config -> Layout``, reading no data: the layout of the full data set (a reduced
        ImageNet tree or COCO-format folder may have fewer classes; ``create`` counts them).
      read_picture: ``(picture file, image_size) -> model input`` prepared as the test records are,
        for classifying any PNG or JPEG without the data set; None for detection data sets (their
        pictures are resized and padded with a scale: ``train.inference.prepare_detection``).
    """

    create: Callable[[ml_collections.ConfigDict], Dataset]
    layout: Callable[[ml_collections.ConfigDict], Layout]
    read_picture: Callable[[str, int], np.ndarray] | None = None
