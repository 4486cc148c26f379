"""Multi-head 2-D self-attention with relative position logits, as a Flax module.

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925,
section 3.1-3.2. The math lives in :mod:`aacn_jax.functional`; this module holds parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacn_jax import functional as F

__all__ = ["POSITIONS", "SelfAttention2D"]

POSITIONS = ("relative", "none", "sinusoidal", "coordconv")


def check_attention_config(dk: int, dv: int, num_heads: int, position: str) -> None:
    """Raise ValueError naming the argument when the attention hyperparameters are inconsistent."""
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} must be >= 1")
    for name, depth in (("dk", dk), ("dv", dv)):
        if depth < 1:
            raise ValueError(f"{name}={depth} must be >= 1")
        if depth % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide {name}={depth}")
    if position not in POSITIONS:
        raise ValueError(f"position={position!r} must be one of {POSITIONS}")


def check_image(x: jax.Array, layer: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{layer} expects a 4-D NHWC input [B, H, W, C], got x.shape={x.shape}")


class SelfAttention2D(nn.Module):
    """Multi-head self-attention over all pixels of an NHWC feature map (paper eqs. 1-2).

    A 1x1 convolution computes queries, keys and values (``2*dk + dv`` channels), which are
    split into ``num_heads`` heads; each head attends over all H*W positions; the heads are
    concatenated and mixed by a 1x1 convolution ``dv -> dv`` (the paper's W^O).

    Paper symbols: ``dk`` and ``dv`` are the total key and value depths, ``num_heads`` is Nh,
    dkh = dk / Nh and dvh = dv / Nh.

    Attributes:
      dk: total depth of queries and keys.
      dv: total depth of values, and the number of output channels.
      num_heads: Nh; must divide dk and dv.
      position: ``"relative"`` (the paper: learned tables r^H ``[2H-1, dkh]`` and r^W
        ``[2W-1, dkh]``, shared across heads, initialised N(0, dkh**-0.5) as a std),
        ``"none"`` (content only: permutation equivariant), ``"sinusoidal"`` or
        ``"coordconv"`` (absolute position channels concatenated to the attention input),
        the paper's ablation set.
      sinusoidal_channels: channels of the 2-D sine encoding (not stated in the paper).
      implementation, memory_budget_bytes: passed to :func:`aacn_jax.functional.self_attention_2d`.
      dtype, param_dtype: computation and parameter dtypes, as in ``flax.linen``.

    Input sizes: the relative tables get their size from the input seen at ``init``. Applied to
    a smaller map the layer uses the exact centre of its tables; applied to a larger map it
    interpolates them linearly (see :func:`aacn_jax.functional.resize_relative_table`).

    Attention maps: applied with ``mutable=["attention_weights"]``, the layer also stores its
    softmax probabilities ``[B, N, H, W, H, W]`` (float32, see
    :func:`aacn_jax.functional.attention_weights`) in that collection under ``"weights"`` (a
    one-element tuple, Flax's ``sow``), at the layer's path in any enclosing model::

        y, state = layer.apply(variables, x, mutable=["attention_weights"])
        weights = state["attention_weights"]["weights"][0]

    Otherwise (and in ``init``) nothing is computed or stored.
    """

    dk: int
    dv: int
    num_heads: int
    _: dataclasses.KW_ONLY
    position: str = "relative"
    sinusoidal_channels: int = 32
    implementation: str | None = None
    memory_budget_bytes: int = F.DEFAULT_MEMORY_BUDGET_BYTES
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_attention_config(self.dk, self.dv, self.num_heads, self.position)
        super().__post_init__()

    def _relative_table(self, name: str, length: int) -> jax.Array:
        depth = self.dk // self.num_heads
        shape = (2 * length - 1, depth)
        if self.has_variable("params", name):  # the size is fixed by the input seen at init
            shape = self.get_variable("params", name).shape
        table = self.param(name, nn.initializers.normal(stddev=depth**-0.5), shape, self.param_dtype)
        return F.resize_relative_table(table, length)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, dv]``."""
        check_image(x, "SelfAttention2D")
        height, width = x.shape[1:3]
        conv = dict(kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype)
        x = F.with_position_channels(x, self.position, self.sinusoidal_channels)
        qkv = nn.Conv(2 * self.dk + self.dv, name="qkv", **conv)(x)
        rel_h = rel_w = None
        if self.position == "relative":
            rel_h, rel_w = self._relative_table("rel_h", height), self._relative_table("rel_w", width)
        store = None
        if self.is_mutable_collection("attention_weights") and not self.is_initializing():
            store = lambda weights: self.sow("attention_weights", "weights", weights)
        return nn.Conv(self.dv, name="out", **conv)(attend(self, qkv, rel_h, rel_w, store))


def attend(
    layer: Any,
    qkv: jax.Array,
    rel_h: jax.Array | None,
    rel_w: jax.Array | None,
    store_weights: Callable[[jax.Array], Any] | None = None,
) -> jax.Array:
    """The heads of a 2-D self-attention layer (linen or NNX) between its two 1x1 convolutions.

    ``qkv [B, H, W, 2*dk + dv]`` is split into heads, attended with the tables (resized to the
    map, or None) by :func:`aacn_jax.functional.self_attention_2d` with the layer's
    ``implementation`` and ``memory_budget_bytes``, and the heads concatenated: ``[B, H, W, dv]``.
    ``store_weights``, if given, receives the softmax probabilities ``[B, N, H, W, H, W]``.
    """
    q, k, v = F.split_heads(qkv, layer.dk, layer.dv, layer.num_heads)  # B, H, W, N, dkh|dvh
    if rel_h is not None and rel_w is not None:
        rel_h, rel_w = rel_h.astype(q.dtype), rel_w.astype(q.dtype)
    if store_weights is not None:
        store_weights(F.attention_weights(q, k, rel_h, rel_w))
    out = F.self_attention_2d(
        q,
        k,
        v,
        rel_h,
        rel_w,
        implementation=layer.implementation,
        memory_budget_bytes=layer.memory_budget_bytes,
    )  # B, H, W, N, dvh
    return F.merge_heads(out)
