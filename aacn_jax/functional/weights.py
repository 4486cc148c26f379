"""The attention probabilities of 2-D self-attention, for inspection (paper section 3, eqs. 1-2).

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925.
:func:`aacn_jax.functional.self_attention_2d` never returns its softmax weights (its blockwise
path never holds them all); this function computes them on their own, with the same logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aacn_jax.functional.relative import relative_logits

__all__ = ["attention_weights"]


def attention_weights(
    q: jax.Array, k: jax.Array, rel_h: jax.Array | None = None, rel_w: jax.Array | None = None
) -> jax.Array:
    """Softmax attention probabilities ``[B, N, H, W, H, W]`` (float32) of :func:`self_attention_2d`.

    ``out[b, n, x, y]`` is query pixel ``(x, y)``'s distribution over the H*W key pixels: the
    softmax of ``q' . k + relative_logits(q', rel_h, rel_w)`` with ``q' = q * dk**-0.5``, so
    ``self_attention_2d(q, k, v, rel_h, rel_w)[b, x, y, n] == sum_{x2, y2} out[b, n, x, y, x2, y2]
    * v[b, x2, y2, n]``. Holds all ``B*N*(HW)^2`` weights: meant for one image, not for training.

    Args:
      q, k: ``[B, H, W, N, dk]`` queries and keys.
      rel_h, rel_w: relative tables ``[2H-1, dk]`` and ``[2W-1, dk]``, or both None (content only).
    """
    if q.ndim != 5 or q.shape != k.shape:
        raise ValueError(
            "q and k must be 5-D [B, H, W, heads, depth] of one shape, "
            f"got q.shape={q.shape}, k.shape={k.shape}"
        )
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_h and rel_w must be given together (both or neither)")
    batch, height, width, heads, depth = q.shape
    q = q * jnp.asarray(depth**-0.5, q.dtype)
    logits = jnp.einsum("bxynd,bzwnd->bnxyzw", q, k, preferred_element_type=jnp.float32)  # B, N, H, W, H, W
    if rel_h is not None and rel_w is not None:
        logits = logits + relative_logits(q, rel_h.astype(q.dtype), rel_w.astype(q.dtype))
    flat = logits.reshape(batch, heads, height, width, height * width)  # B, N, H, W, HW
    return jax.nn.softmax(flat, axis=-1).reshape(logits.shape)
