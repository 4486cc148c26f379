"""RetinaNet: the AA paper's parameter counts, output order against the anchors, heads, overrides.

The 640x640 detectors are only traced (``jax.eval_shape``); a reduced RetinaNet-18 (width 16, one block
per stage, 32 pyramid channels, P3-P5) runs for real on small non-square images.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from aacn_jax import models
from aacn_jax.detection import anchor_boxes

SMALL = dict(
    backbone_overrides=dict(width=16, stage_sizes=(1, 1, 1, 1)),
    min_level=3,
    max_level=5,
    fpn_features=32,
    head_convs=2,
    num_classes=3,
)


@functools.cache
def _abstract_params(name, input_shape=None, num_classes=80, **overrides):
    model = models.create(name, num_classes=num_classes, **overrides)
    shape = input_shape or models.get_entry(name).input_shape
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]


def _small_model(name):
    overrides = dict(SMALL)
    return models.create(name, num_classes=overrides.pop("num_classes"), **overrides)


@functools.cache
def _small_run():
    """(model, variables, images, (class_logits, box_deltas)) of the small plain RetinaNet, 96x64 input."""
    model = _small_model("retinanet_resnet18")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 96, 64, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="unsafe_rbg"), x, train=False))(x[:1])
    capture = jax.jit(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"])
    )
    return model, variables, x, capture(variables, x)


# ---------------------------------------------------------------------------------------------
# parameter counts: Bello et al. 2019 (arXiv:1904.09925), COCO table, RetinaNet at 640x640

PAPER_PARAMS_M = {
    "retinanet_resnet50": 33.4,
    "aa_retinanet_resnet50": 33.1,
    "retinanet_resnet101": 52.4,
    "aa_retinanet_resnet101": 51.7,
}


@pytest.mark.parametrize(("name", "paper"), sorted(PAPER_PARAMS_M.items()))
def test_parameter_count_matches_paper(name, paper):
    params = models.count_params(_abstract_params(name)) / 1e6
    assert abs(params - paper) / paper < 0.02, f"{name}: {params:.3f}M vs paper {paper}M"


def test_augmentation_lowers_the_count_as_in_the_paper():
    count = {name: models.count_params(_abstract_params(name)) for name in PAPER_PARAMS_M}
    assert count["aa_retinanet_resnet50"] < count["retinanet_resnet50"]  # 33.4M -> 33.1M
    assert count["aa_retinanet_resnet101"] < count["retinanet_resnet101"]  # 52.4M -> 51.7M


def test_backbone_is_the_registered_resnet_without_its_head():
    """Same parameter names and shapes as the classifier, under ``backbone``, minus ``head``."""
    for detector, classifier in (
        ("retinanet_resnet50", "resnet50"),
        ("aa_retinanet_resnet50", "aa_resnet50"),
    ):
        backbone = _abstract_params(detector)["backbone"]
        resnet = dict(_abstract_params(classifier, (640, 640, 3), num_classes=1000, min_key_depth_per_head=0))
        assert "head" in resnet and "head" not in backbone
        del resnet["head"]
        assert jax.tree.map(lambda a: a.shape, backbone) == jax.tree.map(lambda a: a.shape, resnet)


@pytest.mark.parametrize("name", ["aa_retinanet_resnet50", "aa_retinanet_resnet101"])
def test_aa_twin_has_augmented_convolutions_in_its_backbone(name):
    flat = traverse_util.flatten_dict(_abstract_params(name))
    augmented = {key[: key.index("attention")] for key in flat if "attention" in key}
    stage_sizes = models.get_entry(name.removeprefix("aa_").removeprefix("retinanet_")).factory().stage_sizes
    expected = {
        ("backbone", f"stage{s}", f"block{b}", "conv2")
        for s in (3, 4)
        for b in range(1, stage_sizes[s - 1] + 1)
    }
    assert augmented == expected
    plain = traverse_util.flatten_dict(_abstract_params(name.removeprefix("aa_")))
    assert not any("attention" in key for key in plain)


# ---------------------------------------------------------------------------------------------
# outputs: shapes, dtypes, row order = anchor order, the heads' initialisation


@pytest.mark.parametrize("name", ["retinanet_resnet18", "aa_retinanet_resnet18"])
@pytest.mark.parametrize("size", [(96, 64), (100, 72)])  # non-square; (100, 72): not divisible by 2**5
def test_output_shapes_and_row_count_match_the_anchors(name, size):
    model = _small_model(name)
    x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    class_logits, box_deltas = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    anchors = model.anchor_boxes(size)
    assert len(anchors) == sum(
        math.ceil(size[0] / 2**lv) * math.ceil(size[1] / 2**lv) * 9 for lv in (3, 4, 5)
    )
    assert class_logits.shape == (2, len(anchors), 3) and class_logits.dtype == jnp.float32
    assert box_deltas.shape == (2, len(anchors), 4) and box_deltas.dtype == jnp.float32
    np.testing.assert_array_equal(anchors, anchor_boxes(size, min_level=3, max_level=5))


def test_rows_follow_level_row_column_anchor_order():
    """Each output row is the head's per-level map at (level, i, j, anchor a): a loop over the contract's
    order, checked against the captured [B, h, w, anchors * K] maps and the anchor centres."""
    model, _, _, ((class_logits, box_deltas), state) = _small_run()
    head = state["intermediates"]["head"]
    class_maps, box_maps = head["class_predict"]["__call__"], head["box_predict"]["__call__"]
    anchors = model.anchor_boxes((96, 64))
    row = 0
    for level, class_map, box_map in zip((3, 4, 5), class_maps, box_maps, strict=True):
        height, width = class_map.shape[1:3]
        assert (height, width) == (math.ceil(96 / 2**level), math.ceil(64 / 2**level))
        for i in range(height):
            for j in range(width):
                for a in range(9):
                    np.testing.assert_array_equal(class_logits[:, row], class_map[:, i, j, a * 3 : a * 3 + 3])
                    np.testing.assert_array_equal(box_deltas[:, row], box_map[:, i, j, a * 4 : a * 4 + 4])
                    centre = (anchors[row, :2] + anchors[row, 2:]) / 2
                    np.testing.assert_allclose(centre, ((i + 0.5) * 2**level, (j + 0.5) * 2**level))
                    row += 1
    assert row == class_logits.shape[1]


def test_class_bias_starts_at_the_prior_and_head_weights_at_std_001():
    _, variables, _, ((class_logits, _), _) = _small_run()
    head = variables["params"]["head"]
    prior = -math.log((1 - 0.01) / 0.01)
    np.testing.assert_allclose(head["class_predict"]["bias"], prior, rtol=1e-6)
    np.testing.assert_array_equal(head["box_predict"]["bias"], 0.0)
    for name in ("class_conv0", "class_conv1", "box_conv0", "box_predict", "class_predict"):
        assert abs(float(jnp.std(head[name]["kernel"])) - 0.01) < 0.001, name
    assert abs(float(jnp.mean(jax.nn.sigmoid(class_logits))) - 0.01) < 0.002  # every anchor starts at ~0.01


def test_fpn_has_laterals_outputs_and_p6_p7_from_p5():
    """P6 is a 3x3/2 conv of P5 (256 -> 256 channels, not C5's 2048); P7 of ReLU(P6)."""
    fpn = _abstract_params("retinanet_resnet50")["fpn"]
    assert sorted(fpn) == sorted(
        [f"lateral{lv}" for lv in (3, 4, 5)]
        + [f"output{lv}" for lv in (3, 4, 5)]
        + ["downsample6", "downsample7"]
    )
    assert fpn["lateral3"]["kernel"].shape == (1, 1, 512, 256)
    assert fpn["lateral5"]["kernel"].shape == (1, 1, 2048, 256)
    assert fpn["downsample6"]["kernel"].shape == (3, 3, 256, 256)
    assert fpn["downsample7"]["kernel"].shape == (3, 3, 256, 256)
    head = _abstract_params("retinanet_resnet50")["head"]
    assert head["class_predict"]["kernel"].shape == (3, 3, 256, 9 * 80)
    assert head["box_predict"]["kernel"].shape == (3, 3, 256, 9 * 4)
    assert sorted(k for k in head if "conv" in k) == [
        f"{n}_conv{i}" for n in ("box", "class") for i in range(4)
    ]


# ---------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(kapa=0.3), r"\['kapa'\].*accepted overrides: .*'backbone_overrides'"),
        (dict(backbone_overrides=dict(kapa=0.3)), r"\['kapa'\]"),
        (dict(backbone_overrides=dict(features_only=False)), "features_only"),
        (dict(backbone_overrides=[("width", 8)]), "backbone_overrides=.*must be a mapping"),
        (dict(backbone_overrides=dict(stem="cifar")), "stem='cifar'"),
        (dict(min_level=1), "min_level=1 must be a backbone level in 2..5"),
        (dict(min_level=6, max_level=7), "min_level=6"),
        (dict(min_level=4, max_level=3), "max_level=3 must be an int >= min_level=4"),
        (dict(fpn_features=0), "fpn_features=0"),
        (dict(head_convs=-1), "head_convs=-1"),
        (dict(num_scales=0), "num_scales=0"),
        (dict(aspect_ratios=()), r"aspect_ratios=\(\)"),
        (dict(anchor_scale=-1.0), "anchor_scale=-1.0"),
    ],
)
def test_bad_overrides_raise_at_create(overrides, message):
    with pytest.raises(ValueError, match=message):
        models.create("aa_retinanet_resnet50", num_classes=80, **overrides)


def test_zero_classes_raise():
    with pytest.raises(ValueError, match="num_classes=0"):
        models.create("retinanet_resnet50", num_classes=0)
