"""Box geometry for RetinaNet: areas, IoU, the R-CNN box coding, clipping.

Lin, Goyal, Girshick, He, Dollar. "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002,
regress "the offset between each anchor and its assigned object box" with the R-CNN parametrisation
(Girshick et al., arXiv:1311.2524): centre offsets in units of the anchor's size, log size ratios.

Convention everywhere: float32 boxes ``(y1, x1, y2, x2)`` in pixels, y down, x right; a box is valid
when ``y2 > y1`` and ``x2 > x1``. Height ``h = y2 - y1``, centre ``cy = y1 + h / 2`` (no "+1").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["box_area", "box_iou", "clip_boxes", "decode_boxes", "encode_boxes"]

# exp(log(1000 / 16)): a delta may grow a box at most 62.5x (Detectron's bbox_xform_clip).
DEFAULT_MAX_LOG_SCALE = math.log(1000.0 / 16.0)


def _as_boxes(boxes: jax.Array, name: str) -> jax.Array:
    boxes = jnp.asarray(boxes, jnp.float32)
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} has shape {boxes.shape}: the last dimension must be 4 (y1, x1, y2, x2)")
    return boxes


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    if len(weights) != 4 or any(w <= 0 for w in weights):
        raise ValueError(f"weights={tuple(weights)} must be 4 positive numbers (wy, wx, wh, ww)")
    wy, wx, wh, ww = (float(w) for w in weights)
    return wy, wx, wh, ww


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``[..., 4] -> (cy, cx, h, w)``, each ``[...]``."""
    y1, x1, y2, x2 = jnp.moveaxis(boxes, -1, 0)
    h, w = y2 - y1, x2 - x1
    return y1 + 0.5 * h, x1 + 0.5 * w, h, w


def box_area(boxes: jax.Array) -> jax.Array:
    """``[..., 4] -> [...]``: ``max(0, y2 - y1) * max(0, x2 - x1)`` (an inverted box has area 0)."""
    boxes = _as_boxes(boxes, "boxes")
    y1, x1, y2, x2 = jnp.moveaxis(boxes, -1, 0)
    return jnp.maximum(y2 - y1, 0.0) * jnp.maximum(x2 - x1, 0.0)


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Intersection over union ``a [..., N, 4], b [..., M, 4] -> [..., N, M]``.

    Leading dimensions broadcast. IoU is 0 where the union is 0 (two zero-area boxes); boxes that
    only touch have intersection 0.
    """
    a, b = _as_boxes(a, "a"), _as_boxes(b, "b")
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"a {a.shape} and b {b.shape} must be [..., N, 4] and [..., M, 4]")
    lo = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])  # ..., N, M, 2 (top, left)
    hi = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])  # ..., N, M, 2 (bottom, right)
    intersection = jnp.prod(jnp.maximum(hi - lo, 0.0), axis=-1)  # ..., N, M
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - intersection  # ..., N, M
    positive = union > 0
    return jnp.where(positive, intersection / jnp.where(positive, union, 1.0), 0.0)


def encode_boxes(
    boxes: jax.Array, anchors: jax.Array, *, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> jax.Array:
    """Regression targets of ``boxes`` relative to ``anchors`` (both ``[..., 4]``, broadcast).

    ``(ty, tx, th, tw) = (wy (cy - cya) / ha, wx (cx - cxa) / wa, wh log(h / ha), ww log(w / wa))``.
    Both must have positive height and width (the logs of a zero size are -inf).
    """
    wy, wx, wh, ww = _check_weights(weights)
    cy, cx, h, w = _centre_size(_as_boxes(boxes, "boxes"))
    cya, cxa, ha, wa = _centre_size(_as_boxes(anchors, "anchors"))
    deltas = (wy * (cy - cya) / ha, wx * (cx - cxa) / wa, wh * jnp.log(h / ha), ww * jnp.log(w / wa))
    return jnp.stack(deltas, axis=-1)  # ..., 4


def decode_boxes(
    deltas: jax.Array,
    anchors: jax.Array,
    *,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    max_log_scale: float = DEFAULT_MAX_LOG_SCALE,
) -> jax.Array:
    """Inverse of :func:`encode_boxes`: ``deltas [..., 4]`` on ``anchors [..., 4]`` -> boxes ``[..., 4]``.

    ``cy = cya + ha ty / wy``, ``h = ha exp(min(th / wh, max_log_scale))`` (likewise x, w): the
    log-scale is clipped after removing its weight, before ``exp``, so a wild prediction cannot
    overflow. The default ``log(1000 / 16)`` is Detectron's.
    """
    wy, wx, wh, ww = _check_weights(weights)
    deltas = _as_boxes(deltas, "deltas")
    cya, cxa, ha, wa = _centre_size(_as_boxes(anchors, "anchors"))
    ty, tx, th, tw = jnp.moveaxis(deltas, -1, 0)
    cy, cx = cya + ty / wy * ha, cxa + tx / wx * wa
    h = ha * jnp.exp(jnp.minimum(th / wh, max_log_scale))
    w = wa * jnp.exp(jnp.minimum(tw / ww, max_log_scale))
    return jnp.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)  # ..., 4


def clip_boxes(boxes: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """Clip ``boxes [..., 4]`` to the image ``(height, width)``: y to ``[0, H]``, x to ``[0, W]``."""
    if len(image_size) != 2 or any(s <= 0 for s in image_size):
        raise ValueError(f"image_size={tuple(image_size)} must be (height, width), both positive")
    height, width = image_size
    upper = jnp.array([height, width, height, width], jnp.float32)
    return jnp.clip(_as_boxes(boxes, "boxes"), 0.0, upper)
