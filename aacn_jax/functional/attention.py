"""2-D multi-head self-attention with relative position logits (paper section 3, eqs. 1-2).

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925.

Queries and keys are ``[B, H, W, N, dk]``, values ``[B, H, W, N, dv]`` (NHWC, heads after
space). Paper symbols: N is Nh, dk/dv here are the per-head depths dkh/dvh.

Two implementations compute the same function:
- ``"dense"``: all ``B*N*(HW)^2`` logits at once. The relative terms are added by broadcasting
  the ``[B, N, H, W, H]`` and ``[B, N, H, W, W]`` factors, never tiled to (HW)^2 copies.
- ``"blockwise"``: query rows in blocks of ``block_size`` rows; each block attends to all keys
  and is rematerialised in the backward pass, so the largest temporary is
  ``B*N*block_size*W*HW`` logits instead of ``B*N*(HW)^2``.
``implementation=None`` picks dense when its logits fit in ``memory_budget_bytes``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aacn_jax.functional.relative import absolute_table, check_tables, relative_logit_factors

__all__ = ["self_attention_2d", "IMPLEMENTATIONS", "DEFAULT_MEMORY_BUDGET_BYTES"]

IMPLEMENTATIONS = ("dense", "blockwise")
# Float32 logits the automatic choice lets the dense path hold at once (per call, per device).
DEFAULT_MEMORY_BUDGET_BYTES = 64 * 2**20


def _check_args(q, k, v, rel_h, rel_w) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 5:
            raise ValueError(f"{name} must be 5-D [B, H, W, heads, depth], got {name}.shape={x.shape}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q.shape={q.shape}, k.shape={k.shape}")
    if v.shape[:4] != q.shape[:4]:
        raise ValueError(f"v must match q in [B, H, W, heads], got v.shape={v.shape}, q.shape={q.shape}")
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_h and rel_w must be given together (both or neither)")
    if rel_h is not None:
        check_tables(q, rel_h, rel_w)


def _attend(q, k, v, table_h, table_w):
    """Attention of a slab of query rows to all keys.

    q ``[B, R, W, N, d]`` (R query rows), k ``[B, H, W, N, d]``, v ``[B, H, W, N, dv]``;
    table_h ``[R, H, d]`` (absolute r^H rows of those queries), table_w ``[W, W, d]``, or both None.
    """
    batch, rows, width, heads, _ = q.shape
    keys = k.shape[1] * k.shape[2]
    logits = jnp.einsum("bxynd,bzwnd->bnxyzw", q, k, preferred_element_type=jnp.float32)  # B, N, R, W, H, W
    if table_h is not None:
        logits_h, logits_w = relative_logit_factors(q, table_h, table_w)  # B,N,R,W,H and B,N,R,W,W
        logits = logits + logits_h[..., :, None] + logits_w[..., None, :]
    logits = logits.reshape(batch, heads, rows, width, keys)  # B, N, R, W, HW
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    weights = weights.reshape(logits.shape[:-1] + k.shape[1:3])  # B, N, R, W, H, W
    return jnp.einsum("bnxyzw,bzwnd->bxynd", weights, v)  # B, R, W, N, dv


def _tables(rel_h, rel_w, dtype):
    if rel_h is None:
        return None, None
    return absolute_table(rel_h).astype(dtype), absolute_table(rel_w).astype(dtype)


def _dense(q, k, v, rel_h, rel_w):
    table_h, table_w = _tables(rel_h, rel_w, q.dtype)
    return _attend(q, k, v, table_h, table_w)


def _blockwise(q, k, v, rel_h, rel_w, block_size):
    batch, height, width, heads, depth = q.shape
    block_size = min(block_size, height)
    num_blocks = -(-height // block_size)
    pad = num_blocks * block_size - height
    table_h, table_w = _tables(rel_h, rel_w, q.dtype)
    q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    q_blocks = q_blocks.reshape(batch, num_blocks, block_size, width, heads, depth)
    q_blocks = jnp.moveaxis(q_blocks, 1, 0)  # blocks, B, block, W, N, d
    if table_h is not None:
        table_h = jnp.pad(table_h, ((0, pad), (0, 0), (0, 0)))
        table_h = table_h.reshape(num_blocks, block_size, height, depth)  # blocks, block, H, d

    @jax.checkpoint
    def block(args):
        q_block, table_h_block = args
        return _attend(q_block, k, v, table_h_block, table_w)

    out = jax.lax.map(block, (q_blocks, table_h))  # blocks, B, block, W, N, dv
    out = jnp.moveaxis(out, 0, 1).reshape(batch, num_blocks * block_size, width, heads, -1)
    return out[:, :height]


def dense_logits_bytes(q_shape) -> int:
    """Bytes of the float32 ``[B, N, HW, HW]`` logits the dense path materialises."""
    batch, height, width, heads, _ = q_shape
    return 4 * batch * heads * (height * width) ** 2


def default_block_size(q_shape, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> int:
    """Largest number of query rows whose float32 logits fit in ``memory_budget_bytes`` (at least 1)."""
    row_bytes = dense_logits_bytes(q_shape) // q_shape[1]
    return max(1, min(q_shape[1], memory_budget_bytes // row_bytes))


def self_attention_2d(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rel_h: jax.Array | None = None,
    rel_w: jax.Array | None = None,
    *,
    implementation: str | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
    """Multi-head 2-D self-attention with optional relative position logits.

    Args:
      q, k: ``[B, H, W, N, dk]`` queries and keys (N heads of depth dk).
      v: ``[B, H, W, N, dv]`` values.
      rel_h, rel_w: relative tables ``[2H-1, dk]`` and ``[2W-1, dk]`` shared across heads, or
        both None for plain content-only attention.
      implementation: ``"dense"``, ``"blockwise"`` or None (dense if its float32 logits fit in
        ``memory_budget_bytes``, else blockwise).
      block_size: query rows per block for the blockwise path; None fits the budget.
      memory_budget_bytes: logits budget for the automatic choices.

    Returns:
      ``[B, H, W, N, dv]`` in q's dtype: for each query pixel, the softmax over all H*W key
      pixels of ``q' . k + relative_logits(q', rel_h, rel_w)``, applied to v, where
      ``q' = q * dk**-0.5`` (the paper scales q before both terms). Logits and softmax are
      float32 whatever the input dtype.
    """
    _check_args(q, k, v, rel_h, rel_w)
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"implementation={implementation!r} must be one of {IMPLEMENTATIONS} or None")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    if implementation is None:
        fits = dense_logits_bytes(q.shape) <= memory_budget_bytes
        implementation = "dense" if fits else "blockwise"
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    if implementation == "dense":
        out = _dense(q, k, v, rel_h, rel_w)
    else:
        out = _blockwise(q, k, v, rel_h, rel_w, block_size or default_block_size(q.shape, memory_budget_bytes))
    return out.astype(q.dtype)
