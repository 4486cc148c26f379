"""The detection task (``config.task = "detection"``): RetinaNet losses in training, COCO AP in evaluation.

The model is a registered RetinaNet (``aacn_jax.models.create('aa_retinanet_resnet50', ...)``): its
outputs are ``(class_logits [B, A, C], box_deltas [B, A, 4])`` in the row order of its
``anchor_boxes``. Targets are assigned to the anchors inside the jitted step (``assign_targets``,
vmapped over the batch), so records carry only their padded boxes. Evaluation decodes, thresholds
and suppresses on the devices (``detect``: fixed ``max_detections`` per image), maps the boxes back
to each image's pixels on the host and scores them with pycocotools.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aacn_jax import detection
from train.data import coco
from train.data.dataset import Dataset, Layout
from train.errors import InputError
from train.tasks import coco_eval
from train.tasks.task import Batch, Task


def detection_loss(
    outputs: tuple[jax.Array, jax.Array], batch: Batch, *, anchors: np.ndarray, settings: dict[str, Any]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Focal loss + weighted Huber box loss (:func:`aacn_jax.detection.retinanet_loss`) of a batch;
    metrics: the two parts and the mean number of foreground anchors per image."""
    class_logits, box_deltas = outputs
    assign = functools.partial(
        detection.assign_targets,
        foreground_iou=settings["foreground_iou"],
        background_iou=settings["background_iou"],
    )
    class_targets, box_targets = jax.vmap(assign, in_axes=(None, 0, 0, 0))(
        jnp.asarray(anchors), batch["boxes"], batch["classes"], batch["valid"]
    )
    loss, parts = detection.retinanet_loss(
        class_logits,
        box_deltas,
        class_targets,
        box_targets,
        alpha=settings["focal_alpha"],
        gamma=settings["focal_gamma"],
        huber_delta=settings["huber_delta"],
        box_loss_weight=settings["box_loss_weight"],
    )
    return loss, {
        "class_loss": parts["class_loss"],
        "box_loss": parts["box_loss"],
        "foreground_anchors": parts["num_foreground"] / class_logits.shape[0],
    }


def find_objects(
    outputs: tuple[jax.Array, jax.Array],
    anchors: np.ndarray,
    image_size: tuple[int, int],
    settings: Any,
    *,
    score_threshold: float | None = None,
) -> detection.Detections:
    """:func:`aacn_jax.detection.detect` on a RetinaNet's outputs with a run's ``config.detection``
    ``settings`` (a dict or ConfigDict); ``score_threshold`` replaces the settings' one."""
    class_logits, box_deltas = outputs
    return detection.detect(
        class_logits,
        box_deltas,
        jnp.asarray(anchors),
        image_size=image_size,
        pre_nms_top_k=settings["pre_nms_top_k"],
        score_threshold=settings["score_threshold"] if score_threshold is None else score_threshold,
        iou_threshold=settings["nms_iou"],
        max_detections=settings["max_detections"],
    )


def detection_eval_step(
    state: Any, batch: Batch, *, anchors: np.ndarray, image_size: tuple[int, int], settings: dict[str, Any]
) -> dict[str, jax.Array]:
    """The batch's detections (:func:`find_objects`), with each record's ``image_id`` (0 for padding
    records) and ``scale``."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    found = find_objects(
        state.apply_fn(variables, batch["image"], train=False), anchors, image_size, settings
    )
    image_id = jnp.where(batch["mask"] > 0, batch["image_id"], 0)
    return {
        "boxes": found.boxes,
        "scores": found.scores,
        "classes": found.classes,
        "valid": found.valid,
        "image_id": image_id,
        "scale": batch["scale"],
    }


def coco_results(outputs: list[dict[str, np.ndarray]], *, instances: dict[str, Any]) -> dict[str, float]:
    """COCO AP and AR (pycocotools) of every test batch's detections against ``instances``."""
    ids = coco.category_ids(instances)
    results = []
    for output in outputs:
        results += coco_eval.to_coco_results(
            output["boxes"],
            output["scores"],
            output["classes"],
            output["valid"],
            image_ids=output["image_id"],
            scales=output["scale"],
            category_ids=ids,
        )
    return coco_eval.coco_metrics(instances, results)


def detection_headline(results: dict[str, float]) -> str:
    return (
        f"AP {results['ap']:.3f} (AP50 {results['ap50']:.3f}, AP75 {results['ap75']:.3f}, "
        f"AR100 {results['ar100']:.3f})"
    )


def detection_task(config: ml_collections.ConfigDict, model: Any, data: Layout) -> Task:
    """The detection :class:`~train.tasks.task.Task` of a RetinaNet ``model`` on a COCO-format ``data``
    set, with the run's ``config.detection`` settings; of a :class:`~train.data.dataset.Layout` alone
    (compiling a run), without ``finish``."""
    if not hasattr(model, "anchor_boxes"):
        raise InputError(
            "task='detection' needs a detection model (e.g. 'aa_retinanet_resnet50'), "
            f"got {type(model).__name__}"
        )
    finish = None
    if isinstance(data, Dataset):
        if not isinstance(data.test, coco.CocoSource):
            raise ValueError("task='detection' evaluates against COCO-format test instances (a CocoSource)")
        finish = functools.partial(coco_results, instances=data.test.instances)
    image_size = (data.image_shape[0], data.image_shape[1])
    anchors = model.anchor_boxes(image_size)
    plain = config.detection.to_dict()
    return Task(
        functools.partial(detection_loss, anchors=anchors, settings=plain),
        functools.partial(detection_eval_step, anchors=anchors, image_size=image_size, settings=plain),
        finish,
        detection_headline,
    )
