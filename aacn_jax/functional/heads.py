"""Splitting a fused query/key/value projection into heads, and merging heads back.

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925,
section 3.1: one 1x1 convolution computes queries, keys and values of every head; the heads'
outputs are concatenated before W^O. Shared by the linen and NNX layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["merge_heads", "split_heads"]


def split_heads(qkv: jax.Array, dk: int, dv: int, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[B, H, W, 2*dk + dv] -> q, k [B, H, W, N, dk/N]`` and ``v [B, H, W, N, dv/N]``."""
    if qkv.shape[-1] != 2 * dk + dv:
        raise ValueError(f"qkv.shape={qkv.shape} must end in 2*dk + dv = {2 * dk + dv} channels")
    batch, height, width, _ = qkv.shape
    q, k, v = jnp.split(qkv, [dk, 2 * dk], axis=-1)
    q = q.reshape(batch, height, width, num_heads, dk // num_heads)  # B, H, W, N, dkh
    k = k.reshape(batch, height, width, num_heads, dk // num_heads)  # B, H, W, N, dkh
    v = v.reshape(batch, height, width, num_heads, dv // num_heads)  # B, H, W, N, dvh
    return q, k, v


def merge_heads(out: jax.Array) -> jax.Array:
    """``[B, H, W, N, dvh] -> [B, H, W, N * dvh]``: the heads concatenated along channels."""
    batch, height, width, heads, depth = out.shape
    return out.reshape(batch, height, width, heads * depth)  # B, H, W, dv
