"""RetinaNet on the zoo's ResNets: a feature pyramid, the class and box subnets, AA twins.

Lin, Goyal, Girshick, He, Dollar. "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002;
Lin et al. "Feature Pyramid Networks for Object Detection", CVPR 2017, arXiv:1612.03144;
Bello et al. "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925 (COCO table:
RetinaNet on ResNet-50 33.4M parameters, AA-ResNet-50 33.1M, ResNet-101 52.4M, AA-ResNet-101 51.7M).

Choices, each checked against those parameter counts (640x640 input, 80 classes, see docs/zoo.md):
  * P6 is a 3x3/2 convolution of P5, not of C5 as in Lin et al.: as in Google's TPU RetinaNet (the
    AA paper's authors' code base, e.g. ``google/automl`` ``efficientdet/retinanet_arch.py``). From C5
    it would cost 4.1M more parameters (ResNet-50: 37.97M, +14% over the paper).
  * ``num_classes`` = 80 COCO object classes (no background row): 90 or 91 COCO ids add 0.21M / 0.23M
    and move every model further from the paper (all four stay within 2% with either).
  * No BatchNorm in the FPN or the subnets (Lin et al.); the TPU code's per-level BatchNorm would add
    23k parameters (0.07%), which the counts cannot tell apart.
  * AA twins: the AA-ResNet backbone without the 20-key-dims-per-head floor of the classification
    twins (``min_key_depth_per_head=0``, dk = 0.2 Fout exactly): the paper's AA detectors have fewer
    parameters than the plain ones (-0.3M, -0.7M), which that floor (+0.12M, +0.71M) contradicts.
Not stated in the paper: FPN initialisation (here Glorot uniform, as Detectron); the backbone is
trained from its own initialisation (the library holds no pretrained weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aacn_jax import detection
from aacn_jax.models.registry import build, get_entry, register
from aacn_jax.models.resnet import ResNet

__all__ = ["FeaturePyramid", "RetinaHead", "RetinaNet"]

COCO_INPUT = (640, 640, 3)
COCO_CLASSES = 80
SMALL_INPUT = (128, 128, 3)
# Backbone output i (a zoo ResNet's stage i + 1, ImageNet stem) is level i + 2: C2 .. C5.
BACKBONE_MIN_LEVEL = 2
PRIOR_PROBABILITY = 0.01  # Lin et al. section 4.1: the class bias starts at -log((1 - pi) / pi)


def check_min_level(min_level: int, top: int) -> None:
    """ValueError unless ``min_level`` is a backbone level (C2 .. C_top) that has a lateral."""
    if not isinstance(min_level, int) or not BACKBONE_MIN_LEVEL <= min_level <= top:
        raise ValueError(f"min_level={min_level!r} must be a backbone level in {BACKBONE_MIN_LEVEL}..{top}")


def _upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour upsampling by 2 in height and width."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FeaturePyramid(nn.Module):
    """FPN outputs P_min .. P_max (``features`` channels each) from backbone maps C2, C3, ...

    Laterals (1x1) on C_min .. C_top (top = the backbone's coarsest level), a top-down path of
    nearest upsampling by 2 (cropped to the finer grid when a size is odd) and addition, then a
    3x3 convolution on each sum; above C_top, 3x3/2 convolutions: the first on P_top, the next on
    ReLU of the previous one (Lin et al. 2017; P6 from P_top as in the TPU RetinaNet).
    """

    min_level: int
    max_level: int
    features: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], *, train: bool) -> tuple[jax.Array, ...]:
        del train
        top = BACKBONE_MIN_LEVEL + len(feats) - 1
        check_min_level(self.min_level, top)

        def conv(kernel_size: int, strides: int, name: str) -> nn.Conv:
            return nn.Conv(
                self.features,
                (kernel_size, kernel_size),
                (strides, strides),
                padding="SAME",
                kernel_init=nn.initializers.glorot_uniform(),
                dtype=self.dtype,
                name=name,
            )

        last = min(top, self.max_level)
        pyramid: dict[int, jax.Array] = {}
        for level in range(last, self.min_level - 1, -1):  # top-down
            lateral = conv(1, 1, f"lateral{level}")(feats[level - BACKBONE_MIN_LEVEL])
            if level < last:
                height, width = lateral.shape[1:3]
                lateral = lateral + _upsample2(pyramid[level + 1])[:, :height, :width]
            pyramid[level] = lateral
        outputs = {level: conv(3, 1, f"output{level}")(p) for level, p in pyramid.items()}
        for level in range(top + 1, self.max_level + 1):
            x = outputs[level - 1] if level == top + 1 else nn.relu(outputs[level - 1])
            outputs[level] = conv(3, 2, f"downsample{level}")(x)
        return tuple(outputs[level] for level in range(self.min_level, self.max_level + 1))


class RetinaHead(nn.Module):
    """The class and box subnets, shared across levels, with outputs flattened in anchor order.

    Each subnet: ``num_convs`` 3x3 convolutions of ``features`` channels with ReLU, then a 3x3
    convolution to ``num_anchors * num_classes`` (class logits, bias ``-log((1 - 0.01) / 0.01)``)
    or ``num_anchors * 4`` (box deltas); weights N(0, 0.01^2), other biases 0 (Lin et al. 4.1).
    Level outputs ``[B, h, w, num_anchors * K]`` become ``[B, h * w * num_anchors, K]`` and are
    concatenated from the finest level up: the row order of :func:`aacn_jax.detection.anchor_boxes`.
    """

    num_classes: int
    num_anchors: int
    features: int = 256
    num_convs: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pyramid: Sequence[jax.Array], *, train: bool) -> tuple[jax.Array, jax.Array]:
        del train

        def conv(features: int, name: str, bias_init: Any = None) -> nn.Conv:
            return nn.Conv(
                features,
                (3, 3),
                padding="SAME",
                kernel_init=nn.initializers.normal(0.01),
                bias_init=bias_init or nn.initializers.zeros_init(),
                dtype=self.dtype,
                name=name,
            )

        prior = nn.initializers.constant(-math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        subnets = {
            "class": (
                [conv(self.features, f"class_conv{i}") for i in range(self.num_convs)],
                conv(self.num_anchors * self.num_classes, "class_predict", prior),
                self.num_classes,
            ),
            "box": (
                [conv(self.features, f"box_conv{i}") for i in range(self.num_convs)],
                conv(self.num_anchors * 4, "box_predict"),
                4,
            ),
        }
        outputs = []
        for convs, predict, width in subnets.values():
            rows = []
            for x in pyramid:  # the same layers on every level
                for layer in convs:
                    x = nn.relu(layer(x))
                y = predict(x)  # B, h, w, num_anchors * width
                rows.append(y.reshape(y.shape[0], -1, width).astype(jnp.float32))  # B, h * w * anchors, width
            outputs.append(jnp.concatenate(rows, axis=1))
        class_logits, box_deltas = outputs
        return class_logits, box_deltas


class RetinaNet(nn.Module):
    """RetinaNet: ``backbone`` -> ``FeaturePyramid`` -> ``RetinaHead``.

    ``__call__(images [B, H, W, 3], *, train)`` returns float32 ``(class_logits [B, A, num_classes],
    box_deltas [B, A, 4])``, rows in the order of :meth:`anchor_boxes` for the same ``(H, W)``. Any
    ``H, W`` works: level ``l`` has a ``ceil(H / 2**l) x ceil(W / 2**l)`` grid (the stride-2
    convolutions and pools use "SAME"-like padding), as ``anchor_boxes`` assumes; a backbone whose
    maps differ raises ValueError. Parameters: ``backbone``, ``fpn``, ``head``.

    Attributes:
      backbone: returns its stage outputs C2, C3, ... (strides 4, 8, ...): a zoo
        :class:`~aacn_jax.models.ResNet` with ``features_only=True`` and the ImageNet stem.
      num_classes: object classes (sigmoid outputs, no background class).
      min_level, max_level: pyramid levels P_min .. P_max (stride ``2**level``); ``min_level`` >= 2
        and at most the backbone's coarsest level (5 for a 4-stage ResNet).
      fpn_features: channels of the pyramid and of the subnets' convolutions.
      head_convs: 3x3 convolutions in each subnet before its prediction layer.
      num_scales, aspect_ratios, anchor_scale: anchors per location (see
        :func:`aacn_jax.detection.anchor_boxes`).
      dtype: computation dtype of the pyramid and the heads; outputs are float32.
    """

    backbone: nn.Module
    num_classes: int
    min_level: int = 3
    max_level: int = 7
    fpn_features: int = 256
    head_convs: int = 4
    num_scales: int = 3
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    anchor_scale: float = 4.0
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes!r} must be a positive int")
        if not isinstance(self.fpn_features, int) or self.fpn_features < 1:
            raise ValueError(f"fpn_features={self.fpn_features!r} must be a positive int")
        if not isinstance(self.head_convs, int) or self.head_convs < 0:
            raise ValueError(f"head_convs={self.head_convs!r} must be a non-negative int")
        if isinstance(self.backbone, ResNet):  # other backbones are checked when called
            if not self.backbone.features_only or self.backbone.stem != "imagenet":
                raise ValueError(
                    f"backbone must be a ResNet with features_only=True and stem='imagenet', got "
                    f"features_only={self.backbone.features_only}, stem={self.backbone.stem!r}"
                )
            check_min_level(self.min_level, BACKBONE_MIN_LEVEL + len(self.backbone.stage_sizes) - 1)
        if not isinstance(self.max_level, int) or self.max_level < self.min_level:
            raise ValueError(f"max_level={self.max_level!r} must be an int >= min_level={self.min_level}")
        detection.num_anchors_per_location(self.num_scales, self.aspect_ratios)  # validates both
        if not math.isfinite(self.anchor_scale) or self.anchor_scale <= 0:
            raise ValueError(f"anchor_scale={self.anchor_scale!r} must be a positive number")
        super().__post_init__()

    @property
    def num_anchors(self) -> int:
        """The number of anchors per location, ``num_scales * len(aspect_ratios)``."""
        return detection.num_anchors_per_location(self.num_scales, self.aspect_ratios)

    @nn.nowrap
    def anchor_boxes(self, image_size: tuple[int, int]) -> np.ndarray:
        """float32 ``[A, 4]`` anchors ``(y1, x1, y2, x2)`` of an ``(H, W)`` input, in output row order."""
        return detection.anchor_boxes(
            image_size,
            min_level=self.min_level,
            max_level=self.max_level,
            num_scales=self.num_scales,
            aspect_ratios=tuple(self.aspect_ratios),
            anchor_scale=self.anchor_scale,
        )

    def components(self, *, detached: bool = False) -> list[nn.Module]:
        """Backbone, pyramid and head, in the order ``__call__`` chains them (see ``ResNet.components``)."""
        kw = dict(parent=None) if detached else {}
        backbone = self.backbone.clone(parent=None, name="backbone") if detached else self.backbone
        return [
            backbone,
            FeaturePyramid(
                self.min_level, self.max_level, self.fpn_features, dtype=self.dtype, name="fpn", **kw
            ),
            RetinaHead(
                self.num_classes,
                self.num_anchors,
                self.fpn_features,
                self.head_convs,
                dtype=self.dtype,
                name="head",
                **kw,
            ),
        ]

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        if images.ndim != 4:
            raise ValueError(f"RetinaNet expects NHWC images [B, H, W, C], got images.shape={images.shape}")
        backbone, fpn, head = self.components()
        feats = backbone(images, train=train)
        height, width = images.shape[1:3]
        for i, feat in enumerate(feats):
            stride = 2 ** (BACKBONE_MIN_LEVEL + i)
            grid = (-(-height // stride), -(-width // stride))
            if feat.shape[1:3] != grid:
                raise ValueError(
                    f"backbone output {i} has shape {feat.shape} for images {images.shape}: level "
                    f"{BACKBONE_MIN_LEVEL + i} needs a ceil(H / {stride}) x ceil(W / {stride}) = {grid} grid"
                )
        return head(fpn(feats, train=train), train=train)


# ----------------------------------------------------------------------------------------------
# Registered detectors. The backbone is the registered ResNet of the same name with its head
# removed; ``backbone_overrides`` go to that ResNet's factory (e.g. ``dict(width=16,
# stage_sizes=(1, 1, 1, 1))``), ``dtype`` and ``attention_implementation`` to both.
# ----------------------------------------------------------------------------------------------

AA_DETECTION = dict(min_key_depth_per_head=0)  # see the module docstring


def _retinanet(backbone: str, overrides: dict[str, Any], **backbone_defaults: Any) -> RetinaNet:
    backbone_overrides = overrides.pop("backbone_overrides", None) or {}
    if not isinstance(backbone_overrides, Mapping) or "features_only" in backbone_overrides:
        raise ValueError(
            f"backbone_overrides={backbone_overrides!r} must be a mapping of {backbone} overrides "
            "(without features_only: a RetinaNet backbone is always features-only)"
        )
    backbone_overrides = dict(backbone_overrides)
    if "attention_implementation" in overrides:
        backbone_overrides.setdefault("attention_implementation", overrides.pop("attention_implementation"))
    if "dtype" in overrides:
        backbone_overrides.setdefault("dtype", overrides["dtype"])
    module = get_entry(backbone).factory(**{**backbone_defaults, **backbone_overrides, "features_only": True})
    return build(
        RetinaNet,
        dict(backbone=module, num_classes=COCO_CLASSES),
        overrides,
        extra_keys=("backbone_overrides", "attention_implementation"),
    )


def _register(depth: int, augmented: bool, input_shape: tuple[int, int, int]) -> None:
    prefix = "aa_" if augmented else ""
    name, backbone = f"{prefix}retinanet_resnet{depth}", f"{prefix}resnet{depth}"

    def factory(**overrides: Any) -> RetinaNet:
        return _retinanet(backbone, overrides, **(AA_DETECTION if augmented else {}))

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"RetinaNet (P3-P7, 9 anchors per location) on the stage outputs of ``{backbone}``."
    register(name, input_shape=input_shape, num_classes=COCO_CLASSES)(factory)


for _depth, _input in ((50, COCO_INPUT), (101, COCO_INPUT), (18, SMALL_INPUT)):  # 18: CPU work, small images
    for _augmented in (False, True):
        _register(_depth, _augmented, _input)
