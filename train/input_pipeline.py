"""Input pipelines with grain (no TensorFlow): digits, same_different, CIFAR, ImageNet; COCO and shapes.

* ``digits``: scikit-learn's bundled 8x8 grey digits (1797 images, 10 classes); a fixed stratified
  split gives 1437 training and 360 test images. No augmentation.
* ``same_different``: synthetic 16x16 RGB images of two far-apart glyphs, labelled "same" or
  "different" (``train/same_different.py``, a relational task); 4000 training images (seed 0) and
  2000 test images (seed 1), generated in memory. Training augmentation: random horizontal flip.
* ``cifar10`` / ``cifar100``: the official python tarballs in ``config.data_dir``, downloaded there
  (md5-checked) when absent and ``config.download`` is set. Training augmentation: zero-pad 4,
  random 32x32 crop, random horizontal flip.
* ``imagenet``: an ImageFolder tree ``data_dir/{train,val}/<class>/*.JPEG`` decoded with PIL, or,
  without that tree, TFDS's ``imagenet2012`` ``data_source`` in ``data_dir``. Training: Inception
  random-resized crop (area 8-100 %, aspect 3/4-4/3) and flip; evaluation: resize to
  ``image_size / 0.875`` and centre crop.
* ``coco`` / ``shapes`` (detection, ``config.task = "detection"``): COCO-format instances and images,
  or the synthetic shapes set; see ``train/detection_data.py``.

Images are normalised per channel with the data set's mean and standard deviation. Every
process reads its own ``1 / process_count`` of the records and yields its part of each global
batch. The training stream is an infinite, per-epoch reshuffled, deterministic function of
``config.seed``: shuffling and the augmentation's random numbers depend only on the seed, the
epoch and the record index, and its position is saved in checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
import os
import pickle
import tarfile
import urllib.request
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from train import detection_data
from train import same_different as same_different_images

Record = dict[str, Any]


class RecordSource(Protocol):
    """Random access to raw records: ``len(source)`` and ``source[i]`` (grain's data-source protocol)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Random-access record sources (``{'image', 'label'}``) and the transforms that finish them.

    Attributes:
      train, test: sequences of raw records.
      num_classes: number of labels.
      image_shape: ``(H, W, C)`` of a transformed image.
      train_transform: ``(record, rng) -> record`` with augmentation.
      test_transform: ``record -> record``.
      class_names: the label names, where the data set has them (else empty).
      max_boxes: a detection data set's box rows per record (records ``{'image', 'boxes', 'classes',
        'valid', 'image_id', 'scale'}``, see ``train/detection_data.py``); 0 for classification.
    """

    train: RecordSource
    test: RecordSource
    num_classes: int
    image_shape: tuple[int, int, int]
    train_transform: Callable[[Record, np.random.Generator], Record]
    test_transform: Callable[[Record], Record]
    class_names: tuple[str, ...] = ()
    max_boxes: int = 0


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Records from in-memory arrays: ``images[i]`` uint8 ``[H, W, C]``, ``labels[i]``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Record:
        return {"image": self.images[index], "label": self.labels[index]}


# ---------------------------------------------------------------------------------------------
# Transforms: module-level functions bound with functools.partial (picklable for grain workers).


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


def _open_image(image: str | bytes) -> Image.Image:
    """A file path (ImageFolder) or encoded bytes (TFDS without decoding) as an RGB PIL image."""
    return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image).convert("RGB")


def random_resized_crop_flip(
    record: Record, rng: np.random.Generator, *, size: int, mean: Sequence[float], std: Sequence[float]
) -> Record:
    """Inception-style crop: area 8-100 % and aspect ratio 3/4-4/3 (10 tries, then the centre
    square), resized to ``size x size``, flipped with p = 0.5."""
    image = _open_image(record["image"])
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
    image = _open_image(record["image"])
    width, height = image.size
    scale = size / 0.875 / min(width, height)
    width, height = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (width - size) // 2, (height - size) // 2
    image = image.resize((width, height), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    return normalize({"image": np.asarray(image), "label": record["label"]}, mean=mean, std=std)


# ---------------------------------------------------------------------------------------------
# Data sets.


DIGITS_MEAN, DIGITS_STD = (4.886,), (6.018,)  # of the training split, on the 0..16 scale


def digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.uint8)[..., None]  # N, 8, 8, 1 with values 0..16
    train_x, test_x, train_y, test_y = train_test_split(
        images, data.target.astype(np.int32), test_size=360, stratify=data.target, random_state=0
    )
    test_transform = evaluation_transform("digits", 8)
    return Dataset(
        ArraySource(train_x, train_y),
        ArraySource(test_x, test_y),
        num_classes=10,
        image_shape=(8, 8, 1),
        train_transform=functools.partial(without_augmentation, transform=test_transform),
        test_transform=test_transform,
        class_names=tuple(str(digit) for digit in range(10)),
    )


SAME_DIFFERENT_SIZE, SAME_DIFFERENT_TRAIN, SAME_DIFFERENT_TEST = 16, 4000, 2000
# Per-channel mean and standard deviation of every pixel of the training split
# (same_different.generate(4000, seed=0), 0..255 scale), computed once with float64 numpy;
# tests/test_same_different.py recomputes them.
SAME_DIFFERENT_MEAN, SAME_DIFFERENT_STD = (31.07, 31.05, 31.08), (43.53, 43.44, 43.52)


def same_different() -> Dataset:
    """The synthetic relational data set of ``train/same_different.py``: label 1 ("same") when the
    image's two glyphs are the same pattern.

    Training augmentation: a random horizontal flip. Flipping the whole image mirrors both glyphs
    alike, so same stays same and different stays different, and the glyph set is closed under
    mirroring, so a flipped image is an image of the data set itself (twice the distinct training
    images at no cost). Crops are left out: they could cut a glyph in half near the border.
    """
    train = same_different_images.generate(SAME_DIFFERENT_TRAIN, seed=0, size=SAME_DIFFERENT_SIZE)
    test = same_different_images.generate(SAME_DIFFERENT_TEST, seed=1, size=SAME_DIFFERENT_SIZE)
    return Dataset(
        ArraySource(train.images, train.labels),
        ArraySource(test.images, test.labels),
        num_classes=2,
        image_shape=(SAME_DIFFERENT_SIZE, SAME_DIFFERENT_SIZE, 3),
        train_transform=functools.partial(flip_normalize, mean=SAME_DIFFERENT_MEAN, std=SAME_DIFFERENT_STD),
        test_transform=evaluation_transform("same_different", SAME_DIFFERENT_SIZE),
        class_names=("different", "same"),
    )


CIFAR: dict[str, dict[str, Any]] = {
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
CIFAR_MEAN, CIFAR_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
DETECTION_DATASETS = ("coco", "shapes")
DATASETS = ("digits", "same_different", *CIFAR, "imagenet", *DETECTION_DATASETS)


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(data_dir: str, url: str, md5: str, *, download: bool) -> str:
    """Path of ``data_dir/<file name of url>``, downloading it when absent; its md5 is checked either way."""
    path = os.path.join(data_dir, os.path.basename(url))
    fix = f"download {url} (md5 {md5}) into {data_dir}"
    if os.path.exists(path):
        if (actual := _md5(path)) != md5:
            raise ValueError(
                f"{path} is corrupt or truncated (md5 {actual}, expected {md5}): delete it and run again "
                f"to download it, or {fix}"
            )
        return path
    if not download:
        raise FileNotFoundError(f"{path} not found; {fix}, or set --config.download=True")
    os.makedirs(data_dir, exist_ok=True)
    partial_path = f"{path}.part{jax.process_index()}"
    try:
        urllib.request.urlretrieve(url, partial_path)
    except OSError as error:
        raise FileNotFoundError(f"{path} not found and downloading failed ({error}); {fix}") from error
    if (actual := _md5(partial_path)) != md5:
        os.remove(partial_path)
        raise ValueError(f"{url} downloaded with md5 {actual}, expected {md5}; try again")
    os.replace(partial_path, path)
    return path


def _extract(tar: tarfile.TarFile, member: str) -> IO[bytes]:
    """The file ``member`` of ``tar``; ValueError when it is not a regular file."""
    file = tar.extractfile(member)
    if file is None:
        raise ValueError(f"{tar.name!r}: {member} is not a regular file")
    return file


def cifar(name: str, data_dir: str, *, download: bool) -> Dataset:
    spec = CIFAR[name]
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
        image_shape=(32, 32, 3),
        train_transform=functools.partial(pad_crop_flip, pad=4, mean=CIFAR_MEAN, std=CIFAR_STD),
        test_transform=evaluation_transform(name, 32),
        class_names=names,
    )


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


IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


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
            raise FileNotFoundError(
                f"{train_dir} not found (an ImageFolder tree: train/<class>/*.JPEG and val/<class>/*.JPEG) "
                "and tensorflow_datasets is not installed for its imagenet2012 data_source"
            ) from error
        keep_jpeg = {"image": tfds.decode.SkipDecoding()}
        train, test = (
            tfds.data_source("imagenet2012", split=split, data_dir=data_dir, decoders=keep_jpeg)
            for split in ("train", "validation")
        )
        num_classes = 1000
    stats: dict[str, Any] = dict(size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Dataset(
        train,
        test,
        num_classes=num_classes,
        image_shape=(image_size, image_size, 3),
        train_transform=functools.partial(random_resized_crop_flip, **stats),
        test_transform=evaluation_transform("imagenet", image_size),
        class_names=classes,
    )


def create_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The data set named by ``config.dataset``."""
    data_dir = os.path.expanduser(config.data_dir)
    if config.dataset == "digits":
        return digits()
    if config.dataset == "same_different":
        return same_different()
    if config.dataset in CIFAR:
        return cifar(config.dataset, data_dir, download=config.download)
    if config.dataset == "imagenet":
        return imagenet(data_dir, image_size=config.image_size)
    if config.dataset == "coco":
        return detection(detection_data.coco_sources(data_dir), config.image_size, config.detection.max_boxes)
    if config.dataset == "shapes":
        sources = detection_data.shapes_sources()
        return detection(sources, detection_data.SHAPES_SIZE, config.detection.max_boxes)
    raise ValueError(f"dataset={config.dataset!r} must be one of {DATASETS}")


