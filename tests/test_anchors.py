"""Anchor boxes against a brute-force loop written from the detection contract's words."""

import math

import numpy as np
import pytest

from aacn_jax.detection import anchor_boxes, num_anchors_per_location


def _reference(image_size, min_level, max_level, num_scales, aspect_ratios, anchor_scale):
    """One box at a time: level -> row i -> column j -> scale s -> ratio r."""
    height, width = image_size
    rows = []
    for level in range(min_level, max_level + 1):
        stride = 2**level
        for i in range(math.ceil(height / stride)):
            for j in range(math.ceil(width / stride)):
                cy, cx = (i + 0.5) * stride, (j + 0.5) * stride
                for s in range(num_scales):
                    for ratio in aspect_ratios:
                        base = anchor_scale * stride * 2 ** (s / num_scales)
                        h, w = base * math.sqrt(ratio), base / math.sqrt(ratio)
                        rows.append((cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2))
    return np.array(rows)


@pytest.mark.parametrize(
    ("image_size", "kwargs"),
    [
        ((128, 128), dict()),
        ((96, 160), dict(min_level=3, max_level=5)),  # non-square, divisible by 2**5
        ((100, 37), dict()),  # not divisible by the strides: ceil grids, P7 is 1x1
        ((64, 48), dict(min_level=2, max_level=4, num_scales=2, aspect_ratios=(1.0, 3.0), anchor_scale=2.5)),
    ],
)
def test_anchor_boxes_match_the_brute_force_loop(image_size, kwargs):
    settings = dict(min_level=3, max_level=7, num_scales=3, aspect_ratios=(0.5, 1.0, 2.0), anchor_scale=4.0)
    settings.update(kwargs)
    got = anchor_boxes(image_size, **kwargs)
    want = _reference(image_size, **settings)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_paper_anchor_areas_and_ratios():
    """Lin et al.: areas 32^2 .. 512^2 on P3 .. P7, scales 2^{0, 1/3, 2/3}, ratios 1:2, 1:1, 2:1."""
    boxes = anchor_boxes((128, 128)).astype(np.float64)
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    first_cell = {3: 0, 7: len(boxes) - 9}  # the first cell of P3; P7 is a single 1x1 cell at 128x128
    for level, start in first_cell.items():
        area = (h * w)[start : start + 9].reshape(3, 3)  # scale, ratio
        expected = (4 * 2**level * 2 ** (np.arange(3) / 3)) ** 2
        np.testing.assert_allclose(area, np.repeat(expected[:, None], 3, 1), rtol=1e-6)
        np.testing.assert_allclose((h / w)[start : start + 3], [0.5, 1.0, 2.0], rtol=1e-6)
    assert num_anchors_per_location(3, (0.5, 1.0, 2.0)) == 9
    assert num_anchors_per_location(2, (1.0,)) == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: anchor_boxes((0, 64)), r"image_size=\(0, 64\)"),
        (lambda: anchor_boxes((64,)), r"image_size=\(64,\)"),
        (lambda: anchor_boxes((64.0, 64)), "image_size"),
        (lambda: anchor_boxes((64, 64), min_level=5, max_level=4), "min_level=5, max_level=4"),
        (lambda: anchor_boxes((64, 64), num_scales=0), "num_scales=0"),
        (lambda: anchor_boxes((64, 64), aspect_ratios=()), r"aspect_ratios=\(\)"),
        (lambda: anchor_boxes((64, 64), aspect_ratios=(1.0, -2.0)), "aspect_ratios"),
        (lambda: anchor_boxes((64, 64), anchor_scale=0.0), "anchor_scale=0.0"),
        (lambda: num_anchors_per_location(3, ()), "aspect_ratios"),
        (lambda: num_anchors_per_location(1.5, (1.0,)), "num_scales=1.5"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()
