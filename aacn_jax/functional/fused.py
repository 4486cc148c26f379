"""Relative attention as plain attention, so that fused flash-attention kernels compute it.

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925, eq. 2.

The relative logit of a query at (x, y) and a key at (x2, y2) is ``h[x2] + w[y2]`` with
``h[x2] = qs . r^H[x2 - x + H - 1]`` and ``w[y2] = qs . r^W[y2 - y + W - 1]`` (qs the scaled
query). Appending ``h`` and ``w`` to the query and the one-hot codes of x2 and y2 to the key
makes the whole logit one dot product::

    [qs, h, w] . [k, onehot_H(x2), onehot_W(y2)] = qs . k + h[x2] + w[y2]

so relative attention is plain attention of depth ``d + H + W``, which flash kernels compute
without writing the ``(HW)^2`` logits, forward and backward. Gradients reach q and the tables
through the factors' einsums (O(HW (H + W)) work); the one-hot columns are constants.

Kernels (all take and return ``[B, T, N, d]``, T = H*W tokens, the scale already applied):

- :func:`tpu_flash_attention`: JAX's Pallas TPU flash-attention kernel
  (``jax.experimental.pallas.ops.tpu.flash_attention``).
- :func:`gpu_flash_attention`: cuDNN's fused attention (``jax.nn.dot_product_attention``) for
  bfloat16/float16 where cuDNN is present and the depth fits, else JAX's Pallas GPU (Triton)
  flash-attention kernel (``jax.experimental.pallas.ops.gpu.attention``).

Both kernels need equal query, key and value depths: the shallower are padded with zero columns.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from aacn_jax.functional.relative import relative_logit_factors

__all__ = [
    "cudnn_attention",
    "fold_relative_logits",
    "gpu_flash_attention",
    "on_tokens",
    "tpu_flash_attention",
    "tpu_images_per_chunk",
    "tpu_relative_attention",
]

_TPU_BLOCK = 128  # the TPU kernel's blocks: its backward pass needs multiples of 128 tokens
_GPU_BLOCK = 128  # Triton's query/key blocks (JAX's default); maps up to 128 tokens use one block
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Images per recomputed chunk on a TPU (tpu_relative_attention): as many as keep one float32
# [images, N, tokens, 128] array (the kernel's l, m and di) within this. The compiler keeps such arrays
# of each layer's forward and backward loops apart, so their size is most of what the attention adds:
# AA-WRN-28-10's train step for v5e:1x1 (batch 128) holds 2.15 GiB of temporaries at 32 MiB, 1.30 GiB
# at 8 MiB (2 images a chunk at 32x32, 8 at 16x16), 1.12 GiB at 2 MiB (WRN-28-10: 0.59 GiB).
_TPU_CHUNK_BYTES = 8 * 2**20


def fold_relative_logits(
    q: jax.Array, k: jax.Array, table_h: jax.Array, table_w: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``q, k [B, H, W, N, d] -> [B, H, W, N, d + H + W]`` whose dot products are the full logits.

    ``q`` is the scaled query; ``table_h [H, H, d]`` and ``table_w [W, W, d]`` the absolute tables
    (:func:`aacn_jax.functional.absolute_table`). The factors are rounded to q's dtype.
    """
    height, width = q.shape[1:3]
    logits_h, logits_w = relative_logit_factors(q, table_h, table_w)  # B, N, H, W, H and B, N, H, W, W
    factors = [jnp.moveaxis(f, 1, 3).astype(q.dtype) for f in (logits_h, logits_w)]  # B, H, W, N, .
    onehot_h = jnp.broadcast_to(jnp.eye(height, dtype=k.dtype)[:, None, None, :], (*k.shape[:4], height))
    onehot_w = jnp.broadcast_to(jnp.eye(width, dtype=k.dtype)[None, :, None, :], (*k.shape[:4], width))
    return jnp.concatenate([q, *factors], axis=-1), jnp.concatenate([k, onehot_h, onehot_w], axis=-1)


