"""Relative position logits for 2-D self-attention (paper section 3.2, eq. 2).

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925.
The learned tables r^H ``[2H-1, d]`` and r^W ``[2W-1, d]`` hold one row per offset
``-(L-1) .. L-1``; row ``m`` is the offset ``m - (L - 1)``. They are shared across heads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "absolute_table",
    "heads_first_logit_factors",
    "rel_to_abs",
    "relative_index",
    "relative_logit_factors",
    "relative_logits",
    "resize_relative_table",
]


def relative_index(length: int) -> jax.Array:
    """``[L, L]`` integers ``idx[i, j] = j - i + L - 1``: the table row for the offset ``j - i``."""
    pos = jnp.arange(length)
    return pos[None, :] - pos[:, None] + length - 1


def rel_to_abs(x: jax.Array) -> jax.Array:
    """Relative to absolute indexing: ``[..., L, 2L-1] -> [..., L, L]``.

    ``out[..., i, j] = x[..., i, j - i + L - 1]``: column ``m`` of row ``i`` holds the logit for
    the offset ``m - (L - 1)``. The paper's listing computes this with pad-and-reshape; here it
    is a gather.
    """
    if x.ndim < 2 or x.shape[-1] != 2 * x.shape[-2] - 1:
        raise ValueError(f"rel_to_abs expects x of shape [..., L, 2L-1], got x.shape={x.shape}")
    idx = jnp.broadcast_to(relative_index(x.shape[-2]), (*x.shape[:-1], x.shape[-2]))
    return jnp.take_along_axis(x, idx, axis=-1)


def absolute_table(rel: jax.Array) -> jax.Array:
    """Expand a relative table ``[2L-1, d]`` to ``[L, L, d]``: ``out[i, j] = rel[j - i + L - 1]``."""
    return rel[relative_index((rel.shape[0] + 1) // 2)]


def check_tables(q: jax.Array, rel_h: jax.Array, rel_w: jax.Array) -> None:
    """Raise ValueError unless, for ``q [B, H, W, N, d]``, rel_h is ``[2H-1, d]`` and rel_w ``[2W-1, d]``."""
    if q.ndim != 5:
        raise ValueError(f"q must be 5-D [B, H, W, heads, depth], got q.shape={q.shape}")
    _, height, width, _, depth = q.shape
    for name, table, size, axis in (("rel_h", rel_h, height, "H"), ("rel_w", rel_w, width, "W")):
        if table.shape != (2 * size - 1, depth):
            raise ValueError(
                f"{name} must have shape (2*{axis}-1, depth) = {(2 * size - 1, depth)} "
                f"for q.shape={q.shape}, got {name}.shape={table.shape}"
            )


def relative_logit_factors(
    q: jax.Array, table_h: jax.Array, table_w: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The two factors of the relative logits, ``[B, N, R, W, H]`` and ``[B, N, R, W, W]`` (float32).

    ``q [B, R, W, N, d]`` holds R query rows; ``table_h [R, H, d]`` their rows of the absolute
    r^H table and ``table_w [W, W, d]`` the absolute r^W table (see :func:`absolute_table`).
    The relative logits are ``h[..., :, None] + w[..., None, :]``; kept apart they cost
    O(HW(H+W)) memory instead of O((HW)^2).
    """
    return heads_first_logit_factors(jnp.moveaxis(q, 3, 1), table_h, table_w)


def heads_first_logit_factors(
    q: jax.Array, table_h: jax.Array, table_w: jax.Array, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """:func:`relative_logit_factors` of heads-first queries ``q [B, N, R, W, d]``, in ``dtype``
    (q's dtype keeps their gradients in it too; XLA's CPU and GPU dots sum in float32 either way)."""
    logits_h = jnp.einsum("bnxyd,xzd->bnxyz", q, table_h, preferred_element_type=dtype)
    logits_w = jnp.einsum("bnxyd,ywd->bnxyw", q, table_w, preferred_element_type=dtype)
    return logits_h, logits_w


def relative_logits(q: jax.Array, rel_h: jax.Array, rel_w: jax.Array) -> jax.Array:
    """2-D relative position logits, ``[B, N, H, W, H, W]`` in float32, no scaling inside.

    ``out[b, n, x, y, x2, y2] = q[b, x, y, n] . (rel_h[x2 - x + H - 1] + rel_w[y2 - y + W - 1])``
    for ``q [B, H, W, N, d]``, ``rel_h [2H-1, d]``, ``rel_w [2W-1, d]``.
    """
    check_tables(q, rel_h, rel_w)
    logits_h, logits_w = relative_logit_factors(q, absolute_table(rel_h), absolute_table(rel_w))
    return logits_h[..., :, None] + logits_w[..., None, :]


def resize_relative_table(rel: jax.Array, length: int) -> jax.Array:
    """Adapt a table ``[2L-1, d]`` learned at size L to size ``length``: ``[2*length-1, d]``.

    Smaller sizes take the exact centre slice (offsets ``-(length-1) .. length-1``, unchanged
    values). Larger sizes interpolate linearly: the table is stretched like an image, so the
    learned offset ``o`` lands near ``o * length / L`` (an approximation; not in the paper).
    """
    rows = 2 * length - 1
    if rows == rel.shape[0]:
        return rel
    if rows < rel.shape[0]:
        start = (rel.shape[0] - rows) // 2
        return rel[start : start + rows]
    return jax.image.resize(rel, (rows, rel.shape[1]), method="linear").astype(rel.dtype)
