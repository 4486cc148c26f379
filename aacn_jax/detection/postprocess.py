"""RetinaNet inference: greedy non-maximum suppression and batched, class-aware detection, jittable.

Lin, Goyal, Girshick, He, Dollar. "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002,
section 4.1: keep the top-scoring predictions "after thresholding detector confidence at 0.05", decode
them, "and non-maximum suppression with a threshold of 0.5 is applied to yield the final detections".
The paper takes the top 1000 per pyramid level; :func:`detect` takes the top ``pre_nms_top_k`` over all
anchors and classes at once (it sees the anchors flattened). Every output has a fixed size, so the whole
post-processing jits and runs on the accelerator.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from aacn_jax.detection.boxes import box_iou, clip_boxes, decode_boxes

__all__ = ["Detections", "detect", "non_max_suppression"]


class Detections(NamedTuple):
    """Fixed-size detections of a batch; rows with ``valid`` False are padding (box and score 0, class -1).

    Valid rows come first, in descending score order.
    """

    boxes: jax.Array  # [B, D, 4] float32 (y1, x1, y2, x2) in input pixels
    scores: jax.Array  # [B, D] float32 sigmoid probabilities
    classes: jax.Array  # [B, D] int32
    valid: jax.Array  # [B, D] bool


def _check_nms_arguments(iou_threshold: float, max_outputs: int, max_outputs_name: str) -> None:
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold={iou_threshold} must be in [0, 1]")
    if max_outputs < 1:
        raise ValueError(f"{max_outputs_name}={max_outputs} must be >= 1")


@functools.partial(jax.jit, static_argnames=["max_outputs"])  # thresholds traced: one compile per shape
def _greedy_nms(
    iou: jax.Array, scores: jax.Array, iou_threshold: float, score_threshold: float, max_outputs: int
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS given the pairwise ``iou [N, N]`` of ``scores [N]``; see :func:`non_max_suppression`."""
    num = scores.shape[0]
    order = jnp.argsort(-scores, stable=True)  # N; descending, equal scores by lower index
    iou = iou[order][:, order]  # N, N in score order
    keep = scores[order] > score_threshold  # N; NaN scores are never kept
    positions = jnp.arange(num)
    # Candidates above the threshold come first in score order, and only they can suppress; once
    # max_outputs are kept, later ones cannot change the first max_outputs: the loop stops there.
    candidates = jnp.sum(keep)

    def unfinished(carry: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        i, _, kept = carry
        return (i < candidates) & (kept < max_outputs)

    def visit(carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        # A kept candidate suppresses every later candidate it overlaps by more than the threshold.
        i, keep, kept = carry
        keep = keep & ~(keep[i] & (positions > i) & (iou[i] > iou_threshold))
        return i + 1, keep, kept + keep[i]

    _, keep, _ = jax.lax.while_loop(unfinished, visit, (jnp.int32(0), keep, jnp.int32(0)))
    (kept,) = jnp.nonzero(keep, size=max_outputs, fill_value=0)  # max_outputs; positions in score order
    valid = jnp.arange(max_outputs) < jnp.sum(keep)
    indices = jnp.where(valid, order[kept], 0)
    return indices.astype(jnp.int32), valid


def non_max_suppression(
    boxes: jax.Array,
    scores: jax.Array,
    *,
    iou_threshold: float = 0.5,
    max_outputs: int = 100,
    score_threshold: float = float("-inf"),
) -> tuple[jax.Array, jax.Array]:
    """Greedy non-maximum suppression of ``boxes [N, 4]`` with ``scores [N]``; jittable, vmappable.

    Candidates are the boxes with ``score > score_threshold``. Visiting them in descending score
    (equal scores: lower index first), each box still kept removes every later box whose IoU with it is
    ``> iou_threshold``. Returns ``(indices [max_outputs] int32, valid [max_outputs] bool)``: the indices
    into ``boxes`` of the first ``max_outputs`` kept boxes in descending score, then padding (index 0,
    valid False). Memory is O(N^2) (the IoU matrix), time N sequential steps of O(N).
    """
    _check_nms_arguments(iou_threshold, max_outputs, "max_outputs")
    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"boxes {boxes.shape} and scores {scores.shape} must be [N, 4] and [N]")
    if boxes.shape[0] == 0:
        return jnp.zeros((max_outputs,), jnp.int32), jnp.zeros((max_outputs,), bool)
    return _greedy_nms(box_iou(boxes, boxes), scores, iou_threshold, score_threshold, max_outputs)


def detect(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    anchors: jax.Array,
    *,
    image_size: tuple[int, int],
    pre_nms_top_k: int = 1000,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Detections:
    """Detections from RetinaNet outputs ``class_logits [B, A, C]`` and ``box_deltas [B, A, 4]``.

    Per image: scores ``sigmoid(class_logits)``; the top ``min(pre_nms_top_k, A C)`` (anchor, class)
    pairs over all anchors and classes; their boxes decoded on ``anchors [A, 4]``
    (:func:`decode_boxes` with ``weights``) and clipped to ``image_size = (height, width)``; then
    class-aware :func:`non_max_suppression` (boxes of different classes never suppress each other;
    an anchor may yield boxes of several classes) keeping ``score > score_threshold``. Returns
    :class:`Detections` with ``D = max_detections`` rows per image.
    """
    _check_nms_arguments(iou_threshold, max_detections, "max_detections")
    if pre_nms_top_k < 1:
        raise ValueError(f"pre_nms_top_k={pre_nms_top_k} must be >= 1")
    class_logits = jnp.asarray(class_logits, jnp.float32)
    box_deltas = jnp.asarray(box_deltas, jnp.float32)
    anchors = jnp.asarray(anchors, jnp.float32)
    if class_logits.ndim != 3:
        raise ValueError(f"class_logits has shape {class_logits.shape}: must be [B, A, C]")
    batch, num_anchors, num_classes = class_logits.shape
    if box_deltas.shape != (batch, num_anchors, 4) or anchors.shape != (num_anchors, 4):
        raise ValueError(
            f"box_deltas {box_deltas.shape} and anchors {anchors.shape} must be "
            f"{(batch, num_anchors, 4)} and {(num_anchors, 4)} to match class_logits {class_logits.shape}"
        )
    return _detect(
        class_logits,
        box_deltas,
        anchors,
        score_threshold,
        iou_threshold,
        image_size=tuple(image_size),
        top_k=min(pre_nms_top_k, num_anchors * num_classes),
        max_detections=max_detections,
        weights=tuple(weights),
    )


@functools.partial(jax.jit, static_argnames=["image_size", "top_k", "max_detections", "weights"])
def _detect(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    anchors: jax.Array,
    score_threshold: float,
    iou_threshold: float,
    *,
    image_size: tuple[int, int],
    top_k: int,
    max_detections: int,
    weights: tuple[float, ...],
) -> Detections:
    """The body of :func:`detect`, jitted once per shape and static setting (thresholds are traced)."""
    num_classes = class_logits.shape[-1]

    def one_image(logits: jax.Array, deltas: jax.Array) -> Detections:
        scores, flat = jax.lax.top_k(jax.nn.sigmoid(logits).reshape(-1), top_k)  # K; K (anchor * C + class)
        anchor, cls = flat // num_classes, flat % num_classes  # K, K
        boxes = clip_boxes(decode_boxes(deltas[anchor], anchors[anchor], weights=weights), image_size)  # K, 4
        iou = jnp.where(cls[:, None] == cls[None, :], box_iou(boxes, boxes), 0.0)  # K, K; 0 across classes
        kept, valid = _greedy_nms(iou, scores, iou_threshold, score_threshold, max_detections)  # D, D
        return Detections(
            boxes=jnp.where(valid[:, None], boxes[kept], 0.0),
            scores=jnp.where(valid, scores[kept], 0.0),
            classes=jnp.where(valid, cls[kept], -1).astype(jnp.int32),
            valid=valid,
        )

    result: Detections = jax.vmap(one_image)(class_logits, box_deltas)
    return result
