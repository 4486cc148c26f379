"""MnasNet-A1 and its attention-augmented twin (the paper's mobile network).

Tan, Chen, Pang, Vasudevan, Sandler, Howard, Le. "MnasNet: Platform-Aware Neural Architecture
Search for Mobile", CVPR 2019, arXiv:1807.11626; Bello et al. "Attention Augmented Convolutional
Networks", ICCV 2019, arXiv:1904.09925, section 4.3.

One :class:`MnasNet` module covers every variant; the block table and the placement of the
attention are data (``MNASNET_A1``, ``A1_AUGMENTATION``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacn_jax.models.blocks import (
    Augmentation,
    ClassifierHead,
    batch_norm,
    check_stages,
    conv,
    excite_layer,
    run_components,
)
from aacn_jax.models.registry import IMAGENET_INPUT, build, register

__all__ = [
    "A1_AUGMENTATION",
    "MBCONV_CONVS",
    "MNASNET_A1",
    "WIDTHS",
    "MBConvStage",
    "MnasNet",
    "round_filters",
]


class MBConvStage(NamedTuple):
    """One row of the block table: ``num_blocks`` inverted bottlenecks with ``features`` outputs.

    ``expansion`` 1 is MnasNet's SepConv (depthwise, then pointwise projection, no expansion
    conv); only the first block of a stage has ``strides``; ``se``: Squeeze-Excite with
    ``max(1, int(0.25 * block input channels))`` hidden units.
    """

    num_blocks: int
    expansion: int
    kernel_size: int
    strides: int
    features: int
    se: bool


# MnasNet-A1 at width 1.0 (MnasNet paper, Figure 7(a); TF reference: tensorflow/tpu
# models/official/mnasnet/mnasnet_models.py, blocks_args of mnasnet_a1). Feature maps at 224x224
# after each stage: 112, 56, 28, 14, 14, 7, 7.
MNASNET_A1 = (
    MBConvStage(1, 1, 3, 1, 16, False),  # SepConv 3x3
    MBConvStage(2, 6, 3, 2, 24, False),
    MBConvStage(3, 3, 5, 2, 40, True),
    MBConvStage(4, 6, 3, 2, 80, False),
    MBConvStage(2, 6, 3, 1, 112, True),
    MBConvStage(3, 6, 5, 2, 160, True),
    MBConvStage(1, 6, 3, 1, 320, False),
)
# The pointwise convolutions of an inverted bottleneck, by name: the ones that can be augmented.
MBCONV_CONVS = ("expand", "project")
WIDTHS = (0.75, 1.0, 1.25, 1.4)  # the AA paper's MnasNet widths (registered below)
SE_RATIO = 0.25
DIVISOR = 8

# He initialisation for the depthwise kernels [k, k, 1, C]: each output sees k*k inputs, which
# is flax's fan_in here (its fan_out, k*k*C, would shrink them C-fold). As the TF reference.
depthwise_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def round_filters(features: int, width: float) -> int:
    """Channels of a layer with ``features`` channels at width 1.0, scaled by ``width``.

    The TF reference's rule (``round_filters`` in tensorflow/tpu models/official/mnasnet/
    mnasnet_model.py, also MobileNetV2's ``_make_divisible``): round to the nearest multiple of 8
    (halves up), at least 8, plus 8 more where rounding lost over 10%.
    """
    scaled = features * width
    rounded = max(DIVISOR, int(scaled + DIVISOR / 2) // DIVISOR * DIVISOR)
    return rounded + DIVISOR if rounded < 0.9 * scaled else rounded


class ConvBN(nn.Module):
    """Convolution (bias-free), BatchNorm, ReLU: MnasNet's stem and its 1x1 head convolution."""

    features: int
    kernel_size: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = conv(self.features, self.kernel_size, self.strides, dtype=self.dtype, name="conv")(x)
        return nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(x))


