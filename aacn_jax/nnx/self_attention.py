"""Multi-head 2-D self-attention with relative position logits, as a Flax NNX module.

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925,
section 3.1-3.2. The twin of :class:`aacn_jax.layers.SelfAttention2D`: the same functional core,
hyperparameters, errors, parameter names and shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from aacn_jax import functional as F
from aacn_jax.layers.augmented_conv import pair
from aacn_jax.layers.self_attention import attend, check_attention_config, check_image

__all__ = ["AttentionWeights", "SelfAttention2D", "check_channels"]


class AttentionWeights(nnx.Intermediate):
    """The variable type under which a :class:`SelfAttention2D` stores its attention maps."""


def check_channels(x: jax.Array, in_features: int, layer: str) -> None:
    """Raise ValueError unless ``x`` is NHWC with the ``in_features`` channels the layer was built for."""
    check_image(x, layer)
    if x.shape[-1] != in_features:
        raise ValueError(f"{layer} was built for in_features={in_features} channels, got x.shape={x.shape}")


class SelfAttention2D(nnx.Module):
    """Multi-head self-attention over all pixels of an NHWC feature map (paper eqs. 1-2).

    ``qkv`` (1x1 conv to ``2*dk + dv`` channels), heads of depth ``dk / num_heads`` and
    ``dv / num_heads`` attending over all H*W positions, concatenated and mixed by ``out`` (1x1
    conv ``dv -> dv``, the paper's W^O); see :class:`aacn_jax.layers.SelfAttention2D`.

    Args:
      in_features: input channels C.
      dk, dv, num_heads: the paper's dk, dv and Nh (``num_heads`` divides both).
      input_size: ``(H, W)``, or one int for a square map, that the relative tables
        ``rel_h [2H-1, dk/Nh]`` and ``rel_w [2W-1, dk/Nh]`` are sized for (what the linen layer
        takes from its ``init`` input). Required with ``position="relative"``, unused
        otherwise. Other input sizes work as in linen: the centre of the tables for a smaller
        map, linear interpolation for a larger one.
      position, sinusoidal_channels, implementation, memory_budget_bytes, dtype, param_dtype:
        as in the linen layer.
      rngs: ``nnx.Rngs`` for the parameter initialisers.

    Attention maps: with ``sow_weights = True`` (what
    :func:`aacn_jax.nnx.capture_attention_weights` sets for one call) a call also stores its
    softmax probabilities ``[B, N, H, W, H, W]`` (float32) in the :class:`AttentionWeights`
    variable ``attention_weights``.
    """

    attention_weights: AttentionWeights  # set by a call with sow_weights, removed by its reader

    def __init__(
        self,
        in_features: int,
        dk: int,
        dv: int,
        num_heads: int,
        *,
        input_size: int | Sequence[int] | None = None,
        position: str = "relative",
        sinusoidal_channels: int = 32,
        implementation: str | None = None,
        memory_budget_bytes: int = F.DEFAULT_MEMORY_BUDGET_BYTES,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_attention_config(dk, dv, num_heads, position)
        if in_features < 1:
            raise ValueError(f"in_features={in_features} must be >= 1")
        self.in_features, self.dk, self.dv, self.num_heads = in_features, dk, dv, num_heads
        self.position, self.sinusoidal_channels = position, sinusoidal_channels
        self.implementation, self.memory_budget_bytes = implementation, memory_budget_bytes
        self.sow_weights = False
        conv = dict(kernel_size=(1, 1), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv_in = in_features + F.position_channel_count(position, sinusoidal_channels)
        self.qkv = nnx.Conv(qkv_in, 2 * dk + dv, **conv)
        self.out = nnx.Conv(dv, dv, **conv)
        if position == "relative":
            if input_size is None:
                raise ValueError(
                    "input_size=None: position='relative' sizes its tables for one feature-map size; "
                    "pass input_size=(H, W) of the map the layer will see (other sizes still work)"
                )
            height, width = pair(input_size, "input_size")
            depth = dk // num_heads
            init = nnx.initializers.normal(stddev=depth**-0.5)
            self.rel_h = nnx.Param(init(rngs.params(), (2 * height - 1, depth), param_dtype))
            self.rel_w = nnx.Param(init(rngs.params(), (2 * width - 1, depth), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, dv]``."""
        check_channels(x, self.in_features, "SelfAttention2D")
        height, width = x.shape[1:3]
        qkv = self.qkv(F.with_position_channels(x, self.position, self.sinusoidal_channels))
        rel_h = rel_w = None
        if self.position == "relative":
            rel_h = F.resize_relative_table(self.rel_h[...], height)
            rel_w = F.resize_relative_table(self.rel_w[...], width)
        store = None
        if self.sow_weights:
            store = lambda weights: setattr(self, "attention_weights", AttentionWeights(weights))
        return self.out(attend(self, qkv, rel_h, rel_w, store))
