"""RetinaNet anchor labelling: which anchors are foreground, background or ignored, and their box targets.

Lin, Goyal, Girshick, He, Dollar. "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002,
section 4: "anchors are assigned to ground-truth object boxes using an intersection-over-union (IoU)
threshold of 0.5; and to background if their IoU is in [0, 0.4) ... If an anchor is unassigned, which may
happen with overlap in [0.4, 0.5), it is ignored during training" (the RPN rule of Ren et al.,
arXiv:1506.01497, with adjusted thresholds). The low-quality matches, which keep a small or oddly shaped
object from having no anchor at all, are RPN's second rule, as in Detectron's and torchvision's matchers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from aacn_jax.detection.boxes import box_iou, encode_boxes

__all__ = ["BACKGROUND", "IGNORED", "assign_targets"]

BACKGROUND = -1  # class target of an anchor whose best IoU is below background_iou
IGNORED = -2  # class target of an anchor in the band [background_iou, foreground_iou): no loss at all


def assign_targets(
    anchors: jax.Array,
    boxes: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    *,
    foreground_iou: float = 0.5,
    background_iou: float = 0.4,
    match_low_quality: bool = True,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> tuple[jax.Array, jax.Array]:
    """Class and box targets of ``anchors [A, 4]`` for one image's ``boxes [N, 4]``.

    ``classes [N]`` int and ``valid [N]`` bool: rows with ``valid`` False are padding and never match,
    so a batch of images with a fixed N can be ``jax.vmap``-ed.

    Each anchor takes the valid box of highest IoU (ties: lowest box index). Class target: that box's
    class where the IoU is ``>= foreground_iou``, ``-1`` (``BACKGROUND``) where it is
    ``< background_iou``, ``-2`` (``IGNORED``) in between. With ``match_low_quality`` every valid
    box also makes the anchor(s) of its highest IoU (ties: all of them; only if that IoU > 0)
    foreground; such an anchor keeps its own highest-IoU box. No valid box: every anchor is background.

    Returns ``(class_targets [A] int32, box_targets [A, 4] float32)``; box targets are
    ``encode_boxes(matched box, anchor, weights=weights)`` on foreground anchors and exactly 0 elsewhere.
    """
    if not 0.0 <= background_iou <= foreground_iou <= 1.0:
        raise ValueError(
            f"background_iou={background_iou}, foreground_iou={foreground_iou}: "
            "need 0 <= background_iou <= foreground_iou <= 1"
        )
    anchors = jnp.asarray(anchors, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)
    classes = jnp.asarray(classes, jnp.int32)
    valid = jnp.asarray(valid, bool)
    if anchors.ndim != 2 or anchors.shape[1] != 4:
        raise ValueError(f"anchors has shape {anchors.shape}: must be [A, 4]")
    num_boxes = boxes.shape[0] if boxes.ndim == 2 else -1
    if boxes.shape != (num_boxes, 4) or classes.shape != (num_boxes,) or valid.shape != (num_boxes,):
        raise ValueError(
            f"boxes {boxes.shape}, classes {classes.shape}, valid {valid.shape}: must be [N, 4], [N], [N]"
        )
    num_anchors = anchors.shape[0]
    if num_boxes == 0:
        return jnp.full((num_anchors,), BACKGROUND, jnp.int32), jnp.zeros((num_anchors, 4), jnp.float32)
    return _assign(
        anchors,
        boxes,
        classes,
        valid,
        foreground_iou,
        background_iou,
        match_low_quality=match_low_quality,
        weights=tuple(weights),
    )


@functools.partial(jax.jit, static_argnames=["match_low_quality", "weights"])  # thresholds traced
def _assign(
    anchors: jax.Array,
    boxes: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    foreground_iou: float,
    background_iou: float,
    *,
    match_low_quality: bool,
    weights: tuple[float, ...],
) -> tuple[jax.Array, jax.Array]:
    """The body of :func:`assign_targets` for N >= 1 boxes, jitted once per shape and setting."""
    iou = jnp.where(valid[None, :], box_iou(anchors, boxes), -1.0)  # A, N; padding never wins
    matched = jnp.argmax(iou, axis=1)  # A; first maximum = lowest box index
    best_iou = jnp.max(iou, axis=1)  # A; -1 when no box is valid
    foreground = best_iou >= foreground_iou
    if match_low_quality:
        per_box_best = jnp.max(iou, axis=0)  # N; -1 for padding
        claimed = (iou == per_box_best[None, :]) & (per_box_best[None, :] > 0.0)  # A, N
        foreground = foreground | jnp.any(claimed, axis=1)
    class_targets = jnp.where(
        foreground, classes[matched], jnp.where(best_iou < background_iou, BACKGROUND, IGNORED)
    )
    # Non-foreground anchors encode themselves: exact zeros, and no log(0) from a padding box.
    targets_for = jnp.where(foreground[:, None], boxes[matched], anchors)  # A, 4
    return class_targets.astype(jnp.int32), encode_boxes(targets_for, anchors, weights=weights)
