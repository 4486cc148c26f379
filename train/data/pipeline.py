"""Input pipelines with grain (no TensorFlow) for any :class:`~train.data.dataset.Dataset`.

Every process reads its own ``1 / process_count`` of the records and yields its part of each global
batch. The training stream is an infinite, per-epoch reshuffled, deterministic function of
``config.seed``: shuffling and the augmentation's random numbers depend only on the seed, the
epoch and the record index, and its position is saved in checkpoints. Every record is checked
against the data set as it is read (:func:`check_record`).
"""

from __future__ import annotations

import functools
import math

import grain
import jax
import numpy as np
from absl import flags

from train.data.coco import check_detection_record
from train.data.dataset import Dataset, Record


def check_record(record: Record, *, split: str, data: Dataset) -> Record:
    """``record`` (transformed) unchanged, or ValueError if its image, label or boxes do not fit ``data``."""
    image_shape, num_classes = tuple(data.image_shape), data.num_classes
    if np.shape(record["image"]) != image_shape:
        raise ValueError(
            f"a {split} record's image has shape {np.shape(record['image'])}, but the data set's image_shape "
            f"is {image_shape}: fix the records or the {split} transform"
        )
    if data.task == "detection":
        check_detection_record(record, split=split, max_boxes=data.max_boxes, num_classes=num_classes)
        return record
    label = np.asarray(record["label"])
    if label.ndim or not np.issubdtype(label.dtype, np.integer) or not 0 <= label < num_classes:
        raise ValueError(
            f"a {split} record has label {label.tolist()!r}; labels must be integers in [0, {num_classes}) "
            f"(the data set's num_classes is {num_classes})"
        )
    return record


def check_dataset(data: Dataset) -> None:
    """Check the first training and test records now, before compiling anything (the pipelines
    check every record as they read it)."""
    if not len(data.train) or not len(data.test):
        raise ValueError(f"empty data set: {len(data.train)} training and {len(data.test)} test records")
    check = functools.partial(check_record, data=data)
    check(data.train_transform(data.train[0], np.random.default_rng(0)), split="training")
    check(data.test_transform(data.test[0]), split="test")


# How far the pipelines read ahead of the step. grain's default (16 threads, 500 elements) is sized
# for small records; an element here is a whole batch, so it held up to 500 batches per process
# (1.2 TB of the ImageNet recipe's) and spent the CPU on them while the first step compiled. In the
# training process: two threads, four batches ahead; in each worker process (data_workers > 0) one
# batch at a time, since the workers are the parallelism.
IN_PROCESS_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
IN_WORKER_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _parallel(dataset: grain.MapDataset, workers: int) -> grain.IterDataset:
    dataset = dataset.to_iter_dataset(IN_WORKER_READ if workers else IN_PROCESS_READ)
    if workers:
        # grain's workers read absl flags: outside an absl program (a notebook, a test) they are unparsed
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return dataset


def train_iterator(data: Dataset, *, batch_size: int, seed: int, workers: int = 0) -> grain.DatasetIterator:
    """Endless stream of this process's slices of global batches of ``batch_size`` augmented records."""
    dataset = grain.MapDataset.source(data.train)[jax.process_index() :: jax.process_count()]
    dataset = dataset.shuffle(seed).repeat().random_map(data.train_transform, seed=seed)
    dataset = dataset.map(functools.partial(check_record, split="training", data=data))
    dataset = dataset.batch(batch_size // jax.process_count(), drop_remainder=True)
    return iter(_parallel(dataset, workers))


def _test_record(index: int, *, data: Dataset) -> Record:
    """Record ``index``; indices past the end repeat the last record with ``mask`` 0."""
    count = len(data.test)
    record = data.test_transform(data.test[min(index, count - 1)])
    check_record(record, split="test", data=data)
    return {**record, "mask": np.float32(index < count)}


def test_batches(data: Dataset, *, batch_size: int, workers: int = 0) -> grain.IterDataset:
    """One pass over the test records in this process's slices of global batches of ``batch_size``.

    The record count is padded up to a multiple of ``batch_size`` (padding has ``mask`` 0) so
    that every batch is full and every process runs the same number of steps.
    """
    padded = math.ceil(len(data.test) / batch_size) * batch_size
    dataset = grain.MapDataset.range(padded)[jax.process_index() :: jax.process_count()]
    dataset = dataset.map(functools.partial(_test_record, data=data))
    return _parallel(dataset.batch(batch_size // jax.process_count()), workers)
