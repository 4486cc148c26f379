"""2-D relative self-attention as Pallas Mosaic GPU kernels (NVIDIA Hopper: wgmma, TMA), fwd and bwd.

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925, eq. 2.

The relative logits of a query are two factors (:func:`aacn_jax.functional.relative_logit_factors`,
computed by XLA outside the kernels): ``fh [G, T, H]`` (one value per key row) and ``fw [G, T, W]``
(one per key column), G = B * heads. The kernels add them inside their tile loops, so no
``[G, T, T]`` array and no widened ("folded") depth exists:

- Keys come in blocks of ``rows`` whole image rows (a power of two), each row padded to ``row``
  columns (a multiple of 8) so that a block is a multiple of 64 keys (the wgmma M of the
  key-parallel backward). Padding columns get ``fw = -1e30`` and padding rows ``fh = -1e30``: their
  softmax weight is exactly 0, with no mask input (a finite value, so that 0 * pad stays 0 in the
  matmuls).
- A block's logits are three wgmmas into one float32 accumulator: ``q . k`` plus the two factors
  spread over the block's keys by constant one-hot matrices, ``fh[:, w:w+16] @ E_rows`` (w: the
  16-aligned window holding the block's rows; E_rows picks them, one matrix per position in the
  window) and ``fw @ E_cols`` (K = 16 and W rounded up to 16: a small extra for the tensor cores,
  exact). ``fh`` is stored unwidened, ``[G, queries, H]`` with H rounded up to 16.
- Online softmax in the log2 domain (q and the factors pre-multiplied by log2 e, ``exp2``); the
  forward writes the output and the log-sum-exp.
- Backward, correctness first: a query-parallel kernel recomputes P and accumulates dQ and, by one
  wgmma of dS against the one-hot codes of every key's row and column, ``dfh`` and ``dfw`` (no
  atomics); a key-parallel kernel accumulates dK and dV from the transposed logits.
- Each kernel's loop loads its blocks by TMA, synchronously or pipelined through ``stages``
  shared-memory slots (:func:`tuning`, :func:`_pipelined_loop`); ``key_block`` sets the block size.

Every operand goes through shared memory (no register-held wgmma operand): that is what Mosaic
GPU's interpreter (tests on a CPU, :func:`interpret`) runs. Each array is stored once as XLA has it;
an operand needed transposed (k in ``q . k``, the key-parallel backward's q and factors, v and dO
in ``dO . v``) is read through a transposed view (:func:`_t`), which the interpreter applies from
JAX 0.11 on (:func:`available`). On a GPU the kernels take bfloat16/float16 (the other B operands
are N-major, which wgmma allows only for 16-bit types); float32 runs in the interpreter only; the
GPU route sends it to fold + Triton (``"fused"``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from aacn_jax.functional.relative import heads_first_logit_factors

__all__ = [
    "Plan",
    "attend",
    "available",
    "factors",
    "interpret",
    "plan",
    "relative_attention",
    "supported",
    "tuning",
]

BLOCK_Q = 64  # queries per program and per step of the key-parallel loop (one warpgroup's wgmma M)
_ROWS_K = 16  # columns of the fh window a key block reads (16-aligned, holding its rows; wgmma's K)
_NEG = -1e30  # the factor of a padding row or column: exp2(_NEG - max) == 0
_LOG2E = math.log2(math.e)
_LN2 = math.log(2)  # 1 / _LOG2E
_F32 = jnp.float32
_MAX_KEY_BLOCK = 256  # keys per block at most, else each row is padded to 64 (one row per block)
_GPU_DTYPES = (jnp.bfloat16, jnp.float16)
_SWIZZLE = 32  # bytes
_KEY_BLOCK = contextvars.ContextVar("key_block", default=64)  # the tuning knobs, see tuning()
DEFAULT_STAGES = 1  # synchronous loads, see tuning()
_STAGES = contextvars.ContextVar("stages", default=DEFAULT_STAGES)
MAX_STAGES = 4  # shared-memory slots per loop operand at most (tuning(stages=...))
_MIN_JAX = (0, 11)  # see available()
Array = jax.Array


def available() -> bool:
    """Whether this JAX has what the kernels use: ``plgpu.kernel`` with warpgroup semantics and
    transposed shared-memory views, from JAX 0.11 on (the first whose Mosaic GPU interpreter applies
    the views, so that the kernels as they run on a GPU are the ones tested on a CPU)."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return False
    names = ("kernel", "wgmma", "ACC", "LoweringSemantics")
    return (
        jax.__version_info__ >= _MIN_JAX
        and all(hasattr(plgpu, name) for name in names)
        and hasattr(plgpu.LoweringSemantics, "Warpgroup")
    )


def supported(dtype: Any) -> bool:
    """Whether the CUDA route runs the kernels for inputs of ``dtype`` (else fold + cuDNN/Triton)."""
    return available() and jnp.dtype(dtype) in map(jnp.dtype, _GPU_DTYPES)


