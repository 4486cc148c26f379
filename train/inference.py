"""Using a trained model: ``load(workdir) -> (model, variables, config)`` (``train.load``), pictures
prepared as the run's test images, batched prediction, detection on pictures, ``jax.export``.

Lives in ``train/``, not in the library, because it reads a workdir (the library does no I/O) and
rebuilds the model the way the training script built it (its config, its registry call). Used by
``python -m train.predict`` and by warm starts (``train/warm_start.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import export
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from aacn_jax import detection
from train import checkpoint, run_record, sharding
from train.data import coco, read_picture
from train.state import create_model
from train.tasks.detection import find_objects

# The Pallas Triton kernel of the fused attention is a custom call jax.export does not vouch for.
_TRITON_CALL = "__gpu$xla.gpu.triton"


def load(
    workdir: str, step: int | None = None
) -> tuple[nn.Module, dict[str, Any], ml_collections.ConfigDict]:
    """The model, its variables (``params``, ``batch_stats``) and the config of a training run.

    Reads ``config.json`` and ``dataset.json`` (written by the run's first start) and the model
    variables of the checkpoint of ``step`` (None: the latest), without the optimizer state,
    replicated on every local device. Apply as ``model.apply(variables, images, train=False)``
    with images prepared as the run's test transform does (:func:`train.inference.prepare`).
    """
    config = run_record.read_config(workdir)
    dataset = run_record.read_dataset(workdir)
    model = create_model(config, dataset["num_classes"])
    images = jnp.zeros((1, *dataset["image_shape"]), jnp.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    replicated = NamedSharding(sharding.make_mesh(jax.local_devices()), PartitionSpec())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    variables = checkpoint.restore_variables(workdir, dict(abstract), step)
    return model, variables, config


def prepare(workdir: str, paths: Sequence[str]) -> np.ndarray:
    """``[N, H, W, C]`` float32 model inputs from picture files, as the run's test transform does."""
    dataset = run_record.read_dataset(workdir)
    return np.stack([read_picture(dataset["dataset"], dataset["image_size"], path) for path in paths])


def export_inference(
    model: nn.Module, variables: Any, image_shape: Sequence[int], batch: int, platform: str = "cpu"
) -> export.Exported:
    """``images [batch, *image_shape] -> logits [batch, classes]`` with the weights inside, for one
    platform."""
    infer = jax.jit(lambda images: model.apply(variables, images, train=False))
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    checks = [export.DisabledSafetyCheck.custom_call(_TRITON_CALL)]
    return export.export(infer, platforms=[platform], disabled_checks=checks)(images)


def prepare_detection(paths: Sequence[str], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``([N, S, S, 3] model inputs, [N] scales)``: each picture resized and padded as the test images of
    a detection run (``coco.resize_pad``); a model's boxes divided by the scale are in the
    picture's pixels."""
    images, scales = [], []
    for path in paths:
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        record = {"image": pixels, "boxes": np.zeros((0, 4), np.float32), "classes": np.zeros(0, np.int32)}
        prepared = coco.resize_pad({**record, "image_id": 0}, None, size=image_size, max_boxes=0)
        images.append(prepared["image"])
        scales.append(prepared["scale"])
    return np.stack(images), np.asarray(scales, np.float32)


def detector(model: nn.Module, settings: Any, image_size: int, min_score: float) -> Any:
    """Jitted ``(variables, images) -> Detections``: the run's post-processing settings, scores above
    ``min_score``."""
    anchors = model.anchor_boxes((image_size, image_size))
    size = (image_size, image_size)

    def run(variables: Any, images: jax.Array) -> detection.Detections:
        outputs: Any = model.apply(variables, images, train=False)
        return find_objects(outputs, anchors, size, settings, score_threshold=min_score)

    return jax.jit(run)


def padded_batches(images: np.ndarray, batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, images[start : start + batch])``, the last one padded with zero images to ``batch``
    (one compiled shape for every call)."""
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        yield start, np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])


def classify(model: nn.Module, variables: Any, images: np.ndarray, batch: int) -> np.ndarray:
    """``[N, classes]`` probabilities of prepared ``images`` (:func:`train.inference.prepare`), in
    jitted batches of ``batch`` (one compiled shape)."""
    probabilities = jax.jit(lambda v, x: jax.nn.softmax(jnp.asarray(model.apply(v, x, train=False))))
    rows = [np.asarray(probabilities(variables, padded)) for _, padded in padded_batches(images, batch)]
    return np.concatenate(rows)[: len(images)]
