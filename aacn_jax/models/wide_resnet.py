"""Wide Residual Networks with attention-augmented, SE and GE variants (the paper's CIFAR models).

Zagoruyko, Komodakis. "Wide Residual Networks", BMVC 2016, arXiv:1605.07146;
Bello et al. "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925, section 4.1.
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
    conv,
    excite_layer,
    run_components,
)
from aacn_jax.models.registry import CIFAR_INPUT, build, register

__all__ = ["WideResNet"]


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, plus shortcut.

    Where the shape changes, the shortcut is a 1x1 convolution of the pre-activated input (as in
    the WRN reference code). ``augmentation`` replaces the first 3x3 convolution by an
    AugmentedConv; the BatchNorm after it (``bn2``) weighs its convolution and attention channels.
    """

    features: int
    strides: int = 1
    augmentation: Augmentation | None = None
    dropout_rate: float = 0.0
    excite: str | None = None
    se_reduction: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype)
        activated = nn.relu(batch_norm(train, name="bn1", **kw)(x))
        shortcut = x
        if x.shape[-1] != self.features or self.strides != 1:
            shortcut = conv(self.features, 1, self.strides, name="proj", **kw)(activated)
        y = conv(self.features, 3, self.strides, name="conv1", augmentation=self.augmentation, **kw)(
            activated
        )
        y = nn.relu(batch_norm(train, name="bn2", **kw)(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train or self.dropout_rate == 0)(y)
        y = conv(self.features, 3, 1, name="conv2", **kw)(y)
        excite = excite_layer(self.excite, reduction=self.se_reduction, dtype=self.dtype)
        if excite is not None:  # on the residual branch, before the addition
            y = excite(y)
        return y + shortcut


class WideStage(nn.Module):
    features: int
    num_blocks: int
    strides: int
    augmentation: Augmentation | None = None
    dropout_rate: float = 0.0
    excite: str | None = None
    se_reduction: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for i in range(self.num_blocks):
            x = WideBlock(
                self.features,
                self.strides if i == 0 else 1,
                augmentation=self.augmentation,
                dropout_rate=self.dropout_rate,
                excite=self.excite,
                se_reduction=self.se_reduction,
                dtype=self.dtype,
                name=f"block{i + 1}",
            )(x, train=train)
        return x


class WideStem(nn.Module):
    features: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        return conv(self.features, 3, 1, dtype=self.dtype, name="conv")(x)


class WideHead(nn.Module):
    """The final BN-ReLU of the pre-activation network, then pooling and the classifier."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(x))
        return ClassifierHead(self.num_classes, dtype=self.dtype, name="classifier")(x, train=train)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: a 3x3 stem with 16 channels, then 3 stages of
    ``(depth - 4) / 6`` pre-activation blocks with ``16k, 32k, 64k`` channels (k = widen_factor),
    strides 1, 2, 2, then BN-ReLU, global pooling and a Dense classifier.

    Parameters are named ``stem``, ``stage1`` ... ``stage3`` (blocks ``block1`` ...), ``head``.

    Attention augmentation, as the paper's CIFAR-100 setting: in the stages listed in
    ``augmented_stages`` the **first convolution of every residual block** (``conv1``, which
    carries the stride in a stage's first block) is an AugmentedConv with kappa = 2*upsilon = 0.2,
    8 heads and at least 20 key dimensions per head; a strided one attends over the input
    average-pooled to the output resolution.

    Attributes:
      depth, widen_factor: 28 and 10 for WRN-28-10; depth must be 6n + 4.
      num_classes: logits.
      dropout_rate: dropout between the two convolutions of a block (0 by default; 0.3 in the
        WRN paper's best CIFAR runs). Needs a ``"dropout"`` rng when training with a rate > 0.
      augmented_stages: 1-based stage numbers whose blocks are augmented; ``()`` = plain WRN.
      kappa, upsilon, num_heads, min_key_depth_per_head, attention_position,
      attention_implementation, excite, se_reduction, dtype: as in
        :class:`aacn_jax.models.resnet.ResNet`.
    """

    depth: int = 28
    widen_factor: int = 10
    num_classes: int = 100
    dropout_rate: float = 0.0
    augmented_stages: Sequence[int] = ()
    kappa: float = 0.2
    upsilon: float = 0.1
    num_heads: int = 8
    min_key_depth_per_head: int = 20
    attention_position: str = "relative"
    attention_implementation: str | None = None
    excite: str | None = None
    se_reduction: int = 16
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"depth={self.depth!r} must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...)")
        if self.widen_factor < 1:
            raise ValueError(f"widen_factor={self.widen_factor} must be >= 1")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        check_common(self, 3)
        augmentation = Augmentation.of(self)
        for stage in self.augmented_stages:
            augmentation.depths(16 * self.widen_factor * 2 ** (stage - 1))
        super().__post_init__()

    def components(self, *, detached: bool = False) -> list[nn.Module]:
        """The stem, the stages and the head, in the order ``__call__`` chains them.

        ``detached=True`` builds them as unbound top-level modules, each applied with its own slice
        of the variables (``variables["params"][module.name]``): :func:`aacn_jax.models.summary`
        uses it for per-stage FLOPs.
        """
        kw = dict(parent=None) if detached else {}
        num_blocks = (self.depth - 4) // 6
        layers: list[nn.Module] = [WideStem(16, dtype=self.dtype, name="stem", **kw)]
        for i in range(3):
            stage = i + 1
            layers.append(
                WideStage(
                    16 * self.widen_factor * 2**i,
                    num_blocks,
                    1 if i == 0 else 2,
                    augmentation=Augmentation.of(self) if stage in self.augmented_stages else None,
                    dropout_rate=self.dropout_rate,
                    excite=self.excite,
                    se_reduction=self.se_reduction,
                    dtype=self.dtype,
                    name=f"stage{stage}",
                    **kw,
                )
            )
        layers.append(WideHead(self.num_classes, dtype=self.dtype, name="head", **kw))
        return layers

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """``[B, H, W, C]`` images -> ``[B, num_classes]`` float32 logits."""
        return run_components(self, x, train=train)


