"""A straightforward dense port of the paper's listing, the baseline the library is measured against.

Bello et al., arXiv:1904.09925, figure 3 (relative logits): per axis, ``q . r`` against all 2L-1
offsets, the pad-and-reshape ``rel_to_abs``, then the 1-D logits tiled to ``(HW)^2`` and added to
the content logits. Benchmark use only: the library computes the same function without tiling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pad_reshape_rel_to_abs(x: jax.Array) -> jax.Array:
    """``[B, N, L, 2L-1] -> [B, N, L, L]`` by the paper's padding and reshaping."""
    batch, heads, length, _ = x.shape
    x = jnp.concatenate([x, jnp.zeros((batch, heads, length, 1), x.dtype)], axis=3)
    x = x.reshape(batch, heads, length * 2 * length)
    x = jnp.concatenate([x, jnp.zeros((batch, heads, length - 1), x.dtype)], axis=2)
    x = x.reshape(batch, heads, length + 1, 2 * length - 1)
    return x[:, :, :length, length - 1 :]


def _relative_logits_1d(q: jax.Array, rel: jax.Array) -> jax.Array:
    """``q [B, N, H, W, d]`` against offsets along W -> ``[B, N, H*W, H*W]`` (tiled over rows)."""
    batch, heads, height, width, _ = q.shape
    logits = jnp.einsum("bnhwd,md->bnhwm", q, rel).reshape(batch, heads * height, width, 2 * width - 1)
    logits = _pad_reshape_rel_to_abs(logits).reshape(batch, heads, height, width, 1, width)
    logits = jnp.tile(logits, (1, 1, 1, 1, height, 1))  # B, N, H, W, H, W
    return logits.reshape(batch, heads, height * width, height * width)


def paper_port_attention(q, k, v, rel_h, rel_w):
    """Same contract as :func:`aacn_jax.functional.self_attention_2d` with both tables."""
    batch, height, width, heads, depth = q.shape
    q = jnp.transpose(q * depth**-0.5, (0, 3, 1, 2, 4))  # B, N, H, W, d
    k = jnp.transpose(k, (0, 3, 1, 2, 4)).reshape(batch, heads, height * width, depth)
    v = jnp.transpose(v, (0, 3, 1, 2, 4)).reshape(batch, heads, height * width, -1)
    logits = jnp.einsum("bnqd,bnkd->bnqk", q.reshape(batch, heads, height * width, depth), k)
    rel_logits_w = _relative_logits_1d(q, rel_w)
    rel_logits_h = _relative_logits_1d(jnp.swapaxes(q, 2, 3), rel_h)  # keys and queries in W, H order
    rel_logits_h = rel_logits_h.reshape(batch, heads, width, height, width, height)
    rel_logits_h = jnp.transpose(rel_logits_h, (0, 1, 3, 2, 5, 4)).reshape(rel_logits_w.shape)
    weights = jax.nn.softmax(logits + rel_logits_h + rel_logits_w, axis=-1)
    out = jnp.einsum("bnqk,bnkd->bnqd", weights, v).reshape(batch, heads, height, width, -1)
    return jnp.transpose(out, (0, 2, 3, 1, 4))  # B, H, W, N, dv