class MBConv(nn.Module):
    """Inverted bottleneck: [1x1 expand, BN, ReLU,] k x k depthwise, BN, ReLU, [SE,] 1x1 project, BN.

    The identity shortcut is added where the stride is 1 and the channels are unchanged. Convolutions
    named in ``augmented_convs`` (``"expand"``, ``"project"``) are attention-augmented.
    """

    features: int
    expansion: int
    kernel_size: int
    strides: int = 1
    se: bool = False
    augmentation: Augmentation | None = None
    augmented_convs: Sequence[str] = ()
    dtype: Any = jnp.float32

    def _augmentation(self, name: str) -> Augmentation | None:
        return self.augmentation if name in self.augmented_convs else None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype)
        channels = x.shape[-1] * self.expansion
        y = x
        if self.expansion != 1:
            y = conv(channels, 1, name="expand", augmentation=self._augmentation("expand"), **kw)(y)
            y = nn.relu(batch_norm(train, name="expand_bn", **kw)(y))
        y = nn.Conv(
            channels,
            (self.kernel_size, self.kernel_size),
            (self.strides, self.strides),
            padding="SAME",
            feature_group_count=channels,
            use_bias=False,
            kernel_init=depthwise_init,
            name="depthwise",
            **kw,
        )(y)
        y = nn.relu(batch_norm(train, name="depthwise_bn", **kw)(y))
        # channels // (expansion / SE_RATIO) == int(SE_RATIO * input channels): the reference's SE size.
        excite = excite_layer(
            "se" if self.se else None, reduction=round(self.expansion / SE_RATIO), dtype=self.dtype
        )
        if excite is not None:
            y = excite(y)
        y = conv(self.features, 1, name="project", augmentation=self._augmentation("project"), **kw)(y)
        y = batch_norm(train, name="project_bn", **kw)(y)
        return y + x if self.strides == 1 and x.shape == y.shape else y


class MBConvStageModule(nn.Module):
    """The blocks of one row of the table, named ``block1`` ...; the first one has the stride."""

    spec: MBConvStage
    features: int
    augmentation: Augmentation | None = None
    augmented_convs: Sequence[str] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for i in range(self.spec.num_blocks):
            x = MBConv(
                self.features,
                self.spec.expansion,
                self.spec.kernel_size,
                self.spec.strides if i == 0 else 1,
                se=self.spec.se,
                augmentation=self.augmentation,
                augmented_convs=tuple(self.augmented_convs),
                dtype=self.dtype,
                name=f"block{i + 1}",
            )(x, train=train)
        return x


