"""ResNets (ImageNet and CIFAR) with attention-augmented, SE and GE variants.

He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv:1512.03385;
Bello et al. "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925.

One :class:`ResNet` module covers every variant; the registered factories at the bottom only fill
in data (stage sizes, block type, stem, which stages are augmented, excitation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacn_jax.models.blocks import (
    Augmentation,
    ClassifierHead,
    batch_norm,
    check_common,
    component_outputs,
    conv,
    conv_padding,
    excite_layer,
    run_components,
)
from aacn_jax.models.registry import CIFAR_INPUT, IMAGENET_INPUT, build, register

__all__ = ["BLOCKS", "STEMS", "ResNet"]

# The k x k convolutions of each block type, by name: the ones that can be augmented.
BLOCKS = {"basic": ("conv1", "conv2"), "bottleneck": ("conv2",)}
STEMS = ("imagenet", "cifar")
EXPANSION = {"basic": 1, "bottleneck": 4}


class _Residual(nn.Module):
    """Fields and shared tail of the post-activation blocks: excitation, projection shortcut, add, ReLU."""

    features: int
    strides: int = 1
    augmentation: Augmentation | None = None
    augmented_convs: Sequence[str] = ()
    excite: str | None = None
    se_reduction: int = 16
    zero_init_residual: bool = True
    padding: Any = "SAME"  # of the k x k convolutions (see blocks.conv_padding)
    dtype: Any = jnp.float32

    def _finish(self, x: jax.Array, y: jax.Array, *, train: bool) -> jax.Array:
        excite = excite_layer(self.excite, reduction=self.se_reduction, dtype=self.dtype)
        if excite is not None:  # SE paper: on the residual branch, before the addition
            y = excite(y)
        if x.shape != y.shape:
            x = conv(y.shape[-1], 1, self.strides, dtype=self.dtype, name="proj")(x)
            x = batch_norm(train, dtype=self.dtype, name="proj_bn")(x)
        return nn.relu(y + x)

    def _augmentation(self, name: str) -> Augmentation | None:
        return self.augmentation if name in self.augmented_convs else None


class BasicBlock(_Residual):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets); the stride is on the first."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype)
        pad = dict(padding=self.padding)
        y = conv(
            self.features,
            3,
            self.strides,
            name="conv1",
            augmentation=self._augmentation("conv1"),
            **kw,
            **pad,
        )(x)
        y = nn.relu(batch_norm(train, name="bn1", **kw)(y))
        y = conv(self.features, 3, 1, name="conv2", augmentation=self._augmentation("conv2"), **kw, **pad)(y)
        y = batch_norm(train, name="bn2", zero_init=self.zero_init_residual, **kw)(y)
        return self._finish(x, y, train=train)


class Bottleneck(_Residual):
    """1x1 -> 3x3 -> 1x1 (x4 channels), the stride on the 3x3 ("ResNet v1.5", as torchvision)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype)
        y = conv(self.features, 1, name="conv1", **kw)(x)
        y = nn.relu(batch_norm(train, name="bn1", **kw)(y))
        y = conv(
            self.features,
            3,
            self.strides,
            name="conv2",
            augmentation=self._augmentation("conv2"),
            padding=self.padding,
            **kw,
        )(y)
        y = nn.relu(batch_norm(train, name="bn2", **kw)(y))
        y = conv(4 * self.features, 1, name="conv3", **kw)(y)
        y = batch_norm(train, name="bn3", zero_init=self.zero_init_residual, **kw)(y)
        return self._finish(x, y, train=train)


class Stem(nn.Module):
    """``"imagenet"``: 7x7/2 convolution, BN, ReLU, 3x3/2 max pool; ``"cifar"``: 3x3 convolution, BN, ReLU."""

    kind: str
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.kind == "imagenet":
            x = conv(self.features, 7, 2, padding=((3, 3), (3, 3)), dtype=self.dtype, name="conv")(x)
        else:
            x = conv(self.features, 3, 1, dtype=self.dtype, name="conv")(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(x))
        if self.kind == "imagenet":
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        return x


