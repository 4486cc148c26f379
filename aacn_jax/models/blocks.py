"""Building blocks shared by the model families: (augmented) convolutions, BatchNorm, excitation, head.

The attention hyperparameters of a model travel as one hashable :class:`Augmentation` value;
:meth:`Augmentation.conv` turns a planned ``k x k`` convolution into the paper's
:class:`~aacn_jax.layers.AugmentedConv` with ``dk, dv`` from
:func:`~aacn_jax.layers.attention_depths`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacn_jax.functional import IMPLEMENTATIONS
from aacn_jax.layers import POSITIONS, AugmentedConv, GatherExcite, SqueezeExcite, attention_depths

__all__ = [
    "EXCITES",
    "PADDINGS",
    "Augmentation",
    "ClassifierHead",
    "batch_norm",
    "check_common",
    "check_stages",
    "component_outputs",
    "conv",
    "conv_padding",
    "excite_layer",
]

EXCITES = (None, "se", "ge")
PADDINGS = ("same", "symmetric")


def conv_padding(kind: str, kernel_size: int) -> Any:
    """``"same"``: XLA's SAME (a stride-2 convolution of an even size pads one row and column more at
    the end, as TensorFlow); ``"symmetric"``: ``kernel_size // 2`` on every side, as PyTorch. Both give
    ``ceil(size / stride)`` outputs for odd kernels; they differ in where the strided windows sit."""
    if kind not in PADDINGS:
        raise ValueError(f"conv_padding={kind!r} must be one of {PADDINGS}")
    return "SAME" if kind == "same" else ((kernel_size // 2,) * 2,) * 2


# He initialisation (fan_out), as in torchvision's and timm's ResNets.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """How a convolution is attention-augmented (paper section 3.3).

    Attributes:
      kappa: ``dk / Fout``.
      upsilon: ``dv / Fout``; 1.0 gives a fully attentional layer (no convolution branch).
      num_heads: Nh.
      min_key_depth_per_head: dk is raised to at least ``min_key_depth_per_head * num_heads``
        (the paper's CIFAR Wide-ResNet uses 20).
      position: ``"relative"`` (the paper), ``"none"``, ``"sinusoidal"`` or ``"coordconv"``.
      implementation: the attention implementation (``"dense"``, ``"blockwise"``, ``"fused"``, None =
        automatic; see :func:`aacn_jax.functional.self_attention_2d`).
    """

    kappa: float = 0.2
    upsilon: float = 0.1
    num_heads: int = 8
    min_key_depth_per_head: int = 0
    position: str = "relative"
    implementation: str | None = None

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"attention_position={self.position!r} must be one of {POSITIONS}")
        if self.implementation not in (None, *IMPLEMENTATIONS):
            raise ValueError(
                f"attention_implementation={self.implementation!r} must be one of {IMPLEMENTATIONS} or None"
            )
        if self.min_key_depth_per_head < 0:
            raise ValueError(f"min_key_depth_per_head={self.min_key_depth_per_head} must be >= 0")

    @classmethod
    def of(cls, model: Any) -> Augmentation:
        """The augmentation described by a model's ``kappa``, ``upsilon``, ``num_heads``, ... fields."""
        return cls(
            model.kappa,
            model.upsilon,
            model.num_heads,
            model.min_key_depth_per_head,
            model.attention_position,
            model.attention_implementation,
        )

    def depths(self, features: int) -> tuple[int, int]:
        """``(dk, dv)`` of an augmented layer with ``features`` output channels."""
        return attention_depths(
            features, self.kappa, self.upsilon, self.num_heads, self.min_key_depth_per_head
        )

    def conv(
        self, features: int, kernel_size: int, strides: int, *, dtype: Any, name: str, padding: Any = "SAME"
    ) -> AugmentedConv:
        dk, dv = self.depths(features)
        return AugmentedConv(
            features,
            kernel_size,
            strides,
            padding=padding,
            dk=dk,
            dv=dv,
            num_heads=self.num_heads,
            position=self.position,
            implementation=self.implementation,
            kernel_init=conv_init,
            dtype=dtype,
            name=name,
        )


def conv(
    features: int,
    kernel_size: int,
    strides: int = 1,
    *,
    dtype: Any,
    name: str,
    augmentation: Augmentation | None = None,
    padding: Any = "SAME",
) -> nn.Module:
    """A bias-free ``k x k`` convolution, or its attention-augmented replacement (``padding`` is its
    convolution branch's)."""
    if augmentation is not None:
        return augmentation.conv(features, kernel_size, strides, dtype=dtype, name=name, padding=padding)
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        (strides, strides),
        padding=padding,
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        name=name,
    )


def batch_norm(train: bool, *, dtype: Any, name: str, zero_init: bool = False) -> nn.BatchNorm:
    """``nn.BatchNorm`` with momentum 0.9 and epsilon 1e-5; ``zero_init`` starts its scale at 0."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        scale_init=nn.initializers.zeros_init() if zero_init else nn.initializers.ones_init(),
        name=name,
    )


def excite_layer(kind: str | None, *, reduction: int, dtype: Any) -> nn.Module | None:
    """SE (``"se"``, reduction r), parameter-free global Gather-Excite (``"ge"``) or None."""
    if kind == "se":
        return SqueezeExcite(reduction, dtype=dtype, name="excite")
    if kind == "ge":
        return GatherExcite(None, name="excite")
    return None


def check_common(module: nn.Module, num_stages: int) -> None:
    """Validate the fields every model family shares; raise ValueError naming the field."""
    if module.num_classes < 1:
        raise ValueError(f"num_classes={module.num_classes} must be >= 1")
    if module.excite not in EXCITES:
        raise ValueError(f"excite={module.excite!r} must be one of {EXCITES}")
    if module.se_reduction < 1:
        raise ValueError(f"se_reduction={module.se_reduction} must be >= 1")
    check_stages(module.augmented_stages, num_stages)


def check_stages(stages: Sequence[int], num_stages: int) -> None:
    for stage in stages:
        if not isinstance(stage, int) or not 1 <= stage <= num_stages:
            raise ValueError(f"augmented_stages={tuple(stages)!r} must hold stage numbers in 1..{num_stages}")


class ClassifierHead(nn.Module):
    """Global average pooling and a Dense layer; the logits are returned in float32."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # B, C
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(pooled.astype(self.dtype))
        return logits.astype(jnp.float32)


def component_outputs(model: nn.Module, x: jax.Array, *, train: bool) -> list[jax.Array]:
    """Check NHWC input, cast to ``model.dtype``, chain ``model.components()``: the output of each."""
    if x.ndim != 4:
        raise ValueError(f"{type(model).__name__} expects NHWC images [B, H, W, C], got x.shape={x.shape}")
    x = jnp.asarray(x, model.dtype)
    outputs = []
    for layer in model.components():
        x = layer(x, train=train)
        outputs.append(x)
    return outputs


def run_components(model: nn.Module, x: jax.Array, *, train: bool) -> jax.Array:
    """A zoo model's ``__call__``: the output of the last of its chained components."""
    return component_outputs(model, x, train=train)[-1]