@contextlib.contextmanager
def interpret(detect_races: bool = False) -> Iterator[None]:
    """Run the kernels traced inside in Mosaic GPU's interpreter (a CPU), on an abstract H100.

    Wraps JAX's private interpret API (``jax._src.pallas.mosaic_gpu.interpret``) in one place.
    ``detect_races``: its happens-before race detector raises on a shared-memory access that no
    barrier orders after a TMA copy or wgmma touching the same bytes (e.g. a slot read before its
    load was awaited, or refilled while read).
    """
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    gpu = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=gpu)
    with (
        jax.sharding.use_abstract_mesh(mesh),
        force_gpu_interpret_mode(InterpretGPUParams(detect_races=detect_races)),
    ):
        yield


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a ``height x width`` map is tiled: key rows of ``row`` columns, ``rows`` rows per key block."""

    height: int
    width: int
    row: int  # columns per key row (width padded to a multiple of 8)
    rows: int  # image rows per key block

    @property
    def key_block(self) -> int:
        return self.rows * self.row

    @property
    def padded_height(self) -> int:
        return _round_up(self.height, self.rows)

    @property
    def key_blocks(self) -> int:
        return self.padded_height // self.rows

    @property
    def keys(self) -> int:
        return self.padded_height * self.row

    @property
    def queries(self) -> int:
        return _round_up(self.height * self.width, BLOCK_Q)

    @property
    def phases(self) -> int:
        """Key blocks per 16-row window of ``fh``: block b's rows are rows ``rows * (b % phases) ..``
        of window ``b // phases`` (``rows`` is a power of two, so a block never straddles two)."""
        return _ROWS_K // self.rows

    @property
    def row_codes(self) -> int:
        """Columns of ``dfh`` the query-parallel backward accumulates (padded rows, multiple of 16)."""
        return _round_up(self.padded_height, 16)

    @property
    def column_codes(self) -> int:
        """Rows of the column one-hot matrix (``row`` padded to wgmma's K of 16)."""
        return _round_up(self.row, 16)