class Stage(nn.Module):
    """``num_blocks`` residual blocks; the first one has the stride (and the projection shortcut)."""

    block: str
    features: int
    num_blocks: int
    strides: int
    augmentation: Augmentation | None = None
    augmented_convs: Sequence[str] = ()
    excite: str | None = None
    se_reduction: int = 16
    zero_init_residual: bool = True
    padding: Any = "SAME"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        block_cls = BasicBlock if self.block == "basic" else Bottleneck
        for i in range(self.num_blocks):
            x = block_cls(
                self.features,
                self.strides if i == 0 else 1,
                augmentation=self.augmentation,
                augmented_convs=tuple(self.augmented_convs) if self.augmentation is not None else (),
                excite=self.excite,
                se_reduction=self.se_reduction,
                zero_init_residual=self.zero_init_residual,
                padding=self.padding,
                dtype=self.dtype,
                name=f"block{i + 1}",
            )(x, train=train)
        return x


class ResNet(nn.Module):
    """A post-activation ResNet; every registered ResNet variant is this module with other data.

    Stage ``i`` (1-based) has ``stage_sizes[i-1]`` blocks of ``width * 2**(i-1)`` (or
    ``stage_widths[i-1]``) base channels (x4 output channels for bottlenecks); stage 1 has stride 1,
    the others stride 2. Parameters
    are named ``stem``, ``stage1`` ... ``stageN`` (blocks ``block1`` ...), ``head``.

    Attention augmentation (paper section 3.3): in the stages listed in ``augmented_stages``,
    the block convolutions named in ``augmented_convs`` (default: every k x k convolution of the
    block, i.e. both 3x3 of a basic block, the 3x3 of a bottleneck) become
    :class:`~aacn_jax.layers.AugmentedConv` with ``dk, dv = attention_depths(Fout, kappa,
    upsilon, num_heads, min_key_depth_per_head)``; the block's BatchNorm that follows weighs the
    convolution and attention channels. A strided augmented convolution runs its attention on
    the input average-pooled to the output resolution.

    Attributes:
      stage_sizes: blocks per stage.
      block: ``"basic"`` or ``"bottleneck"``.
      num_classes: logits.
      width: channels of the stem and of stage 1.
      stage_widths: base channels of each stage (before a bottleneck's x4); None: ``width * 2**i``.
        For fine parameter matching between twins (e.g. ``python -m benchmarks.claims``).
      stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool, for 224x224) or ``"cifar"`` (3x3 conv;
        works down to 8x8 inputs).
      augmented_stages: 1-based stage numbers whose blocks are augmented; ``()`` = plain ResNet.
      augmented_convs: names of the block convolutions to augment (``"conv1"``, ``"conv2"`` of
        a basic block; ``"conv2"`` of a bottleneck); None = all of them.
      kappa, upsilon, num_heads, min_key_depth_per_head: the paper's kappa = dk/Fout,
        upsilon = dv/Fout, Nh, and a floor on dk/Nh (see :func:`aacn_jax.layers.attention_depths`).
      attention_position: ``"relative"`` (paper), ``"none"``, ``"sinusoidal"``, ``"coordconv"``.
      attention_implementation: ``"dense"``, ``"blockwise"``, ``"fused"``, ``"mgpu"`` or None
        (automatic: fused on a TPU or NVIDIA GPU, by memory elsewhere).
      excite: None, ``"se"`` (Squeeze-Excite, reduction ``se_reduction``) or ``"ge"``
        (parameter-free global Gather-Excite), on the residual branch before the addition.
      zero_init_residual: start the last BatchNorm scale of each residual branch at 0 (Goyal
        et al. 2017; not stated in the paper).
      conv_padding: padding of the block 3x3 convolutions: ``"same"`` (XLA's SAME: a strided one pads
        its extra row and column at the end, as TensorFlow) or ``"symmetric"`` (1 on every side, as
        torchvision and timm: what their ImageNet weights expect, ``python -m train.convert``). The
        stem's 7x7 convolution and max pool pad symmetrically either way.
      features_only: no classifier head (no ``head`` parameters, ``num_classes`` unused);
        ``__call__`` returns the outputs of the stages, e.g. as a detection backbone (C2..C5 at
        strides 4..32 with the ImageNet stem; :class:`aacn_jax.models.RetinaNet`).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are float32, BatchNorm
        statistics and softmax float32, logits returned in float32.
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    num_classes: int = 1000
    width: int = 64
    stage_widths: Sequence[int] | None = None
    stem: str = "imagenet"
    augmented_stages: Sequence[int] = ()
    augmented_convs: Sequence[str] | None = None
    kappa: float = 0.2
    upsilon: float = 0.1
    num_heads: int = 8
    min_key_depth_per_head: int = 0
    attention_position: str = "relative"
    attention_implementation: str | None = None
    excite: str | None = None
    se_reduction: int = 16
    zero_init_residual: bool = True
    conv_padding: str = "same"
    features_only: bool = False
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"block={self.block!r} must be one of {tuple(BLOCKS)}")
        if self.stem not in STEMS:
            raise ValueError(f"stem={self.stem!r} must be one of {STEMS}")
        if not self.stage_sizes or any(not isinstance(n, int) or n < 1 for n in self.stage_sizes):
            raise ValueError(
                f"stage_sizes={self.stage_sizes!r} must be a non-empty sequence of positive ints"
            )
        if self.width < 1:
            raise ValueError(f"width={self.width} must be >= 1")
        if self.stage_widths is not None and (
            len(self.stage_widths) != len(self.stage_sizes)
            or any(not isinstance(w, int) or w < 1 for w in self.stage_widths)
        ):
            raise ValueError(
                f"stage_widths={self.stage_widths!r} must hold one positive int per stage "
                f"({len(self.stage_sizes)} stages)"
            )
        check_common(self, len(self.stage_sizes))
        conv_padding(self.conv_padding, 3)  # validates it
        if self.augmented_convs is not None and not set(self.augmented_convs) <= set(BLOCKS[self.block]):
            raise ValueError(
                f"augmented_convs={self.augmented_convs!r} must name convolutions of a {self.block} block: "
                f"{BLOCKS[self.block]}"
            )
        augmentation = Augmentation.of(self)  # validates the attention fields
        for stage in self.augmented_stages:  # validates kappa, upsilon, num_heads against the widths
            augmentation.depths(self.widths[stage - 1])
        super().__post_init__()

    @property
    def widths(self) -> tuple[int, ...]:
        """Base channels of each stage."""
        if self.stage_widths is not None:
            return tuple(self.stage_widths)
        return tuple(self.width * 2**i for i in range(len(self.stage_sizes)))

    def components(self, *, detached: bool = False) -> list[nn.Module]:
        """The stem, the stages and the head (none if ``features_only``), in ``__call__``'s order.

        ``detached=True`` builds them as unbound top-level modules, each applied with its own slice
        of the variables (``variables["params"][module.name]``): :func:`aacn_jax.models.summary`
        uses it for per-stage FLOPs.
        """
        kw = dict(parent=None) if detached else {}
        augmented_convs = BLOCKS[self.block] if self.augmented_convs is None else tuple(self.augmented_convs)
        layers: list[nn.Module] = [Stem(self.stem, self.width, dtype=self.dtype, name="stem", **kw)]
        for i, num_blocks in enumerate(self.stage_sizes):
            stage = i + 1
            layers.append(
                Stage(
                    self.block,
                    self.widths[i],
                    num_blocks,
                    1 if i == 0 else 2,
                    augmentation=Augmentation.of(self) if stage in self.augmented_stages else None,
                    augmented_convs=augmented_convs,
                    excite=self.excite,
                    se_reduction=self.se_reduction,
                    zero_init_residual=self.zero_init_residual,
                    padding=conv_padding(self.conv_padding, 3),
                    dtype=self.dtype,
                    name=f"stage{stage}",
                    **kw,
                )
            )
        if not self.features_only:
            layers.append(ClassifierHead(self.num_classes, dtype=self.dtype, name="head", **kw))
        return layers

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array | tuple[jax.Array, ...]:
        """``[B, H, W, C]`` images -> ``[B, num_classes]`` float32 logits, or with ``features_only``
        the tuple of the stage outputs ``[B, h_i, w_i, C_i]`` in ``dtype``."""
        if self.features_only:
            return tuple(component_outputs(self, x, train=train)[1:])  # without the stem's
        return run_components(self, x, train=train)


# ----------------------------------------------------------------------------------------------
# Registered variants.
#
# Placement of the augmented convolutions on ImageNet (the paper states kappa = 2*upsilon = 0.2
# and Nh = 8, and that it augments "from the last layers toward the first until memory
# constraints"; the exact placement is not stated). Chosen so that both the paper's parameter
# counts and its GFLOPs are matched as closely as attention_depths' rounding allows, at 224x224:
#   * bottleneck ResNets (26, 50, 101, 152): the 3x3 convolution of every bottleneck of stages 3
#     and 4 (14x14 and 7x7 maps), at least 20 key dimensions per head (dk = 160, dv = 24 / 48).
#     ResNet-50: 25.68M parameters (paper 25.8M), 8.20 GFLOPs = 1.025 x ResNet-50 (paper 1.012 x);
#     ResNet-101: 45.26M (paper 45.4M), 1.050 x (paper 1.032 x). Augmenting every stage instead
#     gives 25.85M / 45.43M but 2.6 x / 1.9 x the FLOPs and 315 MB of float32 logits per image and
#     layer at 56x56, which the paper's 8.3 / 16.1 GFLOPs rule out.
#   * basic-block ResNets (18, 34): both 3x3 convolutions of every block of stages 2 to 4 (28x28,
#     14x14, 7x7), no key-depth minimum (dk, dv = 24, 16 / 48, 24 / 104, 48). ResNet-34: 20.98M
#     (paper 20.7M, +1.3%), 7.27 GFLOPs = 1.07 x ResNet-34 (paper 0.96 x). Stages 3-4 only would
#     give 21.05M (+1.7%); every stage 20.97M and 1.84 x the FLOPs. The remaining +1.3% comes from
#     attention_depths rounding dv to the nearest multiple of 8 (51.2 -> 48 at 512 channels).
# ``augmented_stages`` (and ``augmented_convs``) override the placement in one argument.
# ----------------------------------------------------------------------------------------------

STAGE_SIZES = {
    18: ("basic", (2, 2, 2, 2)),
    26: ("bottleneck", (1, 2, 4, 1)),  # as in Ramachandran et al. 2019; not stated in the AA paper
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
IMAGENET_AUGMENTATION = {
    "basic": dict(augmented_stages=(2, 3, 4), kappa=0.2, upsilon=0.1, num_heads=8, min_key_depth_per_head=0),
    "bottleneck": dict(
        augmented_stages=(3, 4), kappa=0.2, upsilon=0.1, num_heads=8, min_key_depth_per_head=20
    ),
}


def _imagenet_resnet(depth: int, overrides: dict[str, Any], **variant: Any) -> ResNet:
    block, stage_sizes = STAGE_SIZES[depth]
    return build(ResNet, dict(stage_sizes=stage_sizes, block=block, **variant), overrides)


def _register_imagenet(depth: int) -> None:
    block = STAGE_SIZES[depth][0]

    @register(f"resnet{depth}", input_shape=IMAGENET_INPUT, num_classes=1000)
    def plain(**overrides: Any) -> ResNet:
        return _imagenet_resnet(depth, overrides)

    @register(f"aa_resnet{depth}", input_shape=IMAGENET_INPUT, num_classes=1000)
    def augmented(**overrides: Any) -> ResNet:
        return _imagenet_resnet(depth, overrides, **IMAGENET_AUGMENTATION[block])

    plain.__name__ = plain.__qualname__ = f"resnet{depth}"
    augmented.__name__ = augmented.__qualname__ = f"aa_resnet{depth}"
    plain.__doc__ = f"ResNet-{depth} ({block} blocks {STAGE_SIZES[depth][1]})."
    augmented.__doc__ = (
        f"AA-ResNet-{depth}: ResNet-{depth} with the {block} blocks of stages "
        f"{IMAGENET_AUGMENTATION[block]['augmented_stages']} attention-augmented (placement above)."
    )


for _depth in STAGE_SIZES:
    _register_imagenet(_depth)


@register("se_resnet50", input_shape=IMAGENET_INPUT, num_classes=1000)
def se_resnet50(**overrides: Any) -> ResNet:
    """SE-ResNet-50: Squeeze-Excite (reduction 16) on every residual branch before the addition."""
    return _imagenet_resnet(50, overrides, excite="se")


@register("ge_resnet50", input_shape=IMAGENET_INPUT, num_classes=1000)
def ge_resnet50(**overrides: Any) -> ResNet:
    """GE-ResNet-50: parameter-free global Gather-Excite on every residual branch."""
    return _imagenet_resnet(50, overrides, excite="ge")


@register("fa_resnet50", input_shape=IMAGENET_INPUT, num_classes=1000)
def fa_resnet50(**overrides: Any) -> ResNet:
    """Fully attentional ResNet-50: the augmented 3x3 convolutions of AA-ResNet-50 become attention only.

    upsilon = 1 (dv = Fout: no convolution branch) and kappa = 1 (dk = dv, as in stand-alone
    self-attention, Ramachandran et al. 2019; the AA paper does not state kappa for its fully
    attentional models and ``attention_depths`` accepts kappa <= 1), 8 heads, at least 20 key
    dimensions per head. The stem and the 1x1 convolutions stay convolutional.
    """
    aug = dict(IMAGENET_AUGMENTATION["bottleneck"], kappa=1.0, upsilon=1.0)
    return _imagenet_resnet(50, overrides, **aug)


def _cifar_resnet(depth: int, overrides: dict[str, Any], **variant: Any) -> ResNet:
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth!r} must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")
    n = (depth - 2) // 6
    defaults = dict(stage_sizes=(n, n, n), block="basic", stem="cifar", width=16, **variant)
    return build(ResNet, defaults, overrides, extra_keys=("depth",))


@register("resnet_cifar", input_shape=CIFAR_INPUT, num_classes=10)
def resnet_cifar(*, depth: int = 20, **overrides: Any) -> ResNet:
    """CIFAR ResNet (He et al. 2016, section 4.2): 3x3 stem, 3 stages of basic blocks, 16/32/64 channels.

    ``depth = 6n + 2`` (20 by default); ``width`` overrides the 16 base channels. Shortcuts are
    1x1 projections where the shape changes (the paper's option B; its CIFAR nets use option A).
    Runs on inputs down to 8x8 (scikit-learn digits: 8x8 -> 8, 4, 2).
    """
    return _cifar_resnet(depth, overrides)


@register("aa_resnet_cifar", input_shape=CIFAR_INPUT, num_classes=10)
def aa_resnet_cifar(*, depth: int = 20, **overrides: Any) -> ResNet:
    """AA version of ``resnet_cifar``: the first 3x3 convolution of every block is augmented.

    As the paper's CIFAR Wide-ResNet (first convolution of every residual block, kappa = 2*upsilon
    = 0.2), but with 4 heads (not 8) and at least 4 key dimensions per head, sized for the narrow
    16/32/64-channel stages: e.g. 16 channels -> dk = 16, dv = 4. Not from the paper.
    """
    aug = dict(kappa=0.2, upsilon=0.1, num_heads=4, min_key_depth_per_head=4)
    return _cifar_resnet(depth, overrides, augmented_stages=(1, 2, 3), augmented_convs=("conv1",), **aug)