def detection(
    sources: tuple[detection_data.CocoSource, detection_data.CocoSource], image_size: int, max_boxes: int
) -> Dataset:
    """A detection data set of COCO-format training and test sources, at ``image_size x image_size``."""
    train, test = sources
    transform = functools.partial(detection_data.resize_pad, size=image_size, max_boxes=max_boxes)
    return Dataset(
        train,
        test,
        num_classes=len(detection_data.category_ids(train.instances)),
        image_shape=(image_size, image_size, 3),
        train_transform=transform,
        test_transform=functools.partial(transform, rng=None),
        class_names=detection_data.class_names(train.instances),
        max_boxes=max_boxes,
    )


def evaluation_transform(dataset: str, image_size: int) -> Callable[[Record], Record]:
    """The test transform of a data set, known from its name alone (no records needed)."""
    if dataset == "digits":
        return functools.partial(normalize, mean=DIGITS_MEAN, std=DIGITS_STD)
    if dataset == "same_different":
        return functools.partial(normalize, mean=SAME_DIFFERENT_MEAN, std=SAME_DIFFERENT_STD)
    if dataset in CIFAR:
        return functools.partial(normalize, mean=CIFAR_MEAN, std=CIFAR_STD)
    if dataset == "imagenet":
        return functools.partial(resize_center_crop, size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if dataset in DETECTION_DATASETS:
        raise ValueError(
            f"dataset={dataset!r} is a detection data set: its records carry boxes "
            "(detection_data.resize_pad; pictures: train.predict.prepare_detection)"
        )
    raise ValueError(f"dataset={dataset!r} must be one of {DATASETS}")


def picture_transform(dataset: str, image_size: int) -> Callable[[str], np.ndarray]:
    """``image file -> model input`` as the data set's test transform prepares its images.

    Any PNG or JPEG: ``digits`` takes it as grey, resized to 8x8 and scaled to the data set's
    0..16 range; CIFAR as RGB resized to 32x32; ``same_different`` as RGB resized to 16x16;
    ImageNet through the evaluation resize and centre crop. Needs no records, so a trained model
    classifies pictures without its data set.
    """
    transform = evaluation_transform(dataset, image_size)
    decode: Callable[[str], Any]
    if dataset == "digits":
        decode = functools.partial(_resized_picture, mode="L", size=8, scale=16 / 255)
    elif dataset in CIFAR:
        decode = functools.partial(_resized_picture, mode="RGB", size=32, scale=1.0)
    elif dataset == "same_different":
        decode = functools.partial(_resized_picture, mode="RGB", size=SAME_DIFFERENT_SIZE, scale=1.0)
    else:
        decode = str  # ImageNet's transform opens the file itself
    return lambda path: transform({"image": decode(path), "label": 0})["image"]


def _resized_picture(path: str, *, mode: str, size: int, scale: float) -> np.ndarray:
    """``[size, size, C]`` uint8 in the data set's value range: ``round(pixel * scale)``."""
    with Image.open(path) as picture:
        resized = picture.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.round(np.asarray(resized, np.float32) * scale).astype(np.uint8)
    return pixels.reshape(size, size, -1)


# ---------------------------------------------------------------------------------------------
# Pipelines: each process reads records process_index, process_index + process_count, ...


def check_record(record: Record, *, split: str, data: Dataset) -> Record:
    """``record`` (transformed) unchanged, or ValueError if its image, label or boxes do not fit ``data``."""
    image_shape, num_classes = tuple(data.image_shape), data.num_classes
    if np.shape(record["image"]) != image_shape:
        raise ValueError(
            f"a {split} record's image has shape {np.shape(record['image'])}, but the data set's image_shape "
            f"is {image_shape}: fix the records or the {split} transform"
        )
    if data.max_boxes:
        detection_data.check_detection_record(
            record, split=split, max_boxes=data.max_boxes, num_classes=num_classes
        )
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


def _parallel(dataset: grain.MapDataset, workers: int) -> grain.IterDataset:
    dataset = dataset.to_iter_dataset()
    if workers:
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
