"""2-D multi-head self-attention with relative position logits (paper section 3, eqs. 1-2).

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925.

Queries and keys are ``[B, H, W, N, dk]``, values ``[B, H, W, N, dv]`` (NHWC, heads after
space). Paper symbols: N is Nh, dk/dv here are the per-head depths dkh/dvh.

Three implementations compute the same function; none tiles the relative logits to (HW)^2
copies. The XLA paths (dense, blockwise) add the factors ``[.., H]`` and ``[.., W]`` of each
query's relative logits by broadcasting; both work heads first (``[B, N, H, W, d]``), so that
their matmuls read q, k, v and the softmax weights as laid out, with no transposed copies of the
``(HW)^2`` arrays.

- ``implementation="dense"``: all ``B*N*(HW)^2`` logits at once, plain autodiff (the softmax
  weights are kept for the backward pass). Fastest while it fits.
- ``implementation="blockwise"``: query rows in blocks; each block attends to every key. A custom
  VJP keeps only the output and the per-query log-sum-exp and rebuilds each block's softmax in
  the backward pass, as memory-efficient ("flash") attention does, so the largest temporary is
  one block's logits ``B*N*block_size*W*HW``.
- ``implementation="fused"``: the relative logits folded into the dot product
  (:mod:`aacn_jax.functional.fused`), then plain flash attention: the Pallas TPU kernel on a TPU
  (its inputs in float32 on v2/v3, where Mosaic has no bfloat16 matmul),
  cuDNN or the Pallas Triton kernel on an NVIDIA GPU, the blockwise path elsewhere. On an
  accelerator no ``(HW)^2`` array, forward or backward.
- ``implementation="mgpu"``: on an NVIDIA GPU the Mosaic GPU kernels of
  :mod:`aacn_jax.functional.relative_mgpu` (Hopper; bfloat16/float16), which add the relative
  factors inside their tile loops (no folded depth); float32, a JAX without Mosaic GPU's warpgroup
  kernels, and every other platform take ``"fused"``'s route. Opt-in until measured on a GPU.
- ``implementation=None``: fused on a TPU or an NVIDIA GPU (where it has a kernel); elsewhere (a
  CPU) dense when its float32 logits fit ``memory_budget_bytes``, else blockwise with the largest
  block that fits (and at least two blocks). The choice is made per platform with
  ``jax.lax.platform_dependent``, so a program exported for a TPU or GPU from a CPU machine holds
  the accelerator's path; under a mesh whose devices are known, only their platform's branches are
  traced (``_by_platform``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from aacn_jax.functional import relative_mgpu
from aacn_jax.functional.fused import (
    fold_relative_logits,
    gpu_flash_attention,
    on_tokens,
    tpu_flash_attention,
    tpu_relative_attention,
)
from aacn_jax.functional.relative import absolute_table, check_tables, heads_first_logit_factors

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "IMPLEMENTATIONS",
    "dense_logits_bytes",
    "self_attention_2d",
]

IMPLEMENTATIONS = ("dense", "blockwise", "fused", "mgpu")
# Measured on the project's 2-core CPU (benchmarks/attention.py): the dense path is fastest up to
# a few tens of MiB of float32 logits; beyond, blockwise with blocks of at most ~8 MiB of logits
# (cache-sized) is both faster and far leaner than dense.
DEFAULT_MEMORY_BUDGET_BYTES = 32 * 2**20  # dense logits allowed by implementation=None
DEFAULT_BLOCK_BYTES = 8 * 2**20  # logits of one block when block_size=None
_FUSED_VALUE_DEPTH = 8  # per-head value depth up to which _value_products avoids a matmul
_F32 = jnp.float32
# Mosaic multiplies bfloat16 matrices from TPU v4 on; for v3 (libtpu 0.0.42 and 0.0.50) the kernel
# fails to compile ("CompileTimeMosaicUnsupportedRhsType: Unsupported matmul RHS type on target:
# vector<128x128xbf16>"), in float32 it compiles: there the kernel takes float32 inputs.
_TPUS_WITHOUT_BF16_MATMUL = ("TPU v2", "TPU v3")
Array = jax.Array
Table = jax.Array | None  # a relative table, or None for content-only attention


def _check_args(q: Array, k: Array, v: Array, rel_h: Table, rel_w: Table) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 5:
            raise ValueError(f"{name} must be 5-D [B, H, W, heads, depth], got {name}.shape={x.shape}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q.shape={q.shape}, k.shape={k.shape}")
    if v.shape[:4] != q.shape[:4]:
        raise ValueError(f"v must match q in [B, H, W, heads], got v.shape={v.shape}, q.shape={q.shape}")
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_h and rel_w must be given together (both or neither)")
    if rel_h is not None and rel_w is not None:
        check_tables(q, rel_h, rel_w)


def _block_logits(q: Array, k: Array, table_h: Table, table_w: Table) -> Array:
    """Logits ``[B, N, R*W, H*W]`` (float32) of R query rows ``q [B, N, R, W, d]`` against all keys.

    ``k [B, N, H*W, d]``; ``table_h [R, H, d]`` are the query rows' absolute r^H entries,
    ``table_w [W, W, d]``; or both None.
    """
    batch, heads, rows, width, depth = q.shape
    queries = q.reshape(batch, heads, rows * width, depth)
    logits = jnp.einsum("bnqd,bntd->bnqt", queries, k, preferred_element_type=_F32)
    if table_h is None or table_w is None:
        return logits
    logits_h, logits_w = heads_first_logit_factors(q, table_h, table_w)  # B,N,R,W,H and B,N,R,W,W
    logits = logits.reshape(*logits_h.shape, width) + logits_h[..., :, None] + logits_w[..., None, :]
    return logits.reshape(*queries.shape[:-1], -1)


def _value_products(d_out: Array, v: Array) -> Array:
    """``d_out[q] . v[t]`` for every query q and key t: ``[B, N, Q, T]`` float32.

    Attention augmentation's values are shallow per head (the paper's dv / Nh is 1-8): there a sum
    of broadcast products, which XLA fuses into the softmax backward instead of writing the
    ``(Q, T)`` product of a matmul to memory; a matmul for deeper values.
    """
    if v.shape[-1] > _FUSED_VALUE_DEPTH:
        return jnp.einsum("bnqe,bnte->bnqt", d_out, v, preferred_element_type=_F32)
    d_out, v = d_out.astype(_F32), v.astype(_F32)
    return functools.reduce(
        jnp.add, (d_out[..., :, None, e] * v[..., None, :, e] for e in range(v.shape[-1]))
    )


def _forward_block(q: Array, k: Array, v: Array, table_h: Table, table_w: Table) -> tuple[Array, Array]:
    """Output ``[B, N, R*W, dv]`` (float32) and log-sum-exp ``[B, N, R*W]`` of rows ``q [B, N, R, W, d]``."""
    logits = _block_logits(q, k, table_h, table_w)
    if table_h is not None:
        # Write the summed logits once for the max and the exponential to read: left to itself,
        # XLA:CPU recomputes the broadcast sum inside the exponential's loop, which measured 5-22%
        # slower forward+backward at 16x16-56x56 maps (JAX 0.12; JAX 0.10's XLA drops the barrier).
        logits = jax.lax.optimization_barrier(logits)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - peak)  # unnormalised
    total = jnp.sum(weights, axis=-1)
    out = jnp.einsum("bnqt,bnte->bnqe", weights.astype(v.dtype), v, preferred_element_type=_F32)
    return out / total[..., None], peak[..., 0] + jnp.log(total)  # normalise the small output


def _backward_block(
    q: Array, k: Array, v: Array, table_h: Table, table_w: Table, d_out: Array, delta: Array, lse: Array
) -> tuple[Array, Array, Array, Table, Table]:
    """Gradients of rows ``q [B, N, R, W, d]``: dq and this block's dk^T, dv^T, d table_h, d table_w.

    ``d_out [B, N, R*W, dv]``; ``delta [B, N, R*W]`` is ``sum(d_out * out)`` per query, ``lse`` the
    forward log-sum-exp. dk and dv come transposed (``[B, N, d, H*W]``), the layout in which their
    matmuls read the ``[.., R*W, H*W]`` weights without transposing them.
    """
    batch, heads, rows, width, depth = q.shape
    weights = jnp.exp(_block_logits(q, k, table_h, table_w) - lse[..., None])  # B, N, RW, HW
    d_logits = weights * (_value_products(d_out, v) - delta[..., None])  # softmax backward
    d_q = jnp.einsum("bnqt,bntd->bnqd", d_logits.astype(q.dtype), k, preferred_element_type=_F32)
    d_q = d_q.reshape(q.shape)
    # The contractions over queries take float32 operands: XLA:CPU runs them outside fusions, where
    # it has no bfloat16 x bfloat16 -> float32 dot ("Unsupported element type for DotThunk").
    queries = q.reshape(batch, heads, rows * width, depth).astype(_F32)
    d_k_t = jnp.einsum("bnqd,bnqt->bndt", queries, d_logits)
    d_v_t = jnp.einsum("bnqe,bnqt->bnet", d_out.astype(_F32), weights)
    if table_h is None or table_w is None:
        return d_q, d_k_t, d_v_t, None, None
    d_logits = d_logits.reshape(batch, heads, rows, width, table_h.shape[1], width)  # B, N, R, W, H, W
    d_h = jnp.sum(d_logits, axis=-1)  # B, N, R, W, H
    d_w = jnp.sum(d_logits, axis=-2)  # B, N, R, W, W
    table_h, table_w = table_h.astype(_F32), table_w.astype(_F32)
    d_q += jnp.einsum("bnxyz,xzd->bnxyd", d_h, table_h)
    d_q += jnp.einsum("bnxyw,ywd->bnxyd", d_w, table_w)
    queries = queries.reshape(d_q.shape)
    d_table_h = jnp.einsum("bnxyz,bnxyd->xzd", d_h, queries)
    d_table_w = jnp.einsum("bnxyw,bnxyd->ywd", d_w, queries)
    return d_q, d_k_t, d_v_t, d_table_h, d_table_w


def _to_blocks(x: Array, block_size: int, axis: int) -> Array:
    """Pad ``axis`` to a multiple of ``block_size`` and move the blocks to a new leading axis."""
    pad = -x.shape[axis] % block_size
    x = jnp.pad(x, [(0, pad if i == axis else 0) for i in range(x.ndim)])
    x = x.reshape(*x.shape[:axis], -1, block_size, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _from_blocks(x: Array, axis: int, length: int) -> Array:
    """Inverse of :func:`_to_blocks`: merge the leading block axis back into ``axis``, unpadded."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _dense(q: Array, k: Array, v: Array, table_h: Table, table_w: Table) -> Array:
    """All ``[B, N, HW, HW]`` logits at once, differentiated by JAX. Output ``[B, N, H, W, dv]``."""
    weights = jax.nn.softmax(_block_logits(q, k, table_h, table_w), axis=-1).astype(v.dtype)
    out = jnp.einsum("bnqt,bnte->bnqe", weights, v, preferred_element_type=_F32)
    return out.reshape(*q.shape[:-1], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q: Array, k: Array, v: Array, table_h: Table, table_w: Table, block_size: int) -> Array:
    return _attention_fwd(q, k, v, table_h, table_w, block_size)[0]


