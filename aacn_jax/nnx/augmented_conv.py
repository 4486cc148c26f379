"""Attention-augmented convolution as a Flax NNX module: a convolution concatenated with 2-D self-attention.

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925,
section 3.3, eq. 3. The twin of :class:`aacn_jax.layers.AugmentedConv`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from aacn_jax import functional as F
from aacn_jax.layers.augmented_conv import (
    attention_input,
    attention_size,
    check_augmented_config,
    concat_branches,
    pair,
)
from aacn_jax.nnx.self_attention import SelfAttention2D, check_channels

__all__ = ["AugmentedConv"]

DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()  # flax.linen.Conv's, as in the linen layer


class AugmentedConv(nnx.Module):
    """``Concat[Conv(X), MHA(X)]``: ``conv`` (k x k, ``features - dv`` filters, absent when
    ``dv == features``) and ``attention`` (:class:`SelfAttention2D`, ``dv`` channels, on the input
    mean-pooled to the output resolution when strided); see :class:`aacn_jax.layers.AugmentedConv`.

    Args:
      in_features: input channels C.
      features: output channels (Fout).
      kernel_size, strides: int or pair.
      dk, dv, num_heads, position, ...: as in the linen layer.
      input_size: ``(H, W)`` (or one int) of this layer's input; the relative tables are sized
        for the attention branch's map, ``ceil(input_size / strides)``. Required with
        ``position="relative"``.
      padding, use_bias, kernel_init: of the convolution branch (``kernel_init`` defaults to
        ``lecun_normal``, as in linen).
      rngs: ``nnx.Rngs`` for the parameter initialisers.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        dk: int,
        dv: int,
        num_heads: int = 8,
        input_size: int | Sequence[int] | None = None,
        position: str = "relative",
        sinusoidal_channels: int = 32,
        implementation: str | None = None,
        memory_budget_bytes: int = F.DEFAULT_MEMORY_BUDGET_BYTES,
        padding: str = "SAME",
        use_bias: bool = False,
        kernel_init: Callable = DEFAULT_KERNEL_INIT,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.features, self.kernel_size = in_features, features, kernel_size
        self.strides, self.dk, self.dv, self.num_heads, self.position = strides, dk, dv, num_heads, position
        check_augmented_config(self)
        self.padding = padding
        if dv < features:
            self.conv = nnx.Conv(
                in_features,
                features - dv,
                pair(kernel_size, "kernel_size"),
                pair(strides, "strides"),
                padding=padding,
                use_bias=use_bias,
                kernel_init=kernel_init,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        if input_size is not None:
            input_size = attention_size(pair(input_size, "input_size"), pair(strides, "strides"))
        self.attention = SelfAttention2D(
            in_features,
            dk,
            dv,
            num_heads,
            input_size=input_size,
            position=position,
            sinusoidal_channels=sinusoidal_channels,
            implementation=implementation,
            memory_budget_bytes=memory_budget_bytes,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), features]`` (SAME padding)."""
        check_channels(x, self.in_features, "AugmentedConv")
        branches = [self.conv(x)] if self.dv < self.features else []
        branches.append(self.attention(attention_input(x, pair(self.strides, "strides"))))
        return concat_branches(branches, self.padding)