def plan(height: int, width: int, key_block: int | None = None) -> Plan:
    """The fewest whole rows per key block, a power of two, that make a multiple of 64 keys (at most
    256), and at least ``key_block`` keys (default: the :func:`tuning` in effect, else 64).

    Raises ValueError where that takes more than 16 rows (the fh slice a key block reads).
    """
    row = _round_up(width, 8)
    rows = 64 // math.gcd(64, row)
    if rows * row > _MAX_KEY_BLOCK:
        row, rows = _round_up(width, 64), 1
    key_block = _KEY_BLOCK.get() if key_block is None else key_block
    rows <<= (max(1, -(-key_block // (rows * row))) - 1).bit_length()  # times a power of two
    if rows > _ROWS_K:
        raise ValueError(
            f"key_block={key_block} needs {rows} rows of {row} keys per block, more than {_ROWS_K}"
        )
    return Plan(height, width, row, rows)


@contextlib.contextmanager
def tuning(key_block: int | None = None, stages: int | None = None) -> Iterator[None]:
    """Kernels traced inside take key blocks of at least ``key_block`` keys and load their loops'
    blocks through ``stages`` shared-memory slots (benchmark sweeps; None keeps the setting in effect).

    ``stages=1`` loads each block by TMA and waits before computing on it; ``stages=s > 1`` issues the
    loads of block ``b + s - 1`` into the next slot before computing on block ``b`` (one barrier per
    slot), so ``s - 1`` blocks are in flight while one is computed on. Raises ValueError for a
    ``key_block`` that is not a positive int or ``stages`` outside 1..MAX_STAGES; whether a map can
    take the key block is :func:`plan`'s to say (256 keys fit 32 columns a row, not 8).
    """
    if key_block is not None and (not isinstance(key_block, int) or key_block < 1):
        raise ValueError(f"key_block={key_block!r} must be a positive int")
    if stages is not None and (not isinstance(stages, int) or not 1 <= stages <= MAX_STAGES):
        raise ValueError(f"stages={stages!r} must be an int from 1 to {MAX_STAGES}")
    tokens = [
        (var, var.set(value))
        for var, value in ((_KEY_BLOCK, key_block), (_STAGES, stages))
        if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def _one_hots(p: Plan, dtype: Any) -> tuple[Array, Array, Array, Array, Array]:
    """Constant codes of the keys' rows and columns.

    ``rows_in_window [phases * 16, Nk]`` (for each phase, a key block's rows within its ``fh`` window:
    :attr:`Plan.phases`), ``cols_in_block [W16, Nk]`` (a key block's columns), their transposes
    (``[phases * Nk, 16]``, ``[Nk, W16]``), and ``codes [keys, row_codes + column_codes]``: every key's
    global row and column.
    """
    key = jnp.arange(p.key_block)
    window_row = (key // p.row)[None, None, :] + p.rows * jnp.arange(p.phases)[:, None, None]
    local_rows = (window_row == jnp.arange(_ROWS_K)[None, :, None]).astype(dtype)  # phase, 16, Nk
    cols = (key[None, :] % p.row == jnp.arange(p.column_codes)[:, None]).astype(dtype)
    every = jnp.arange(p.keys)
    codes = jnp.concatenate(
        [
            every[:, None] // p.row == jnp.arange(p.row_codes)[None, :],
            every[:, None] % p.row == jnp.arange(p.column_codes)[None, :],
        ],
        axis=1,
    ).astype(dtype)
    rows_t = local_rows.swapaxes(1, 2).reshape(-1, _ROWS_K)
    return local_rows.reshape(-1, p.key_block), cols, rows_t, cols.T, codes


def _smem(shape: tuple[int, ...], dtype: Any) -> Any:
    """A shared-memory buffer as wgmma and TMA want it: tiled, every 2-D buffer with one swizzle.

    wgmma needs its two operands' swizzles equal; 32 bytes fits every minor dimension here (all
    multiples of 16 elements).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if len(shape) == 1:
        return plgpu.SMEM(shape, dtype)
    elems = _SWIZZLE // jnp.dtype(dtype).itemsize
    tiling: Any = plgpu.TilingTransform  # typed Any: mypy takes JAX 0.12's transforms as abstract
    swizzle: Any = plgpu.SwizzleTransform
    transforms = (tiling((8, elems)), swizzle(_SWIZZLE))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _kernel_call(body: Callable[..., None], out_type: Any, grid: tuple[int, int]) -> Callable[..., Any]:
    """``body`` as a Mosaic GPU kernel of one warpgroup per program; the kernel takes body's name."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=grid,
        grid_names=("g", "i"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )


def _load(pairs: list[tuple[Any, Any]], barrier: Any) -> None:
    """Copy each ``(gmem_slice, smem)`` pair by TMA and wait for all of them."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    for i, (src, dst) in enumerate(pairs):
        plgpu.copy_gmem_to_smem(src, dst, barrier.at[i])
    for i in range(len(pairs)):
        plgpu.barrier_wait(barrier.at[i])


def _slots(shape: tuple[int, ...], dtype: Any, stages: int) -> Any:
    """A loop operand's shared memory: one :func:`_smem` buffer, or ``stages`` of them stacked (the
    tiling and swizzle of a 2-D operand apply to each slot; a 1-D one stays untiled)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if stages == 1:
        return _smem(shape, dtype)
    return plgpu.SMEM((stages, *shape), dtype) if len(shape) == 1 else _smem((stages, *shape), dtype)


def _slot(buffer: Any, slot: Any) -> Any:
    """The ``slot`` of a :func:`_slots` buffer (``slot`` None: the one buffer of ``stages=1``)."""
    return buffer if slot is None else buffer.at[slot]


def _loop_barrier(copies: int, stages: int) -> Any:
    """The barriers of a :func:`_pipelined_loop`: one per slot, arrived on by its ``copies`` loads
    (``stages=1``: None, the loop reuses the kernel's barriers of its fixed loads)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return None if stages == 1 else plgpu.Barrier(num_arrivals=copies, num_barriers=stages)


def _pipelined_loop(
    stages: int,
    blocks: int,
    copies: Callable[[Array, Any], list[tuple[Any, Any]]],
    compute: Callable[[Array, Any, Any], Any],
    init: Any,
    barrier: Any,
    loop_barrier: Any,
) -> Any:
    """``fori_loop`` over ``blocks`` blocks, each's operands loaded by TMA, then ``compute``d on.

    ``copies(b, slot)`` gives the ``(gmem_slice, smem)`` pairs of block b into ``slot`` (index the
    :func:`_slots` buffers with :func:`_slot`); ``compute(b, slot, carry)`` returns the next carry.
    ``stages=1``: load block b, wait, compute (slot None; ``barrier`` as in :func:`_load`).
    ``stages=s``: blocks ``0 .. s-2`` are issued before the loop; step b first waits until the
    warpgroup is done with the slot of block ``b - 1`` (``commit_smem``: every wgmma that read it was
    awaited before), issues block ``b + s - 1`` into that slot, then waits on block b's barrier
    (``loop_barrier.at[slot]``, ``len(copies)`` arrivals) and computes while the later loads fly.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if stages == 1:

        def synchronous(b: Array, carry: Any) -> Any:
            _load(copies(b, None), barrier)
            return compute(b, None, carry)

        return lax.fori_loop(0, blocks, synchronous, init)

    def fetch(b: Any, slot: Any) -> None:
        for src, dst in copies(b, slot):
            plgpu.copy_gmem_to_smem(src, dst, loop_barrier.at[slot])

    for b in range(min(stages - 1, blocks)):  # the prologue: static blocks and slots
        fetch(b, b)

    def step(b: Array, carry: Any) -> Any:
        slot = lax.rem(b, stages)
        ahead = b + (stages - 1)
        plgpu.commit_smem()

        @pl.when(ahead < blocks)
        def _() -> None:
            fetch(ahead, lax.rem(ahead, stages))

        plgpu.barrier_wait(loop_barrier.at[slot])
        return compute(b, slot, carry)

    return lax.fori_loop(0, blocks, step, init)


def _matmuls(shape: tuple[int, int], products: list[tuple[Any, Any]]) -> Array:
    """``sum(a @ b)`` over the smem ``(a, b)`` pairs, one float32 wgmma accumulator."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def run(acc: Any) -> Array:
        for a, b in products:
            plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(run, plgpu.ACC(shape, _F32))


def _row_bcast(x: Array, shape: tuple[int, ...], axis: int) -> Array:
    """A per-row (``axis=0``) or per-column (``axis=1``) vector broadcast to a 2-D tile."""
    return lax.broadcast_in_dim(x, shape, (axis,))


def _t(ref: Any) -> Any:
    """A 2-D shared-memory operand read transposed (a view: wgmma takes it K-major, nothing moves)."""
    return ref.transpose((1, 0))


def _window(p: Plan, b: Any) -> Any:
    """The 16 columns of ``fh`` that hold key block b's rows: a multiple of the tile, as Mosaic's
    TMA slices need."""
    from jax.experimental import pallas as pl

    return pl.ds(lax.div(b, p.phases) * _ROWS_K, _ROWS_K)


def _phase(p: Plan, b: Any, size: int) -> Any:
    """Key block b's ``size`` rows of a constant stacked by phase (:func:`_one_hots`)."""
    from jax.experimental import pallas as pl

    return pl.ds(lax.rem(b, p.phases) * size, size)


def _logits(
    q_s: Any, fh_s: Any, fw_s: Any, k_s: Any, rows_s: Any, cols_s: Any, shape: tuple[int, int]
) -> Array:
    """One block's log2-domain logits: ``q . k + fh . E_rows + fw . E_cols`` (or the transposes)."""
    return _matmuls(shape, [(q_s, k_s), (fh_s, rows_s), (fw_s, cols_s)])


def _forward(
    p: Plan, stages: int, q: Array, k: Array, v: Array, fh: Array, fw: Array, consts: tuple[Array, ...]
) -> Any:
    """``out [G, Tq, dv]`` (q's dtype) and ``lse [G, Tq]`` (float32, log2 domain) of padded inputs;
    the key blocks loaded through ``stages`` slots (:func:`_pipelined_loop`)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    groups, queries, depth = q.shape
    value_depth, dtype, nk = v.shape[-1], q.dtype, p.key_block
    e_rows, e_cols = consts[0], consts[1]

    def relative_attention_fwd(
        q_ref: Any,
        k_ref: Any,
        v_ref: Any,
        fh_ref: Any,
        fw_ref: Any,
        er_ref: Any,
        ec_ref: Any,
        o_ref: Any,
        lse_ref: Any,
    ) -> None:
        g, qi = lax.axis_index("g"), lax.axis_index("i")
        rows = pl.ds(qi * BLOCK_Q, BLOCK_Q)

        def scoped(
            q_s: Any,
            fw_s: Any,
            er_s: Any,
            ec_s: Any,
            k_s: Any,
            v_s: Any,
            fh_s: Any,
            p_s: Any,
            o_s: Any,
            l_s: Any,
            bar: Any,
            key_bar: Any = None,
        ) -> None:
            _load([(q_ref.at[g, rows], q_s), (fw_ref.at[g, rows], fw_s), (ec_ref, ec_s)], bar)

            def copies(b: Array, slot: Any) -> list[tuple[Any, Any]]:
                keys = pl.ds(b * nk, nk)
                return [
                    (k_ref.at[g, keys], _slot(k_s, slot)),
                    (v_ref.at[g, keys], _slot(v_s, slot)),
                    (fh_ref.at[g, rows, _window(p, b)], _slot(fh_s, slot)),
                    (er_ref.at[_phase(p, b, _ROWS_K)], _slot(er_s, slot)),
                ]

            def step(b: Array, slot: Any, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
                peak, total, acc = carry
                k_b, v_b, fh_b, er_b = (_slot(x, slot) for x in (k_s, v_s, fh_s, er_s))
                s = _logits(q_s, fh_b, fw_s, _t(k_b), er_b, ec_s, (BLOCK_Q, nk))
                new_peak = jnp.maximum(peak, jnp.max(s, axis=1))
                alpha = jnp.exp2(peak - new_peak)
                weights = jnp.exp2(s - _row_bcast(new_peak, s.shape, 0))
                total = total * alpha + jnp.sum(weights, axis=1)
                p_s[...] = weights.astype(dtype)
                plgpu.commit_smem()
                pv = _matmuls((BLOCK_Q, value_depth), [(p_s, v_b)])
                return new_peak, total, acc * _row_bcast(alpha, acc.shape, 0) + pv

            init = (
                jnp.full((BLOCK_Q,), -jnp.inf, _F32),
                jnp.zeros((BLOCK_Q,), _F32),
                jnp.zeros((BLOCK_Q, value_depth), _F32),
            )
            peak, total, acc = _pipelined_loop(stages, p.key_blocks, copies, step, init, bar, key_bar)
            o_s[...] = (acc / _row_bcast(total, acc.shape, 0)).astype(o_s.dtype)
            l_s[...] = peak + jnp.log2(total)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[g, rows])
            plgpu.copy_smem_to_gmem(l_s, lse_ref.at[g, rows])
            plgpu.wait_smem_to_gmem(0)

        key_bar = _loop_barrier(4, stages)
        pl.run_scoped(
            scoped,
            _smem((BLOCK_Q, depth), dtype),
            _smem((BLOCK_Q, p.column_codes), dtype),
            _slots((_ROWS_K, nk), dtype, stages),
            _smem((p.column_codes, nk), dtype),
            _slots((nk, depth), dtype, stages),
            _slots((nk, value_depth), dtype, stages),
            _slots((BLOCK_Q, _ROWS_K), dtype, stages),
            _smem((BLOCK_Q, nk), dtype),
            _smem((BLOCK_Q, value_depth), dtype),
            _smem((BLOCK_Q,), _F32),
            plgpu.Barrier(num_barriers=4),
            *([] if key_bar is None else [key_bar]),
        )

    out_type = (
        jax.ShapeDtypeStruct((groups, queries, value_depth), dtype),
        jax.ShapeDtypeStruct((groups, queries), _F32),
    )
    call = _kernel_call(relative_attention_fwd, out_type, (groups, queries // BLOCK_Q))
    return call(q, k, v, fh, fw, e_rows, e_cols)


def _backward_queries(p: Plan, stages: int, args: tuple[Array, ...], consts: tuple[Array, ...]) -> Any:
    """dq ``[G, queries, dk]`` and the factors' gradients ``[G, queries, codes]`` (float32 sums,
    written in q's dtype); the key blocks loaded through ``stages`` slots."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    q, k, v, fh, fw, lse, delta, d_out = args
    e_rows, e_cols, _, _, codes = consts
    groups, queries, depth = q.shape
    value_depth, dtype, nk, n_codes = d_out.shape[-1], q.dtype, p.key_block, codes.shape[-1]

    def relative_attention_dq(*refs: Any) -> None:
        q_ref, k_ref, v_ref, fh_ref, fw_ref, lse_ref, delta_ref, do_ref, er_ref, ec_ref, codes_ref = refs[:11]
        dq_ref, df_ref = refs[11:]
        g, qi = lax.axis_index("g"), lax.axis_index("i")
        rows = pl.ds(qi * BLOCK_Q, BLOCK_Q)

        def scoped(*bufs: Any) -> None:
            q_s, fw_s, er_s, ec_s, do_s, lse_s, delta_s, k_s, v_s, fh_s, codes_s, ds_s = bufs[:12]
            dq_s, df_s, bar = bufs[12:15]
            key_bar = bufs[15] if len(bufs) > 15 else None
            fixed = [(q_ref.at[g, rows], q_s), (fw_ref.at[g, rows], fw_s), (ec_ref, ec_s)]
            fixed += [
                (do_ref.at[g, rows], do_s),
                (lse_ref.at[g, rows], lse_s),
                (delta_ref.at[g, rows], delta_s),
            ]
            _load(fixed, bar)
            lse_v, delta_v = lse_s[...], delta_s[...]

            def copies(b: Array, slot: Any) -> list[tuple[Any, Any]]:
                keys = pl.ds(b * nk, nk)
                return [
                    (k_ref.at[g, keys], _slot(k_s, slot)),
                    (v_ref.at[g, keys], _slot(v_s, slot)),
                    (fh_ref.at[g, rows, _window(p, b)], _slot(fh_s, slot)),
                    (er_ref.at[_phase(p, b, _ROWS_K)], _slot(er_s, slot)),
                    (codes_ref.at[keys], _slot(codes_s, slot)),
                ]

            def accumulate(dq_acc: Any, df_acc: Any) -> None:
                step_ = functools.partial(step, dq_acc, df_acc)
                _pipelined_loop(stages, p.key_blocks, copies, step_, None, bar, key_bar)
                dq_s[...] = dq_acc[...].astype(dtype)
                df_s[...] = df_acc[...].astype(dtype)

            def step(dq_acc: Any, df_acc: Any, b: Array, slot: Any, carry: None) -> None:
                k_b, v_b, fh_b, er_b, codes_b = (_slot(x, slot) for x in (k_s, v_s, fh_s, er_s, codes_s))
                s = _logits(q_s, fh_b, fw_s, _t(k_b), er_b, ec_s, (BLOCK_Q, nk))
                weights = jnp.exp2(s - _row_bcast(lse_v, s.shape, 0))
                d_weights = _matmuls((BLOCK_Q, nk), [(do_s, _t(v_b))])
                ds_s[...] = (weights * (d_weights - _row_bcast(delta_v, s.shape, 0))).astype(dtype)
                plgpu.commit_smem()
                plgpu.wgmma(dq_acc, ds_s, k_b)
                plgpu.wgmma(df_acc, ds_s, codes_b)
                plgpu.wgmma_wait(0)

            pl.run_scoped(accumulate, plgpu.ACC((BLOCK_Q, depth), _F32), plgpu.ACC((BLOCK_Q, n_codes), _F32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dq_s, dq_ref.at[g, rows])
            plgpu.copy_smem_to_gmem(df_s, df_ref.at[g, rows])
            plgpu.wait_smem_to_gmem(0)

        key_bar = _loop_barrier(5, stages)
        pl.run_scoped(
            scoped,
            _smem((BLOCK_Q, depth), dtype),
            _smem((BLOCK_Q, p.column_codes), dtype),
            _slots((_ROWS_K, nk), dtype, stages),
            _smem((p.column_codes, nk), dtype),
            _smem((BLOCK_Q, value_depth), dtype),
            _smem((BLOCK_Q,), _F32),
            _smem((BLOCK_Q,), _F32),
            _slots((nk, depth), dtype, stages),
            _slots((nk, value_depth), dtype, stages),
            _slots((BLOCK_Q, _ROWS_K), dtype, stages),
            _slots((nk, n_codes), dtype, stages),
            _smem((BLOCK_Q, nk), dtype),
            _smem((BLOCK_Q, depth), dtype),
            _smem((BLOCK_Q, n_codes), dtype),
            plgpu.Barrier(num_barriers=6),
            *([] if key_bar is None else [key_bar]),
        )

    out_type = (
        jax.ShapeDtypeStruct((groups, queries, depth), dtype),
        jax.ShapeDtypeStruct((groups, queries, n_codes), dtype),
    )
    call = _kernel_call(relative_attention_dq, out_type, (groups, queries // BLOCK_Q))
    return call(q, k, v, fh, fw, lse, delta, d_out, e_rows, e_cols, codes)


def _backward_keys(p: Plan, stages: int, args: tuple[Array, ...], consts: tuple[Array, ...]) -> Any:
    """dk ``[G, keys, dk]`` and dv ``[G, keys, dv]`` (float32 sums, written in q's dtype), one key
    block per program; the query blocks loaded through ``stages`` slots. ``args`` are
    :func:`_backward_queries`'; dk is ``dS^T . q2 * ln 2`` (q2 = q log2 e: no second copy of q)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    q2, k, v, fh, fw, lse, delta, d_out = args
    _, _, rows_t, cols_t, _ = consts
    groups, queries, depth = q2.shape
    value_depth, dtype, nk = v.shape[-1], q2.dtype, p.key_block

    def relative_attention_dkv(*refs: Any) -> None:
        q2_ref, k_ref, v_ref, fh_ref, fw_ref, lse_ref, delta_ref, do_ref = refs[:8]
        rt_ref, ct_ref, dk_ref, dv_ref = refs[8:]
        g, b = lax.axis_index("g"), lax.axis_index("i")
        keys = pl.ds(b * nk, nk)

        def scoped(*bufs: Any) -> None:
            k_s, v_s, rt_s, ct_s, q2_s, fh_s, fw_s, lse_s, delta_s, do_s = bufs[:10]
            p_s, ds_s, dk_s, dv_s, bar = bufs[10:15]
            query_bar = bufs[15] if len(bufs) > 15 else None
            fixed = [(k_ref.at[g, keys], k_s), (v_ref.at[g, keys], v_s), (ct_ref, ct_s)]
            _load([*fixed, (rt_ref.at[_phase(p, b, nk)], rt_s)], bar)

            def copies(i: Array, slot: Any) -> list[tuple[Any, Any]]:
                rows = pl.ds(i * BLOCK_Q, BLOCK_Q)
                at = functools.partial(_slot, slot=slot)
                return [
                    (q2_ref.at[g, rows], at(q2_s)),
                    (fh_ref.at[g, rows, _window(p, b)], at(fh_s)),
                    (fw_ref.at[g, rows], at(fw_s)),
                    (lse_ref.at[g, rows], at(lse_s)),
                    (delta_ref.at[g, rows], at(delta_s)),
                    (do_ref.at[g, rows], at(do_s)),
                ]

            def accumulate(dk_acc: Any, dv_acc: Any) -> None:
                step_ = functools.partial(step, dk_acc, dv_acc)
                _pipelined_loop(stages, queries // BLOCK_Q, copies, step_, None, bar, query_bar)
                dk_s[...] = (dk_acc[...] * _LN2).astype(dtype)
                dv_s[...] = dv_acc[...].astype(dtype)

            def step(dk_acc: Any, dv_acc: Any, i: Array, slot: Any, carry: None) -> None:
                q2_i, fh_i, fw_i, lse_i, delta_i, do_i = (
                    _slot(x, slot) for x in (q2_s, fh_s, fw_s, lse_s, delta_s, do_s)
                )
                s_t = _logits(k_s, rt_s, ct_s, _t(q2_i), _t(fh_i), _t(fw_i), (nk, BLOCK_Q))
                weights_t = jnp.exp2(s_t - _row_bcast(lse_i[...], s_t.shape, 1))
                d_weights_t = _matmuls((nk, BLOCK_Q), [(v_s, _t(do_i))])
                p_s[...] = weights_t.astype(dtype)
                ds_s[...] = (weights_t * (d_weights_t - _row_bcast(delta_i[...], s_t.shape, 1))).astype(dtype)
                plgpu.commit_smem()
                plgpu.wgmma(dv_acc, p_s, do_i)
                plgpu.wgmma(dk_acc, ds_s, q2_i)
                plgpu.wgmma_wait(0)

            pl.run_scoped(accumulate, plgpu.ACC((nk, depth), _F32), plgpu.ACC((nk, value_depth), _F32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dk_s, dk_ref.at[g, keys])
            plgpu.copy_smem_to_gmem(dv_s, dv_ref.at[g, keys])
            plgpu.wait_smem_to_gmem(0)

        query_bar = _loop_barrier(6, stages)
        pl.run_scoped(
            scoped,
            _smem((nk, depth), dtype),
            _smem((nk, value_depth), dtype),
            _smem((nk, _ROWS_K), dtype),
            _smem((nk, p.column_codes), dtype),
            _slots((BLOCK_Q, depth), dtype, stages),
            _slots((BLOCK_Q, _ROWS_K), dtype, stages),
            _slots((BLOCK_Q, p.column_codes), dtype, stages),
            _slots((BLOCK_Q,), _F32, stages),
            _slots((BLOCK_Q,), _F32, stages),
            _slots((BLOCK_Q, value_depth), dtype, stages),
            _smem((nk, BLOCK_Q), dtype),
            _smem((nk, BLOCK_Q), dtype),
            _smem((nk, depth), dtype),
            _smem((nk, value_depth), dtype),
            plgpu.Barrier(num_barriers=6),
            *([] if query_bar is None else [query_bar]),
        )

    out_type = (
        jax.ShapeDtypeStruct((groups, p.keys, depth), dtype),
        jax.ShapeDtypeStruct((groups, p.keys, value_depth), dtype),
    )
    call = _kernel_call(relative_attention_dkv, out_type, (groups, p.key_blocks))
    return call(q2, k, v, fh, fw, lse, delta, d_out, rows_t, cols_t)


def _pad_to(x: Array, shape: tuple[int, ...], value: float = 0.0) -> Array:
    return jnp.pad(x, [(0, n - m) for m, n in zip(x.shape, shape, strict=True)], constant_values=value)


def _keys_padded(p: Plan, x: Array, depth: int) -> Array:
    """``[G, H*W, d] -> [G, keys, depth]``: rows padded to ``p.row`` columns, to ``padded_height`` rows."""
    groups = x.shape[0]
    x = x.reshape(groups, p.height, p.width, x.shape[-1])
    return _pad_to(x, (groups, p.padded_height, p.row, depth)).reshape(groups, p.keys, depth)


def _factors_padded(p: Plan, fh: Array, fw: Array, dtype: Any) -> tuple[Array, Array]:
    """The (log2-domain) factors with padding rows and columns at ``_NEG``, queries padded.

    ``fh [G, T, H] -> [G, queries, row_codes]`` (a key block reads the 16-column window holding its
    rows, :func:`_window`); ``fw [G, T, W] -> [G, queries, column_codes]``.
    """
    groups, tokens = fh.shape[:2]
    fh = _pad_to(fh.astype(dtype), (groups, tokens, p.row_codes), _NEG)
    fw = _pad_to(fw.astype(dtype), (groups, tokens, p.column_codes), _NEG)
    padded = lambda f: _pad_to(f, (groups, p.queries, f.shape[2]))
    return padded(fh), padded(fw)


def _keys_unpadded(p: Plan, x: Array, depth: int) -> Array:
    """Inverse of :func:`_keys_padded`: ``[G, keys, .] -> [G, H*W, depth]``."""
    x = x.reshape(x.shape[0], p.padded_height, p.row, -1)[:, : p.height, : p.width, :depth]
    return x.reshape(x.shape[0], p.height * p.width, depth)


def _padded_inputs(q2: Array, k: Array, v: Array, fh2: Array, fw2: Array) -> tuple[Plan, tuple[Array, ...]]:
    """The plan and the kernels' operands, padded and in q2's dtype, from the log2-domain ``q2``,
    ``fh2``, ``fw2`` (:func:`_log2`) and k, v."""
    p = plan(fh2.shape[-1], fw2.shape[-1])
    groups, dtype = q2.shape[0], q2.dtype
    depth, value_depth = _round_up(q2.shape[-1], 16), _round_up(v.shape[-1], 16)
    q2 = _pad_to(q2, (groups, p.queries, depth))
    keys, values = _keys_padded(p, k.astype(dtype), depth), _keys_padded(p, v.astype(dtype), value_depth)
    return p, (q2, keys, values, *_factors_padded(p, fh2, fw2, dtype))


def _log2(x: Array) -> Array:
    """``x * log2 e`` in x's dtype: queries and factors for the kernels' ``exp2``."""
    return (x * _LOG2E).astype(x.dtype)


def _attend_log2(q2: Array, k: Array, v: Array, fh2: Array, fw2: Array) -> tuple[Array, Array]:
    """The forward kernel on :func:`_padded_inputs`: ``out [G, T, e]`` and ``lse [G, queries]``."""
    p, (q2_p, keys, values, fh_p, fw_p) = _padded_inputs(q2, k, v, fh2, fw2)
    consts = _one_hots(p, q2.dtype)
    out, lse = _forward(p, _STAGES.get(), q2_p, keys, values, fh_p, fw_p, consts)
    return out[:, : q2.shape[1], : v.shape[-1]], lse


def _attend_log2_bwd(
    q2: Array, k: Array, v: Array, fh2: Array, fw2: Array, out: Array, lse: Array, d_out: Array
) -> tuple[Array, ...]:
    """The backward kernels: the gradients of q, k, v and of the natural-domain factors (not of the
    log2-domain ``q2``, ``fh2``, ``fw2``), in q2's dtype."""
    p, (q2_p, keys, values, fh_p, fw_p) = _padded_inputs(q2, k, v, fh2, fw2)
    groups, dtype = q2.shape[0], q2.dtype
    delta = _pad_to(jnp.einsum("gte,gte->gt", d_out.astype(_F32), out.astype(_F32)), (groups, p.queries))
    d_out_p = _pad_to(d_out.astype(dtype), (groups, p.queries, values.shape[-1]))
    consts = _one_hots(p, dtype)
    args = (q2_p, keys, values, fh_p, fw_p, lse, delta, d_out_p)
    d_q, d_factors = _backward_queries(p, _STAGES.get(), args, consts)
    d_k, d_v = _backward_keys(p, _STAGES.get(), args, consts)
    tokens = q2.shape[1]
    return (
        d_q[:, :tokens, : q2.shape[-1]],
        _keys_unpadded(p, d_k, k.shape[-1]),
        _keys_unpadded(p, d_v, v.shape[-1]),
        d_factors[:, :tokens, : p.height],
        d_factors[:, :tokens, p.row_codes : p.row_codes + p.width],
    )


@jax.custom_vjp
def attend(q: Array, k: Array, v: Array, fh: Array, fw: Array) -> Array:
    """Softmax attention with the relative logits ``fh[i, r] + fw[i, c]`` of key (r, c) added.

    ``q, k [G, T, d]`` (q scaled), ``v [G, T, e]``, ``fh [G, T, H]``, ``fw [G, T, W]``, T = H*W;
    returns ``[G, T, e]`` in q's dtype. Differentiable in all five.
    """
    return _attend_fwd(q, k, v, fh, fw)[0]


def _attend_fwd(q: Array, k: Array, v: Array, fh: Array, fw: Array) -> tuple[Array, tuple[Array, ...]]:
    out, lse = _attend_log2(_log2(q), k, v, fh * _LOG2E, fw * _LOG2E)
    return out, (q, k, v, fh, fw, out, lse)


def _attend_bwd(residuals: tuple[Array, ...], d_out: Array) -> tuple[Array, ...]:
    q, k, v, fh, fw, out, lse = lax.optimization_barrier(residuals)  # see _relative_attention_bwd
    grads = _attend_log2_bwd(_log2(q), k, v, fh * _LOG2E, fw * _LOG2E, out, lse, d_out)
    return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v, fh, fw), strict=True))


attend.defvjp(_attend_fwd, _attend_bwd)


def factors(q: Array, table_h: Array | None, table_w: Array | None) -> tuple[Array, Array]:
    """``fh [B, N, H, W, H]`` and ``fw [B, N, H, W, W]`` of scaled ``q [B, H, W, N, d]``: float32
    sums, in q's dtype.

    ``table_h``, ``table_w`` are the absolute tables, or both None (zeros: content-only attention).
    """
    queries = jnp.moveaxis(q, 3, 1)  # B, N, H, W, d
    if table_h is None or table_w is None:
        batch, heads, height, width = queries.shape[:4]
        return jnp.zeros((batch, heads, height, width, height), q.dtype), jnp.zeros(
            (batch, heads, height, width, width), q.dtype
        )
    return heads_first_logit_factors(queries, table_h, table_w, q.dtype)


def relative_attention(q: Array, k: Array, v: Array, table_h: Array | None, table_w: Array | None) -> Array:
    """Relative self-attention of scaled ``q, k [B, H, W, N, d]`` and ``v [B, H, W, N, e]`` with the
    absolute tables ``table_h``, ``table_w`` (or both None: content-only); heads first,
    ``[B, N, H, W, e]`` in q's dtype. Differentiable in all five.

    The factors are computed from ``q * log2 e`` in q's dtype (one rounding, as the kernels take
    them), and the backward recomputes them (two small einsums) instead of keeping them from the
    forward: they hold ``H + W`` values per query and head, several times q's ``d``.
    """
    return _relative_attention(q, k, v, table_h, table_w)


def _flat(x: Array) -> Array:
    """``[B, H, W, N, d] -> [B * N, H * W, d]`` (heads first)."""
    batch, height, width, heads, depth = x.shape
    return jnp.moveaxis(x, 3, 1).reshape(batch * heads, height * width, depth)


def _flat_heads_first(x: Array) -> Array:
    """``[B, N, H, W, n] -> [B * N, H * W, n]``."""
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2] * x.shape[3], x.shape[4])


@jax.custom_vjp
def _relative_attention(q: Array, k: Array, v: Array, table_h: Array | None, table_w: Array | None) -> Array:
    return _relative_attention_fwd(q, k, v, table_h, table_w)[0]


def _log2_inputs(
    q: Array, k: Array, v: Array, table_h: Array | None, table_w: Array | None
) -> tuple[Array, Array, Array, Array, Array]:
    """:func:`_attend_log2`'s inputs ``q2, k, v, fh2, fw2`` ``[G, T, .]``: q and the factors times log2 e."""
    q2 = _log2(q)
    fh2, fw2 = factors(q2, table_h, table_w)
    return _flat(q2), _flat(k), _flat(v), _flat_heads_first(fh2), _flat_heads_first(fw2)


def _relative_attention_fwd(
    q: Array, k: Array, v: Array, table_h: Array | None, table_w: Array | None
) -> tuple[Array, tuple[Any, ...]]:
    batch, height, width, heads, _ = q.shape
    out, lse = _attend_log2(*_log2_inputs(q, k, v, table_h, table_w))
    out = out.reshape(batch, heads, height, width, -1)
    return out, (q, k, v, table_h, table_w, out, lse)


def _relative_attention_bwd(residuals: tuple[Any, ...], d_out: Array) -> tuple[Any, ...]:
    # The barrier keeps XLA from merging what follows with the forward's same padding and reshapes,
    # which would keep those alive from the forward to here (in a model: every layer's at once).
    q, k, v, table_h, table_w, out, lse = lax.optimization_barrier(residuals)
    inputs = _log2_inputs(q, k, v, table_h, table_w)
    flat_out, flat_d_out = _flat_heads_first(out), _flat_heads_first(d_out)
    d_q, d_k, d_v, d_fh, d_fw = _attend_log2_bwd(*inputs, flat_out, lse, flat_d_out)
    (fh, fw), factors_vjp = jax.vjp(factors, q, table_h, table_w)  # linear: only its transpose is run
    d_q_factors, d_table_h, d_table_w = factors_vjp((d_fh.reshape(fh.shape), d_fw.reshape(fw.shape)))
    unflat = lambda x, like: jnp.moveaxis(
        x.reshape(*like.shape[:1], like.shape[3], *like.shape[1:3], -1), 1, 3
    )
    d_q = unflat(d_q, q) + d_q_factors
    return (
        d_q.astype(q.dtype),
        unflat(d_k, k).astype(k.dtype),
        unflat(d_v, v).astype(v.dtype),
        d_table_h,
        d_table_w,
    )


_relative_attention.defvjp(_relative_attention_fwd, _relative_attention_bwd)