def _attention_fwd(
    q: Array, k: Array, v: Array, table_h: Table, table_w: Table, block_size: int
) -> tuple[Array, tuple[Any, ...]]:
    """Blockwise attention of ``q [B, N, H, W, d]``, ``k [B, N, HW, d]``, ``v [B, N, HW, dv]``."""
    height, width = q.shape[2:4]
    blocks = (_to_blocks(q, block_size, 2), None if table_h is None else _to_blocks(table_h, block_size, 0))

    def step(_: None, xs: tuple[Array, Table]) -> tuple[None, tuple[Array, Array]]:
        q_block, table_h_block = xs
        return None, _forward_block(q_block, k, v, table_h_block, table_w)

    _, (out, lse) = jax.lax.scan(step, None, blocks)  # blocks, B, N, rows*W, dv and blocks, B, N, rows*W
    out = out.reshape(*out.shape[:3], block_size, width, -1)  # blocks, B, N, rows, W, dv
    out = _from_blocks(out, 2, height).astype(v.dtype)  # B, N, H, W, dv
    return out, (q, k, v, table_h, table_w, out, lse)


def _attention_bwd(block_size: int, residuals: tuple[Any, ...], d_out: Array) -> tuple[Any, ...]:
    q, k, v, table_h, table_w, out, lse = residuals
    batch, heads, height = q.shape[:3]
    delta = jnp.einsum("bnxye,bnxye->bnxy", d_out, out, preferred_element_type=_F32)
    blocks = (
        _to_blocks(q, block_size, 2),
        None if table_h is None else _to_blocks(table_h, block_size, 0),
        _to_blocks(d_out, block_size, 2),
        _to_blocks(delta, block_size, 2),
        lse,
    )

    def step(carry: Any, xs: tuple[Any, ...]) -> tuple[Any, Any]:
        q_block, table_h_block, d_out_block, delta_block, lse_block = xs
        d_out_block = d_out_block.reshape(batch, heads, -1, d_out_block.shape[-1])
        delta_block = delta_block.reshape(batch, heads, -1)
        d_q, d_k_t, d_v_t, d_table_h, d_table_w = _backward_block(
            q_block, k, v, table_h_block, table_w, d_out_block, delta_block, lse_block
        )
        carry = jax.tree.map(jnp.add, carry, (d_k_t, d_v_t, d_table_w))
        return carry, (d_q, d_table_h)

    tokens = k.shape[2]
    zeros = (
        jnp.zeros((batch, heads, k.shape[3], tokens), _F32),
        jnp.zeros((batch, heads, v.shape[3], tokens), _F32),
        None if table_w is None else jnp.zeros(table_w.shape, _F32),
    )
    (d_k_t, d_v_t, d_table_w), (d_q, d_table_h) = jax.lax.scan(step, zeros, blocks)
    d_q = _from_blocks(d_q, 2, height)
    if table_h is not None:
        d_table_h = _from_blocks(d_table_h, 0, height)
    d_k, d_v = jnp.swapaxes(d_k_t, -1, -2), jnp.swapaxes(d_v_t, -1, -2)
    grads = zip((d_q, d_k, d_v, d_table_h, d_table_w), (q, k, v, table_h, table_w), strict=True)
    return tuple(None if g is None else g.astype(x.dtype) for g, x in grads)


