"""RetinaNet anchor boxes: ``num_scales x len(aspect_ratios)`` anchors per cell of each pyramid level.

Lin, Goyal, Girshick, He, Dollar. "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002,
section 4: anchors of areas 32^2 to 512^2 on levels P3 to P7 (``anchor_scale * 2**level`` with the
default 4.0), at scales {2^0, 2^(1/3), 2^(2/3)} and aspect ratios {1:2, 1:1, 2:1}: 9 per location.

Level ``l`` has stride ``2**l`` and a ``ceil(H / 2**l) x ceil(W / 2**l)`` grid, the size of the
level-``l`` feature map of a network that halves its maps with "SAME" padding; cell ``(i, j)`` is
centred at ``((i + 0.5) * 2**l, (j + 0.5) * 2**l)``. Row order: level (min..max), then grid row ``i``,
column ``j``, then anchor ``a = s * len(aspect_ratios) + r`` (scale index outer, ratio index inner),
the order of a ``[B, h, w, num_anchors * C]`` head output reshaped to ``[B, h * w * num_anchors, C]``.
Boxes are float32 ``(y1, x1, y2, x2)`` in pixels; aspect ratio = height / width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["anchor_boxes", "num_anchors_per_location"]


def num_anchors_per_location(num_scales: int, aspect_ratios: Sequence[float]) -> int:
    """Anchors per grid cell: ``num_scales * len(aspect_ratios)``."""
    _check_shapes(num_scales, aspect_ratios)
    return num_scales * len(aspect_ratios)


def _check_shapes(num_scales: int, aspect_ratios: Sequence[float]) -> None:
    if not isinstance(num_scales, int) or num_scales < 1:
        raise ValueError(f"num_scales={num_scales!r} must be a positive int")
    ratios = tuple(aspect_ratios)
    if not ratios or any(not math.isfinite(r) or r <= 0 for r in ratios):
        raise ValueError(f"aspect_ratios={ratios!r} must be a non-empty sequence of positive numbers")


def anchor_boxes(
    image_size: tuple[int, int],
    *,
    min_level: int = 3,
    max_level: int = 7,
    num_scales: int = 3,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    anchor_scale: float = 4.0,
) -> np.ndarray:
    """All anchors of an ``image_size = (H, W)`` input, float32 ``[A, 4]`` ``(y1, x1, y2, x2)``.

    ``A = sum_l ceil(H / 2**l) * ceil(W / 2**l) * num_scales * len(aspect_ratios)``; order and
    geometry as in the module docstring. Anchor ``(s, r)`` of level ``l`` has base size
    ``anchor_scale * 2**l * 2**(s / num_scales)``, height ``base * sqrt(ratio)`` and width
    ``base / sqrt(ratio)``.
    """
    _check_shapes(num_scales, aspect_ratios)
    if len(image_size) != 2 or any(not isinstance(n, int | np.integer) or n < 1 for n in image_size):
        raise ValueError(f"image_size={tuple(image_size)!r} must be (H, W) of positive ints")
    if not isinstance(min_level, int) or not isinstance(max_level, int) or not 0 <= min_level <= max_level:
        raise ValueError(
            f"min_level={min_level!r}, max_level={max_level!r} must be ints with 0 <= min <= max"
        )
    if not math.isfinite(anchor_scale) or anchor_scale <= 0:
        raise ValueError(f"anchor_scale={anchor_scale!r} must be a positive number")
    height, width = (int(n) for n in image_size)
    sqrt_ratios = np.sqrt(np.asarray(aspect_ratios, np.float64))  # R
    octaves = 2.0 ** (np.arange(num_scales) / num_scales)  # S
    levels = []
    for level in range(min_level, max_level + 1):
        stride = 2.0**level
        base = anchor_scale * stride * octaves  # S
        half_h = (base[:, None] * sqrt_ratios[None, :]).reshape(-1) / 2  # S * R, scale outer
        half_w = (base[:, None] / sqrt_ratios[None, :]).reshape(-1) / 2
        cy = (np.arange(-(-height // 2**level)) + 0.5) * stride  # h
        cx = (np.arange(-(-width // 2**level)) + 0.5) * stride  # w
        cy, cx = cy[:, None, None], cx[None, :, None]  # h, 1, 1 and 1, w, 1
        boxes = np.stack(np.broadcast_arrays(cy - half_h, cx - half_w, cy + half_h, cx + half_w), -1)
        levels.append(boxes.reshape(-1, 4))  # h, w, S * R, 4 -> h * w * S * R, 4
    return np.concatenate(levels).astype(np.float32)