def on_tokens(kernel: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Run ``kernel`` (on ``[B, T, N, d]``) on ``[B, H, W, N, d]`` inputs; the output ``[B, H, W, N, e]``."""

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        batch, height, width, heads, _ = q.shape
        flat = lambda x: x.reshape(batch, height * width, heads, x.shape[-1])  # B, T, N, d
        return kernel(flat(q), flat(k), flat(v)).reshape(v.shape)

    return attend


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad ``axis`` of x at the end to ``size``."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _padded(
    q: jax.Array, k: jax.Array, v: jax.Array, *, depth: int, tokens: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """q, k, v ``[B, T, N, .]`` zero-padded to ``[B, tokens, N, depth]``, and the valid-token ids
    ``[B, tokens]`` (1 for the T real tokens, 0 for padding), or None where nothing was padded."""
    batch, real_tokens = q.shape[:2]
    q, k, v = (_pad_axis(_pad_axis(x, 3, depth), 1, tokens) for x in (q, k, v))
    if tokens == real_tokens:
        return q, k, v, None
    return q, k, v, jnp.broadcast_to((jnp.arange(tokens) < real_tokens).astype(jnp.int32), (batch, tokens))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention ``[B, T, N, d], [B, T, N, d], [B, T, N, e] -> [B, T, N, e]`` on a TPU.

    Tokens are padded to a multiple of 128 (the kernel's backward pass takes key blocks of whole
    multiples of 128 lanes), the padded keys masked out by segment ids. Queries, keys and values
    are padded to one depth, a multiple of 128 above 128 (the kernel's rule).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu

    tokens, value_depth = v.shape[1], v.shape[3]
    depth = max(q.shape[-1], value_depth)
    depth = depth if depth <= 128 else _round_up(depth, 128)
    q, k, v, valid = _padded(q, k, v, depth=depth, tokens=_round_up(tokens, _TPU_BLOCK))
    q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))  # B, N, T, d
    # Padded queries attend to the real keys (their rows are dropped); padded keys are masked.
    segment_ids = None if valid is None else tpu.SegmentIds(q=jnp.ones_like(valid), kv=valid)
    sizes = [f.name for f in dataclasses.fields(tpu.BlockSizes) if f.name != "block_b"]
    blocks = tpu.BlockSizes(block_b=1, **dict.fromkeys(sizes, _TPU_BLOCK))
    out = tpu.flash_attention(q, k, v, segment_ids=segment_ids, sm_scale=1.0, block_sizes=blocks)
    return out.swapaxes(1, 2)[:, :tokens, :, :value_depth]


@functools.cache
def _cudnn_max_depth() -> int:
    """The deepest heads cuDNN's flash attention takes on this process's GPU, or 0 without one.

    Asked at trace time, only by the CUDA branch: a program lowered for CUDA on a machine without
    a CUDA GPU cannot hold a cuDNN call (JAX refuses to lower it) and takes the Triton kernel.
    JAX's CUDA builds bring cuDNN along with the GPU backend.
    """
    try:
        device = jax.devices("cuda")[0]
    except RuntimeError:
        return 0
    major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
    return 256 if major >= 9 else 128  # cuDNN 9: 256 from Hopper on, 128 before


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: Literal["cudnn", "xla"] = "cudnn"
) -> jax.Array:
    """cuDNN's fused attention ``[B, T, N, d], [B, T, N, d], [B, T, N, e] -> [B, T, N, e]``, any T.

    Depths are zero-padded to one multiple of 8. cuDNN's training kernels refuse an odd token
    count (JAX 0.11 on an H200: "Unsupported sequence length Q 49, KV 49"), so an odd T gets one
    padding token, shut out of every softmax by one extra depth column: 1 in each query, 0 in the
    real keys, -30000 in the padding key (its weight ``exp(-30000 - max)`` is exactly 0).
    ``implementation="xla"`` runs the same padding through XLA (tests on a CPU).
    """
    tokens, value_depth = v.shape[1], v.shape[3]
    if tokens % 2:
        column = jnp.ones((*q.shape[:3], 1), q.dtype)
        q = _pad_axis(jnp.concatenate([q, column], axis=-1), 1, tokens + 1)
        k = _pad_axis(jnp.concatenate([k, jnp.zeros_like(column)], axis=-1), 1, tokens + 1)
        k = k.at[:, tokens, :, -1].set(-30000)
    depth = _round_up(max(q.shape[-1], value_depth), 8)
    q, k, v, _ = _padded(q, k, v, depth=depth, tokens=q.shape[1])
    out = jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation)
    return out[:, :tokens, :, :value_depth]


def gpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Softmax attention ``[B, T, N, d], [B, T, N, d], [B, T, N, e] -> [B, T, N, e]`` on an NVIDIA GPU.

    :func:`cudnn_attention` for bfloat16/float16 when this process has a CUDA GPU with cuDNN and
    the depth fits; float32 through the Pallas Triton kernel, whose blocks need the tokens padded
    to a power of two up to 128 or a multiple of 128 beyond (masked by segment ids); float64
    (no kernel takes it) through XLA. ``interpret`` runs the Triton kernel in Pallas' interpreter
    (tests on a CPU).
    """
    with warnings.catch_warnings():  # JAX 0.12 deprecates it for tokamax, not a dependency here
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as triton

    tokens, value_depth = v.shape[1], v.shape[3]
    depth = max(q.shape[-1], value_depth)
    if not interpret and q.dtype in _CUDNN_DTYPES and _round_up(depth + tokens % 2, 8) <= _cudnn_max_depth():
        return cudnn_attention(q, k, v)
    if q.dtype not in (jnp.float32, *_CUDNN_DTYPES):  # float64: no flash kernel takes it
        q, k, v, _ = _padded(q, k, v, depth=depth, tokens=tokens)
        return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="xla")[..., :value_depth]
    padded = 1 << max(4, (tokens - 1).bit_length()) if tokens <= _GPU_BLOCK else _round_up(tokens, _GPU_BLOCK)
    # Padded queries (id 0) attend to padded keys only; their rows are dropped.
    q, k, v, segment_ids = _padded(q, k, v, depth=depth, tokens=padded)
    # float32 blocks of 128 x 128 overflow an H200's shared memory at depth 84 (measured): 64.
    block = min(padded, _GPU_BLOCK if q.dtype != jnp.float32 else _GPU_BLOCK // 2)
    sizes = ("block_q", "block_k", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq")
    blocks = triton.BlockSizes(**dict.fromkeys(sizes, block))
    out = triton.mha(q, k, v, segment_ids, sm_scale=1.0, block_sizes=blocks, interpret=interpret)
    return out[:, :tokens, :, :value_depth]


def tpu_images_per_chunk(batch: int, height: int, width: int, heads: int) -> int:
    """The images :func:`tpu_relative_attention` attends to at once: the most (a divisor of ``batch``)
    whose float32 ``[images, N, tokens, 128]`` arrays fit ``_TPU_CHUNK_BYTES``, at least one."""
    per_image = heads * _round_up(height * width, _TPU_BLOCK) * 128 * 4
    most = max(1, _TPU_CHUNK_BYTES // per_image)
    return max(d for d in range(1, min(batch, most) + 1) if batch % d == 0)


def tpu_relative_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    table_h: jax.Array | None,
    table_w: jax.Array | None,
    *,
    kernel: Callable[..., jax.Array] = tpu_flash_attention,
    images_per_chunk: int | None = None,
) -> jax.Array:
    """Relative attention on a TPU: scaled ``q, k [B, H, W, N, dk]``, ``v [B, H, W, N, dv]``, absolute
    tables (or None) -> ``[B, H, W, N, dv]``, folded (:func:`fold_relative_logits`) and attended by
    ``kernel`` (on ``[B, T, N, d]``) a few images at a time, recomputed in the backward pass.

    Why, from the buffer assignment of AA-WRN-28-10's train step compiled for v5e:1x1 (batch 128,
    bfloat16; 10.96 GiB temporaries, WRN-28-10 0.59 GiB): the TPU pads the minor dimension of every
    array to 128 lanes, and everything this attention holds has a small one. Each 32x32 layer
    kept for its backward pass, from forward to backward, the kernel's residuals: l and m as
    float32 ``[B, N, T, 128]`` (the kernel's layout: 128 copies of one number per query, 512 MiB each),
    q, k, v and the output at the folded depth 84 (256 MiB each, padded to 128 lanes), and the
    folded ``[B, H, W, N, 84]`` q and k besides; four such layers made most of the 11 GiB.
    Here:

    - nothing of the attention is kept between the passes but its inputs (``jax.checkpoint``:
      the backward pass runs the forward kernel again, one extra kernel call per layer), and
      they are kept lane-dense, as ``[B, H, W*N*d]`` (a ``[.., N, d]`` minor pair pads 20 or 2 lanes
      to 128: 6.4x and 64x);
    - the folding, the kernels and their residuals exist for ``images_per_chunk`` images at a time
      (:func:`tpu_images_per_chunk`; ``lax.map``), so the one-hot keys, the factors at depth 84
      and l, m, di are a chunk's, not the batch's. The kernel's grid over images and heads runs in
      sequence on a TPU core anyway, so a chunk of 2 images x 8 heads still gives it 16 programs
      per query block (what the smaller calls cost in time has not been measured on a TPU).
    """
    batch, height, width, heads, _ = q.shape
    chunk = images_per_chunk or tpu_images_per_chunk(batch, height, width, heads)
    if batch % chunk:
        raise ValueError(f"images_per_chunk={chunk} must divide the batch {batch}")

    def attend(qkv: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        q, k, v = (x.reshape(chunk, height, width, heads, -1) for x in qkv)  # c, H, W, N, d
        if table_h is not None and table_w is not None:
            q, k = fold_relative_logits(q, k, table_h, table_w)
        out = on_tokens(kernel)(q, k, v)  # c, H, W, N, dv
        return out.reshape(chunk, height, -1)  # c, H, W*N*dv: lane-dense

    chunks = tuple(x.reshape(batch // chunk, chunk, height, -1) for x in (q, k, v))  # B/c, c, H, W*N*d
    out = jax.lax.map(jax.checkpoint(attend), chunks)  # B/c, c, H, W*N*dv
    return out.reshape(v.shape)