_attention.defvjp(_attention_fwd, _attention_bwd)


def dense_logits_bytes(q_shape: Sequence[int]) -> int:
    """Bytes of the float32 ``[B, N, HW, HW]`` logits of the dense path."""
    batch, height, width, heads, _ = q_shape
    return 4 * batch * heads * (height * width) ** 2


def _heads_first(q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
    """``[B, H, W, N, d]`` -> q ``[B, N, H, W, d]``, k and v ``[B, N, H*W, d]``."""
    batch, height, width, heads, _ = q.shape
    keys, values = (jnp.moveaxis(x, 3, 1).reshape(batch, heads, height * width, -1) for x in (k, v))
    return jnp.moveaxis(q, 3, 1), keys, values


def _xla_attention(
    q: Array, k: Array, v: Array, table_h: Table, table_w: Table, *, dense: bool, block_size: int | None
) -> Array:
    """The dense or blockwise path on scaled ``[B, H, W, N, d]`` inputs; ``[B, N, H, W, dv]`` out."""
    queries, keys, values = _heads_first(q, k, v)
    if dense:
        return _dense(queries, keys, values, table_h, table_w).astype(v.dtype)
    if block_size is None:  # the most rows that fit DEFAULT_BLOCK_BYTES, and at least two blocks
        row_bytes = dense_logits_bytes(q.shape) // q.shape[1]
        block_size = max(1, min(DEFAULT_BLOCK_BYTES // row_bytes, q.shape[1] // 2))
    return _attention(queries, keys, values, table_h, table_w, min(block_size, q.shape[1]))


def _fused_attention(
    q: Array, k: Array, v: Array, table_h: Table, table_w: Table, *, block_size: int | None
) -> Array:
    """Relative logits folded into q and k, then plain flash attention chosen per platform: the
    kernels of :func:`_kernel_branches`, elsewhere the blockwise XLA path."""
    xla = functools.partial(_xla_attention, table_h=None, table_w=None, dense=False, block_size=block_size)
    return _by_platform(q, k, v, table_h, table_w, **_kernel_branches(q), default=_folded(xla))


def _kernel_branches(q: Array) -> dict[str, Callable[..., Array]]:
    """``"fused"``'s branches where it has a kernel, by platform: ``(q, k, v, table_h, table_w)`` to
    ``[B, N, HW, dv]``, each on every device's share of the batch under a mesh.

    On a TPU the folding and the kernel run a few images at a time and are recomputed in the
    backward pass (:func:`~aacn_jax.functional.fused.tpu_relative_attention`: what that does to
    the TPU's memory and why).
    """
    cuda = _folded(lambda q, k, v: jnp.moveaxis(on_tokens(gpu_flash_attention)(q, k, v), 3, 1))
    tpu_kernel = tpu_flash_attention
    if _device_kind(q) in _TPUS_WITHOUT_BF16_MATMUL:
        tpu_kernel = lambda q, k, v: tpu_flash_attention(*(x.astype(_F32) for x in (q, k, v))).astype(v.dtype)
    tpu = lambda *args: jnp.moveaxis(tpu_relative_attention(*args, kernel=tpu_kernel), 3, 1)

    def on_each_device(attend: Callable[..., Array]) -> Callable[..., Array]:
        return lambda q, k, v, table_h, table_w: _per_device(attend, q, k, v, whole=(table_h, table_w))

    return {"tpu": on_each_device(tpu), "cuda": on_each_device(cuda)}


def _folded(attend: Callable[..., Array]) -> Callable[..., Array]:
    """``attend(q, k, v)`` after folding the relative logits (if any) into q and k."""

    def run(q: Array, k: Array, v: Array, table_h: Table, table_w: Table) -> Array:
        if table_h is not None and table_w is not None:
            q, k = fold_relative_logits(q, k, table_h, table_w)
        return attend(q, k, v)

    return run


def _by_platform(*args: Any, tpu: Callable, cuda: Callable, default: Callable) -> Array:
    """``jax.lax.platform_dependent(*args, tpu=tpu, cuda=cuda, default=default)``; under a mesh set
    with ``jax.set_mesh`` (or ``use_abstract_mesh``) whose devices are known, only the branches of
    their platform.

    Such a program runs on the mesh's devices, and tracing the other platforms' branches (their
    kernels under ``shard_map``) was about half of tracing a small AA model's train step on a CPU
    mesh. Lowering it for another platform fails ("MLIR translation rule for primitive
    'platform_index' not found"): export for another platform without a mesh, or under an
    abstract mesh of that platform's devices.
    """
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = None if device is None else device.platform
    if platform == "cpu":
        return jax.lax.platform_dependent(*args, cpu=default)
    if platform == "tpu":
        return jax.lax.platform_dependent(*args, tpu=tpu)
    if platform == "gpu":
        return jax.lax.platform_dependent(*args, cuda=cuda, rocm=default)
    return jax.lax.platform_dependent(*args, tpu=tpu, cuda=cuda, default=default)


def _device_kind(x: Array) -> str:
    """The kind of device ``x`` is laid out on, at trace time: its sharding's mesh, else the mesh
    set by ``jax.set_mesh``, else this process's default device."""
    for mesh in (getattr(jax.typeof(x).sharding, "mesh", None), jax.sharding.get_abstract_mesh()):
        device = getattr(mesh, "abstract_device", None)
        if device is not None:
            return str(device.device_kind)
    return str(jax.devices()[0].device_kind)


def _mgpu_attention(
    q: Array, k: Array, v: Array, table_h: Table, table_w: Table, *, block_size: int | None
) -> Array:
    """The Mosaic GPU kernels on CUDA where this JAX and dtype have them, else the fused path."""
    fused = functools.partial(_fused_attention, block_size=block_size)
    if not relative_mgpu.supported(q.dtype):
        return fused(q, k, v, table_h, table_w)

    def cuda(q: Array, k: Array, v: Array, table_h: Table, table_w: Table) -> Array:
        return _per_device(relative_mgpu.relative_attention, q, k, v, whole=(table_h, table_w))

    return _by_platform(q, k, v, table_h, table_w, tpu=fused, cuda=cuda, default=fused)


def _per_device(attend: Callable[..., Array], *batched: Array, whole: tuple[Table, ...] = ()) -> Array:
    """``attend(*batched, *whole)`` on each device's share of the batch when a mesh is set (``jax.set_mesh``).

    XLA cannot partition a Pallas kernel across devices ("Mosaic kernels cannot be automatically
    partitioned"), so under a mesh the ``batched`` arrays are split over all its axes by
    ``jax.shard_map`` and each device runs the kernel on its images; the ``whole`` ones (the relative
    tables, or None) are on every device. Without a mesh, or with a batch that the mesh does not
    divide, the call is left to XLA as it is (fine on one device and for the CPU's XLA path).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or batched[0].shape[0] % mesh.size:
        return attend(*batched, *whole)
    batch = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    specs = (batch,) * len(batched) + (jax.sharding.PartitionSpec(),) * len(whole)
    # check_vma=False: JAX's shipped Pallas kernels do not declare how their outputs vary over the
    # mesh axes, which the check needs.
    sharded = jax.shard_map(attend, mesh=mesh, in_specs=specs, out_specs=batch, check_vma=False)
    return sharded(*batched, *whole)


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
      implementation: ``"dense"``, ``"blockwise"``, ``"fused"``, ``"mgpu"`` or None (automatic: fused on a
        TPU or NVIDIA GPU; elsewhere dense if its float32 logits fit ``memory_budget_bytes``,
        else blockwise). See the module docstring.
      block_size: query rows per block for the blockwise path (also the CPU form of fused);
        None: the most whose float32 logits fit ``DEFAULT_BLOCK_BYTES`` (at least one row, at
        least two blocks).
      memory_budget_bytes: the most float32 logits ``implementation=None`` lets the dense path
        hold where fused has no kernel (a CPU).

    Returns:
      ``[B, H, W, N, dv]`` in q's dtype: for each query pixel, the softmax over all H*W key
      pixels of ``q' . k + relative_logits(q', rel_h, rel_w)``, applied to v, where
      ``q' = q * dk**-0.5`` (the paper scales q before both terms). Logits and softmax are
      float32 whatever the input dtype (the fused path rounds the relative factors to q's
      dtype before its kernel's float32 dot products).
    """
    _check_args(q, k, v, rel_h, rel_w)
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"implementation={implementation!r} must be one of {IMPLEMENTATIONS} or None")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    # "mgpu" is traced at each call: its route depends on the JAX build and on Mosaic GPU's
    # interpreter being on (relative_mgpu.interpret), which a trace cache would not see.
    attend = _attend if implementation == "mgpu" else _attend_once
    return attend(
        q,
        k,
        v,
        rel_h,
        rel_w,
        implementation=implementation,
        block_size=block_size,
        memory_budget_bytes=memory_budget_bytes,
    )


def _attend(
    q: Array,
    k: Array,
    v: Array,
    rel_h: Array | None,
    rel_w: Array | None,
    *,
    implementation: str | None,
    block_size: int | None,
    memory_budget_bytes: int,
) -> Array:
    """:func:`self_attention_2d` after its checks."""
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    v = v.astype(q.dtype)
    table_h = table_w = None
    if rel_h is not None and rel_w is not None:
        table_h, table_w = absolute_table(rel_h).astype(q.dtype), absolute_table(rel_w).astype(q.dtype)
    args = (q, k, v, table_h, table_w)
    fused = functools.partial(_fused_attention, block_size=block_size)
    if implementation == "fused":
        out = fused(*args)
    elif implementation == "mgpu":
        out = _mgpu_attention(*args, block_size=block_size)
    elif implementation is not None:
        out = _xla_attention(*args, dense=implementation == "dense", block_size=block_size)
    else:
        dense = dense_logits_bytes(q.shape) <= memory_budget_bytes
        by_memory = functools.partial(_xla_attention, dense=dense, block_size=block_size)
        out = _by_platform(*args, **_kernel_branches(q), default=by_memory)
    return jnp.moveaxis(out, 1, 3).astype(q.dtype)  # B, H, W, N, dv


# Jitted, so that the layers of one shape share one trace. Without a mesh the default traces every
# platform's branch (``platform_dependent``: the TPU and GPU kernels too, whatever the machine), which was
# most of a model's tracing: AA-WRN-28-10's forward+backward traced on the 2-core CPU in 7.7 s with
# a trace per layer, 2.8 s with one per shape (its 12 attention layers have 3 shapes).
_attend_once = jax.jit(_attend, static_argnames=("implementation", "block_size", "memory_budget_bytes"))
