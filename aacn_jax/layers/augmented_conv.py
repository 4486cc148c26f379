"""Attention-augmented convolution: a convolution concatenated with 2-D self-attention.

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925,
section 3.3, eq. 3: ``AAConv(X) = Concat[Conv(X), MHA(X)]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacn_jax import functional as F
from aacn_jax.layers.self_attention import SelfAttention2D, check_attention_config, check_image

__all__ = ["AugmentedConv", "attention_depths"]


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as ``(h, w)``; ValueError naming ``name`` unless a positive int or pair."""
    result = (value, value) if isinstance(value, int) else tuple(value)
    if len(result) != 2 or any(v < 1 for v in result):
        raise ValueError(f"{name}={value!r} must be a positive int or a pair of positive ints")
    return result


def attention_depths(
    features: int,
    kappa: float = 0.2,
    upsilon: float = 0.1,
    num_heads: int = 8,
    min_key_depth_per_head: int = 0,
) -> tuple[int, int]:
    """The paper's ``dk = kappa * Fout`` and ``dv = upsilon * Fout`` as valid layer sizes.

    Each depth is rounded to the nearest multiple of ``num_heads`` (at least one channel per
    head); dk is then raised to ``min_key_depth_per_head * num_heads`` if smaller, and dv is
    capped at ``features``. The paper's CIFAR Wide-ResNet setting is ``kappa = 2 * upsilon =
    0.2``, 8 heads, at least 20 key dimensions per head. The rounding rule is not stated in the
    paper.

    Returns:
      ``(dk, dv)``.
    """
    if features < 1:
        raise ValueError(f"features={features} must be >= 1")
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} must be >= 1")
    for name, value in (("kappa", kappa), ("upsilon", upsilon)):
        if not 0 < value <= 1:
            raise ValueError(f"{name}={value} must be in (0, 1]")

    def round_to_heads(depth: float) -> int:
        return num_heads * max(1, math.floor(depth / num_heads + 0.5))

    dk = max(round_to_heads(kappa * features), min_key_depth_per_head * num_heads)
    dv = min(round_to_heads(upsilon * features), features - features % num_heads)
    if dv < 1:
        raise ValueError(
            f"num_heads={num_heads} must be <= features={features} to fit one value channel per head"
        )
    return dk, dv


class AugmentedConv(nn.Module):
    """``Concat[Conv(X), MHA(X)]``: a k x k convolution with ``features - dv`` filters and
    :class:`SelfAttention2D` with ``dv`` output channels (paper eq. 3).

    No normalisation inside: as in the paper, the enclosing block's BatchNorm follows and learns
    how to weigh the convolution and attention channels. ``dv == features`` is the fully
    attentional layer (no convolution). With strides > 1 the attention branch runs on the input
    average-pooled (window = stride, SAME padding, padding excluded from the mean) to the output
    resolution; the paper does not spell this out.

    Paper symbols: ``kappa = dk / features``, ``upsilon = dv / features``, ``num_heads`` is Nh;
    :func:`attention_depths` computes ``dk, dv`` from kappa and upsilon.

    Attributes:
      features: output channels (Fout).
      kernel_size, strides: int or pair, as in ``flax.linen.Conv``.
      dk, dv, num_heads, position, ...: see :class:`SelfAttention2D`.
      padding, use_bias, kernel_init: of the convolution branch (``kernel_init`` defaults to
        flax's ``lecun_normal``; the model zoo passes the He initialisation of its plain convs).
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    _: dataclasses.KW_ONLY
    dk: int
    dv: int
    num_heads: int = 8
    position: str = "relative"
    sinusoidal_channels: int = 32
    implementation: str | None = None
    memory_budget_bytes: int = F.DEFAULT_MEMORY_BUDGET_BYTES
    padding: str = "SAME"
    use_bias: bool = False
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_augmented_config(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), features]`` (SAME padding)."""
        check_image(x, "AugmentedConv")
        strides = pair(self.strides, "strides")
        branches = []
        if self.dv < self.features:
            conv = nn.Conv(
                self.features - self.dv,
                pair(self.kernel_size, "kernel_size"),
                strides=strides,
                padding=self.padding,
                use_bias=self.use_bias,
                kernel_init=self.kernel_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv",
            )
            branches.append(conv(x))
        attention = SelfAttention2D(
            self.dk,
            self.dv,
            self.num_heads,
            position=self.position,
            sinusoidal_channels=self.sinusoidal_channels,
            implementation=self.implementation,
            memory_budget_bytes=self.memory_budget_bytes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention",
        )
        branches.append(attention(attention_input(x, strides)))
        return concat_branches(branches, self.padding)


def check_augmented_config(layer: Any) -> None:
    """Raise ValueError naming the argument when an augmented convolution's fields disagree."""
    check_attention_config(layer.dk, layer.dv, layer.num_heads, layer.position)
    if layer.dv > layer.features:
        raise ValueError(f"dv={layer.dv} must be <= features={layer.features}")
    pair(layer.kernel_size, "kernel_size")
    pair(layer.strides, "strides")


def attention_input(x: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """The attention branch's input: x, mean-pooled to the output resolution when strided."""
    return x if strides == (1, 1) else F.mean_pool(x, strides)


def attention_size(input_size: Sequence[int], strides: tuple[int, int]) -> tuple[int, int]:
    """The ``(H, W)`` the attention branch sees for an input of ``input_size``."""
    (height, width), (stride_h, stride_w) = input_size, strides
    return -(-height // stride_h), -(-width // stride_w)


def concat_branches(branches: list[jax.Array], padding: Any) -> jax.Array:
    """``Concat[Conv(X), MHA(X)]`` along channels, or a ValueError when their sizes differ."""
    if branches[0].shape[1:3] != branches[-1].shape[1:3]:
        raise ValueError(
            f"padding={padding!r} gives the convolution output {branches[0].shape[1:3]} but the "
            f"attention output {branches[-1].shape[1:3]}; use padding='SAME'"
        )
    return jnp.concatenate(branches, axis=-1)