# Registered variants: WRN-28-10 for CIFAR (the paper's CIFAR-100 models).
WRN_AUGMENTATION = dict(kappa=0.2, upsilon=0.1, num_heads=8, min_key_depth_per_head=20)


def _wrn(overrides: dict[str, Any], **variant: Any) -> WideResNet:
    return build(WideResNet, dict(depth=28, widen_factor=10, **variant), overrides)


@register("wrn28_10", input_shape=CIFAR_INPUT, num_classes=100)
def wrn28_10(**overrides: Any) -> WideResNet:
    """WRN-28-10 (dropout 0 by default)."""
    return _wrn(overrides)


@register("aa_wrn28_10", input_shape=CIFAR_INPUT, num_classes=100)
def aa_wrn28_10(**overrides: Any) -> WideResNet:
    """AA-WRN-28-10: the first convolution of every residual block augmented (paper, section 4.1)."""
    return _wrn(overrides, augmented_stages=(1, 2, 3), **WRN_AUGMENTATION)


@register("se_wrn28_10", input_shape=CIFAR_INPUT, num_classes=100)
def se_wrn28_10(**overrides: Any) -> WideResNet:
    """SE-WRN-28-10: Squeeze-Excite (reduction 16) on every residual branch."""
    return _wrn(overrides, excite="se")


@register("ge_wrn28_10", input_shape=CIFAR_INPUT, num_classes=100)
def ge_wrn28_10(**overrides: Any) -> WideResNet:
    """GE-WRN-28-10: parameter-free global Gather-Excite on every residual branch."""
    return _wrn(overrides, excite="ge")
