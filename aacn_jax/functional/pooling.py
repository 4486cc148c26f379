"""Non-overlapping mean pooling: the attention input of a strided augmented convolution and the
local extent of gather-excite."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mean_pool"]


def mean_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """``[B, H, W, C] -> [B, ceil(H / wh), ceil(W / ww), C]``: means of ``wh x ww`` cells.

    Stride = window with SAME padding (as ``jax.lax`` splits it: half before, the rest, one
    more when odd, after); a cell cut by the padding averages only its pixels inside the map.
    """
    if x.ndim != 4 or len(window) != 2 or min(window) < 1:
        raise ValueError(f"mean_pool needs x [B, H, W, C] and a window pair >= 1, got {x.shape}, {window}")
    dims = strides = (1, *window, 1)
    pads = jax.lax.padtype_to_pads(x.shape, dims, strides, "SAME")
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pads)
    return total / count