class MnasNet(nn.Module):
    """MnasNet (A1 by default): every registered MnasNet variant is this module with other data.

    Stem (3x3/2 convolution, BN, ReLU), the rows of ``stages`` (inverted bottlenecks with
    depthwise convolutions, Squeeze-Excite where the row says so), a 1x1 convolution to
    ``head_features`` (BN, ReLU), global average pooling and a Dense classifier. Channels of the
    stem and of every stage are ``round_filters(c, width)``; the 1x1 head keeps 1280 channels at
    every width, as the TF reference. Parameters are named ``stem``, ``stage1`` ... ``stage7``
    (blocks ``block1`` ..., convolutions ``expand``, ``depthwise``, ``project``, SE ``excite``),
    ``head_conv``, ``head``. BatchNorm as the rest of the zoo (momentum 0.9, epsilon 1e-5; the TF
    reference uses 0.99 / 1e-3); no dropout before the classifier (the reference has 0.2).

    Attention augmentation: in the stages listed in ``augmented_stages`` the pointwise
    convolutions named in ``augmented_convs`` (``"expand"``, ``"project"``) become
    :class:`~aacn_jax.layers.AugmentedConv` (kernel 1x1) with ``dk, dv = attention_depths(Fout,
    kappa, upsilon, num_heads, min_key_depth_per_head)``, followed by the block's BatchNorm.
    The depthwise convolution is never augmented: see ``A1_AUGMENTATION`` for why and for
    the placement of the registered ``aa_`` models.

    Attributes:
      num_classes: logits.
      width: the width (depth) multiplier, > 0; 0.75, 1.0, 1.25 and 1.4 are registered.
      stages: the block table (``MBConvStage`` rows); ``MNASNET_A1`` by default.
      stem_features, head_features: 32 and 1280 in MnasNet-A1 (the stem is scaled by ``width``).
      augmented_stages: 1-based rows of ``stages`` whose blocks are augmented; ``()`` = plain.
      augmented_convs: which pointwise convolutions of those blocks are augmented (``("project",)``).
      kappa, upsilon, num_heads, min_key_depth_per_head, attention_position,
      attention_implementation, dtype: as in :class:`aacn_jax.models.resnet.ResNet`.
    """

    num_classes: int = 1000
    width: float = 1.0
    stages: Sequence[MBConvStage] = MNASNET_A1
    stem_features: int = 32
    head_features: int = 1280
    augmented_stages: Sequence[int] = ()
    augmented_convs: Sequence[str] = ("project",)
    kappa: float = 0.2
    upsilon: float = 0.1
    num_heads: int = 8
    min_key_depth_per_head: int = 0
    attention_position: str = "relative"
    attention_implementation: str | None = None
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be >= 1")
        if (
            isinstance(self.width, bool)
            or not isinstance(self.width, int | float)
            or not (math.isfinite(self.width) and self.width > 0)
        ):
            raise ValueError(f"width={self.width!r} must be a finite number > 0 (registered: {WIDTHS})")
        if not self.stages or any(
            not isinstance(s, MBConvStage) or min(s[:5]) < 1 or s.strides > 2 for s in self.stages
        ):
            raise ValueError(
                f"stages={self.stages!r} must be a non-empty sequence of MBConvStage rows "
                "with positive sizes and strides 1 or 2"
            )
        for name in ("stem_features", "head_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        check_stages(self.augmented_stages, len(self.stages))
        if not self.augmented_convs or not set(self.augmented_convs) <= set(MBCONV_CONVS):
            raise ValueError(
                f"augmented_convs={self.augmented_convs!r} must name one or more of {MBCONV_CONVS}"
            )
        augmentation = Augmentation.of(self)  # validates the attention fields
        for stage in self.augmented_stages:  # and kappa, upsilon, num_heads against the widths
            spec = self.stages[stage - 1]
            convs = [c for c in self.augmented_convs if spec.expansion != 1 or c != "expand"]
            if not convs:
                raise ValueError(
                    f"augmented_convs={self.augmented_convs!r} names no convolution of stage {stage} "
                    "(expansion 1: it has no expand convolution)"
                )
            for name in convs:
                for features in self._conv_features(stage, name):
                    augmentation.depths(features)
        super().__post_init__()

    @property
    def stem_width(self) -> int:
        """Output channels of the stem at this width."""
        return round_filters(self.stem_features, self.width)

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of each stage at this width."""
        return tuple(round_filters(s.features, self.width) for s in self.stages)

    def _conv_features(self, stage: int, name: str) -> set[int]:
        """Output channels of the ``expand`` or ``project`` convolutions of a stage's blocks."""
        features = self.widths[stage - 1]
        if name == "project":
            return {features}
        first_input = self.widths[stage - 2] if stage > 1 else self.stem_width
        expansion = self.stages[stage - 1].expansion
        return {first_input * expansion, features * expansion}

    def components(self, *, detached: bool = False) -> list[nn.Module]:
        """The stem, the stages, the 1x1 head convolution and the classifier, in the order
        ``__call__`` chains them (``detached``: as in :meth:`aacn_jax.models.ResNet.components`)."""
        kw: dict[str, Any] = dict(parent=None) if detached else {}
        layers: list[nn.Module] = [ConvBN(self.stem_width, 3, 2, dtype=self.dtype, name="stem", **kw)]
        for i, (spec, features) in enumerate(zip(self.stages, self.widths, strict=True)):
            stage = i + 1
            augmented = stage in self.augmented_stages
            layers.append(
                MBConvStageModule(
                    spec,
                    features,
                    augmentation=Augmentation.of(self) if augmented else None,
                    augmented_convs=tuple(self.augmented_convs) if augmented else (),
                    dtype=self.dtype,
                    name=f"stage{stage}",
                    **kw,
                )
            )
        layers.append(ConvBN(self.head_features, 1, dtype=self.dtype, name="head_conv", **kw))
        layers.append(ClassifierHead(self.num_classes, dtype=self.dtype, name="head", **kw))
        return layers

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """``[B, H, W, C]`` images -> ``[B, num_classes]`` float32 logits."""
        return run_components(self, x, train=train)


# ----------------------------------------------------------------------------------------------
# Registered variants: mnasnet_a1_<w> and aa_mnasnet_a1_<w> for w in WIDTHS (075, 100, 125, 140).
#
# Placement of the attention in AA-MnasNet. The AA paper (section 4.3, as recalled: its text
# could not be retrieved with the tools at hand, so this is unconfirmed) augments "the inverted
# bottlenecks of the last 13 blocks out of 18, starting when the spatial dimension is 28x28":
# the 3 + 4 + 2 + 3 + 1 = 13 blocks of stages 3-7 (stage 3 is the first with 28x28 outputs at
# 224x224). Which convolution of a block, kappa, upsilon and Nh: not stated in the paper. Chosen:
#   * the 1x1 projection ("project"), with kappa = 2*upsilon = 0.1 and 8 heads (the paper's
#     default Nh), no key-depth minimum. It runs at the block's output resolution, after the
#     depthwise stride, so no attention map is above 28x28, as the paper's wording says (and
#     as the expansion below does not). Parameters: +0.6% to +1.3% of the paper's table (width
#     1.0: 4.084M, paper 4.06M). Compute at width 1.0: 0.84 GFLOPs against the plain model's
#     0.65 (+30%), three quarters of the difference in the three 28x28 blocks of stage 3
#     (``augmented_stages=(4, 5, 6, 7)``: 4.079M, 0.70 GFLOPs, +8%).
#   * alternative, ``augmented_convs=("expand",)``: the 1x1 expansion, the block's widest
#     convolution, matches the paper's counts within 0.15% at all four widths (width 1.0:
#     4.061M), but the first block of stage 3 expands before its stride, on 56x56 maps: 1.66
#     GFLOPs, 2.6x the plain model, far from a small compute overhead. kappa = 2*upsilon = 0.2
#     (the ResNet setting) gives about +6% parameters.
#   * not the depthwise convolution: AAConv concatenates Fout - dv convolution channels with dv
#     attention channels whose queries, keys and values come from a dense 1x1 over all C input
#     channels. A depthwise kernel has only k*k*C weights and maps channel c to channel c only;
#     handing dv of its channels to attention costs C*(2*dk + dv) weights per block (dk =
#     kappa*C on the expanded C): +1.17M at width 1.0 over stages 3-7 against the paper's +0.17M.
#     (AugmentedConv also has no grouped convolution branch.)
# ``augmented_stages``, ``augmented_convs``, ``kappa``, ... override the placement.
# ----------------------------------------------------------------------------------------------

A1_AUGMENTATION: dict[str, Any] = dict(
    augmented_stages=(3, 4, 5, 6, 7), augmented_convs=("project",), kappa=0.1, upsilon=0.05, num_heads=8
)


def _register(width: float) -> None:
    suffix = f"{round(width * 100):03d}"

    @register(f"mnasnet_a1_{suffix}", input_shape=IMAGENET_INPUT, num_classes=1000)
    def plain(**overrides: Any) -> MnasNet:
        return build(MnasNet, dict(width=width), overrides)

    @register(f"aa_mnasnet_a1_{suffix}", input_shape=IMAGENET_INPUT, num_classes=1000)
    def augmented(**overrides: Any) -> MnasNet:
        return build(MnasNet, dict(width=width, **A1_AUGMENTATION), overrides)

    plain.__name__ = plain.__qualname__ = f"mnasnet_a1_{suffix}"
    augmented.__name__ = augmented.__qualname__ = f"aa_mnasnet_a1_{suffix}"
    plain.__doc__ = f"MnasNet-A1 at width {width}."
    augmented.__doc__ = f"AA-MnasNet-A1 at width {width} (placement: A1_AUGMENTATION)."


for _width in WIDTHS:
    _register(_width)
