"""The Mosaic GPU relative-attention kernels (``implementation="mgpu"``) on this CPU: run in Mosaic
GPU's interpreter against the float64 reference loops (values, every input's gradient), the softmax
identity the factor gradients obey, the CUDA export at the paper's shapes (the kernels' custom
calls, no ``(HW)^2`` array, no folded depth), and the fallback to fold + Triton/cuDNN.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import PartitionSpec

from aacn_jax import functional as F
from aacn_jax.functional import relative_mgpu
from benchmarks.attention import PAPER_SHAPES
from tests.reference import attention_loss_gradients_ref, self_attention_2d_ref
from tests.test_functional import _qkv, _rel
from tests.test_lowering import (
    BATCH,
    NEEDS_MGPU_KERNELS,
    _data_mesh,
    _lowering_target,
    _shape_args,
    _sharded,
    _zero_constants,
    quadratic_lines,
)

MOSAIC_CALL = "custom_call @mosaic_gpu"
TRITON_CALL = "__gpu$xla.gpu.triton"


def _kernel_attention(q, k, v, rel_h=None, rel_w=None):
    """``self_attention_2d``'s CUDA route of ``"mgpu"`` (scaling, absolute tables, factors, kernels)."""
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    tables = [None, None] if rel_h is None else [F.absolute_table(t).astype(q.dtype) for t in (rel_h, rel_w)]
    out = relative_mgpu.relative_attention(q, k, v.astype(q.dtype), *tables)
    return jnp.moveaxis(out, 1, 3)


def _assert_gradients_match_central_differences(attention, args, cotangent):
    """Every input's float32 gradient of ``sum(attention(*args) * cotangent)`` against central
    differences of the float64 reference loops, to 1e-4 of the largest gradient plus 1e-6 (a map of
    width 1 has a zero rel_w gradient, which float32 rounding leaves at ~1e-7)."""
    loss = lambda *a: jnp.sum(attention(*a) * cotangent.astype(np.float32))
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*(a.astype(np.float32) for a in args))
    expected = attention_loss_gradients_ref(args, cotangent)
    for index, (grad, want) in enumerate(zip(grads, expected, strict=True)):
        atol = 1e-4 * np.abs(want).max() + 1e-6
        np.testing.assert_allclose(grad, want, rtol=0, atol=atol, err_msg=f"argument {index}")


@functools.partial(jax.jit, static_argnums=0)
def _value_and_vjp(attention, args, cotangent):
    """``attention(*args)`` and its gradients for ``cotangent``, one jitted forward."""
    out, vjp = jax.vjp(attention, *args)
    return out, vjp(cotangent)


@NEEDS_MGPU_KERNELS
@pytest.mark.parametrize(
    ("height", "width", "use_rel"),
    [(1, 1, True), (2, 3, True), (3, 1, True), (1, 5, True), (2, 3, False)],
)
def test_kernels_match_the_float64_reference_values_and_central_differences(height, width, use_rel):
    """Maps of one pixel, one row, one column, non-square; with and without the tables. Every
    input's gradient against central differences of the reference loops."""
    rng = np.random.default_rng(2200)
    B, N, dk, dv = 1, 2, 3, 2
    args = [
        *_qkv(rng, B, height, width, N, dk, dv, dtype=np.float64),
        *_rel(rng, height, width, dk, dtype=np.float64),
    ]
    args = args if use_rel else args[:3]
    cotangent = rng.normal(size=(B, height, width, N, dv))
    with relative_mgpu.interpret():
        out = _kernel_attention(*(a.astype(np.float32) for a in args))
        np.testing.assert_allclose(out, self_attention_2d_ref(*args), rtol=1e-5, atol=1e-5)
        _assert_gradients_match_central_differences(_kernel_attention, args, cotangent)


@NEEDS_MGPU_KERNELS
def test_kernels_over_several_query_and_key_blocks():
    """17 x 5 (odd, non-square): rows padded 5 -> 8 (three masked columns), 8 rows per key block
    (three blocks, the last with seven padding rows), 85 queries in two blocks of 64. fh is stored
    unwidened, 17 rows padded to 32: the blocks read its 16-row windows 0, 0 and 1 at offsets 0, 8
    and 0. Values against the reference, all five gradients against the dense path."""
    rng = np.random.default_rng(2210)
    B, H, W, N, dk, dv = 1, 17, 5, 2, 4, 3
    plan = relative_mgpu.plan(H, W)
    assert (plan, plan.key_blocks, plan.phases) == (relative_mgpu.Plan(H, W, row=8, rows=8), 3, 2)
    fh_padded, _ = relative_mgpu._factors_padded(
        plan, jnp.zeros((1, H * W, H)), jnp.zeros((1, H * W, W)), jnp.float32
    )
    assert fh_padded.shape == (1, plan.queries, 32)
    args = (*_qkv(rng, B, H, W, N, dk, dv), *_rel(rng, H, W, dk))
    cotangent = rng.normal(size=(B, H, W, N, dv)).astype(np.float32)
    dense = functools.partial(F.self_attention_2d, implementation="dense")
    want = jax.vjp(dense, *args)[1](cotangent)
    with relative_mgpu.interpret():
        out, grads = _value_and_vjp(_kernel_attention, args, cotangent)
    np.testing.assert_allclose(out, self_attention_2d_ref(*args), rtol=2e-5, atol=2e-5)
    for name, got, w in zip(("q", "k", "v", "rel_h", "rel_w"), grads, want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=name)


@NEEDS_MGPU_KERNELS
def test_the_backward_keeps_no_relative_factors(capsys):
    """What the forward saves for the backward: the inputs, the output and the log-sum-exp. The
    factors (H + W float32 values per query and head, several times q) are recomputed instead."""
    B, H, W, N, dk, dv = 2, 5, 7, 2, 4, 3
    q, v = jnp.ones((B, H, W, N, dk), jnp.bfloat16), jnp.ones((B, H, W, N, dv), jnp.bfloat16)
    tables = jnp.ones((H, H, dk), jnp.bfloat16), jnp.ones((W, W, dk), jnp.bfloat16)
    with relative_mgpu.interpret():
        print_saved_residuals(relative_mgpu.relative_attention, q, q, v, *tables)
    saved = re.findall(r"^(\w+\[[\d,]*\])", capsys.readouterr().out, re.MULTILINE)
    queries = relative_mgpu.plan(H, W).queries
    expected = ["bf16[2,5,7,2,4]"] * 2 + ["bf16[2,5,7,2,3]", "bf16[5,5,4]", "bf16[7,7,4]"]
    assert sorted(saved) == sorted([*expected, f"f32[{B * N},{queries}]", "bf16[2,2,5,7,3]"])


def test_tuning_sets_both_knobs_for_what_is_traced_inside_and_checks_them():
    """Nested settings restore the outer ones; 256 keys per block is valid where a map's rows allow
    it (8 rows of 32 at 32x32; the benchmark's sweep sets it for every such shape), and plan() says
    where they do not; stages outside 1..MAX_STAGES and key blocks under 1 raise ValueError."""
    assert relative_mgpu.plan(32, 32).rows == 2
    with relative_mgpu.tuning(key_block=256, stages=2):
        assert relative_mgpu.plan(32, 32) == relative_mgpu.Plan(32, 32, row=32, rows=8)
        assert relative_mgpu._STAGES.get() == 2
        with relative_mgpu.tuning(stages=3):
            assert (relative_mgpu.plan(32, 32).rows, relative_mgpu._STAGES.get()) == (8, 3)
        assert relative_mgpu._STAGES.get() == 2
        with pytest.raises(ValueError, match="more than 16"):
            relative_mgpu.plan(8, 8)  # 32 rows of 8
    assert (relative_mgpu.plan(32, 32).rows, relative_mgpu._STAGES.get()) == (2, 1)
    for bad in ({"stages": 0}, {"stages": relative_mgpu.MAX_STAGES + 1}, {"key_block": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))), relative_mgpu.tuning(**bad):
            pass


@NEEDS_MGPU_KERNELS
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_kernels_at_each_pipeline_depth_match_the_reference_without_races(stages):
    """``tuning(stages=...)``: each loop's TMA loads run ``stages - 1`` blocks ahead into their own
    shared-memory slots (``stages=1``, the default: each block loaded and awaited before its
    wgmmas, its buffers refilled only after those were awaited). 11 x 13: three key blocks (the
    last with one padding row) and three query blocks (the last 15 of 64 real), so a block read
    from the wrong slot is not just a reordering of the online softmax or of the sums. Values
    against the reference loops, all five gradients against the dense path, under the
    interpreter's race detector (a slot read before its load was awaited, or refilled while read,
    raises)."""
    rng = np.random.default_rng(2250)
    B, H, W, N, dk, dv = 1, 11, 13, 2, 4, 3
    plan = relative_mgpu.plan(H, W)
    assert (plan.key_blocks, plan.queries // relative_mgpu.BLOCK_Q) == (3, 3)
    args = (*_qkv(rng, B, H, W, N, dk, dv), *_rel(rng, H, W, dk))
    cotangent = rng.normal(size=(B, H, W, N, dv)).astype(np.float32)
    want = jax.vjp(functools.partial(F.self_attention_2d, implementation="dense"), *args)[1](cotangent)
    with relative_mgpu.interpret(detect_races=True), relative_mgpu.tuning(stages=stages):
        out, grads = _value_and_vjp(_kernel_attention, args, cotangent)
    np.testing.assert_allclose(out, self_attention_2d_ref(*args), rtol=2e-5, atol=2e-5)
    for name, got, w in zip(("q", "k", "v", "rel_h", "rel_w"), grads, want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=name)


@NEEDS_MGPU_KERNELS
def test_kernels_in_bfloat16():
    """bfloat16 operands (what the GPU route runs): within bfloat16 tolerance of the reference on the
    rounded inputs, values and gradients."""
    rng = np.random.default_rng(2220)
    B, H, W, N, dk, dv = 1, 3, 4, 2, 4, 3
    args = (*_qkv(rng, B, H, W, N, dk, dv), *_rel(rng, H, W, dk))
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)) for a in args]
    cotangent = rng.normal(size=(B, H, W, N, dv)).astype(np.float32)
    want = jax.vjp(functools.partial(F.self_attention_2d, implementation="dense"), *rounded)[1](cotangent)
    with relative_mgpu.interpret():
        bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (*args, cotangent)]
        out, grads = _value_and_vjp(_kernel_attention, tuple(bf16[:5]), bf16[5])
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), self_attention_2d_ref(*rounded), rtol=0, atol=3e-2)
    for name, got, w in zip(("q", "k", "v", "rel_h", "rel_w"), grads, want, strict=True):
        assert got.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(
            got.astype(np.float32), w, rtol=0, atol=3e-2 * np.abs(w).max(), err_msg=name
        )


@NEEDS_MGPU_KERNELS
def test_factor_gradients_sum_to_zero_per_query():
    """The softmax gradient dS sums to 0 over each query's keys, so must each query's dfh (over key
    rows) and dfw (over key columns): the kernel's one-hot reductions of dS, padding included. With
    the tuning knob at 128 keys per block: 16 rows of 8 (3 real columns), two blocks."""
    rng = np.random.default_rng(2230)
    G, H, W, d, e = 2, 20, 3, 4, 2
    q, k = (jnp.asarray(rng.normal(size=(G, H * W, d)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(G, H * W, e)), jnp.float32)
    fh = jnp.asarray(rng.normal(size=(G, H * W, H)), jnp.float32)
    fw = jnp.asarray(rng.normal(size=(G, H * W, W)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(G, H * W, e)), jnp.float32)
    assert relative_mgpu.plan(H, W, key_block=128) == relative_mgpu.Plan(H, W, row=8, rows=16)
    with relative_mgpu.interpret(), relative_mgpu.tuning(key_block=128):
        *_, d_fh, d_fw = _value_and_vjp(relative_mgpu.attend, (q, k, v, fh, fw), cotangent)[1]
    # as relative_attention's, attend's backward starts from a barrier (see the CUDA export test)
    backward = jax.make_jaxpr(lambda *a: jax.vjp(relative_mgpu.attend, *a)[1](cotangent))(q, k, v, fh, fw)
    assert "optimization_barrier" in str(backward)
    scale = float(jnp.abs(d_fh).max())
    assert scale > 1e-2 and float(jnp.abs(d_fw).max()) > 1e-2  # not trivially zero
    np.testing.assert_allclose(d_fh.sum(-1), 0, atol=1e-5 * scale)
    np.testing.assert_allclose(d_fw.sum(-1), 0, atol=1e-5 * scale)


def _export_vjp(shape, args=None, mesh=None, **kwargs) -> str:
    def run(q, k, v, rel_h, rel_w, cotangent):
        attention = functools.partial(F.self_attention_2d, implementation="mgpu")
        out, vjp = jax.vjp(attention, q, k, v, rel_h, rel_w)
        return out, vjp(cotangent)

    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    with _lowering_target("cuda", mesh):
        exported = export.export(jax.jit(run), platforms=["cuda"], disabled_checks=checks)
        return exported(*(args or _shape_args(shape, **kwargs))).mlir_module()


def _folded_depth_lines(text: str, shape) -> list[str]:
    """Lines that compute an array of the fold's depth ``dk + H + W`` (as the fused path has); as in
    ``quadratic_lines``, not the zero fills of the CPU branch's residual slots, nor lines passing them on."""
    folded = re.compile(rf"tensor<(\d+x)*{shape.key_depth + shape.height + shape.width}x[a-z]")
    fill = re.compile(r"stablehlo.broadcast_in_dim (%cst\w*), dims = \[\] : \(tensor<\w+>\)")
    zeros = _zero_constants(text)
    return [
        line.strip()[:300]
        for line in text.splitlines()
        if folded.search(line)
        and not ((match := fill.search(line)) and match.group(1) in zeros)
        and not line.strip().startswith(("stablehlo.return", "}) : (tensor<i32>) ->"))
    ]


@NEEDS_MGPU_KERNELS
@pytest.mark.parametrize("shape", PAPER_SHAPES, ids=lambda s: s.name)
def test_forward_backward_exports_for_cuda_as_the_kernels(shape):
    """Every paper layer shape, batch 128, bfloat16, lowered for an H100: three Mosaic GPU calls
    (forward, dQ + factors, dK + dV), no Triton call, no (HW)^2 array, no folded depth. The
    backward starts from an optimization barrier: without it XLA merged its padding and transposes
    with the forward's and kept those alive in between (AA-WRN-28-10's step, compiled for an H100:
    4.71 GiB of temporaries without, 3.26 with)."""
    text = _export_vjp(shape)
    assert len(re.findall(MOSAIC_CALL, text)) == 3
    assert "stablehlo.optimization_barrier" in text
    assert TRITON_CALL not in text
    assert quadratic_lines(text, BATCH, shape.height, shape.width) == []
    assert _folded_depth_lines(text, shape) == []


@NEEDS_MGPU_KERNELS
def test_pipelined_kernels_export_for_cuda():
    """wrn_32x32 at 128 keys per block, lowered for an H100 with ``stages=2``: Mosaic's lowering
    (layout inference, the shared-memory budget) takes the slotted buffers and the dynamic slot
    index; each of the three kernels differs from its ``stages=1`` form (each is pipelined)."""
    shape = PAPER_SHAPES[0]
    calls = {}
    for stages in (1, 2):
        with relative_mgpu.tuning(key_block=128, stages=stages):
            text = _export_vjp(shape)
        calls[stages] = [line for line in text.splitlines() if MOSAIC_CALL in line]
        assert len(calls[stages]) == 3
        assert quadratic_lines(text, BATCH, shape.height, shape.width) == []
    assert all(one != two for one, two in zip(calls[1], calls[2], strict=True))


@NEEDS_MGPU_KERNELS
def test_kernels_run_on_each_devices_share_of_a_sharded_batch():
    """Batch 128 over a 4-device mesh: each device's kernels take its 32 images (256 image-heads),
    the factors computed by XLA outside ``shard_map``."""
    shape, mesh = PAPER_SHAPES[0], _data_mesh()
    specs = [PartitionSpec("data")] * 3 + [PartitionSpec()] * 2 + [PartitionSpec("data")]
    args = [_sharded(x, mesh, spec) for x, spec in zip(_shape_args(shape), specs, strict=True)]
    calls = [line for line in _export_vjp(shape, args, mesh).splitlines() if MOSAIC_CALL in line]
    assert len(calls) == 3
    for line in calls:  # every [G, ., .] operand and result: G = 32 images x 8 heads
        assert set(re.findall(r"tensor<(\d+)x\d+x\d+x[a-z]", line)) == {str(BATCH // 4 * shape.heads)}


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_float32_and_a_jax_without_the_kernels_fall_back_to_fold_and_triton(monkeypatch):
    """JAX from 0.11 has what the kernels need (CI runs 0.11.2 and 0.12); 0.10 does not (its Mosaic GPU
    interpreter cannot read a transposed view), and there, as in float32 (the N-major operands are
    16-bit only), ``"mgpu"`` lowers to the fused path: Triton, folded depth."""
    shape = PAPER_SHAPES[2]  # 8x8
    assert relative_mgpu.available() == (jax.__version_info__ >= (0, 11))
    assert relative_mgpu.supported(jnp.bfloat16) == relative_mgpu.available()
    assert not relative_mgpu.supported(jnp.float32)
    float32 = _export_vjp(shape, dtype=jnp.float32)
    monkeypatch.setattr(relative_mgpu, "available", lambda: False)  # as on JAX 0.10
    for text in (float32, _export_vjp(shape)):
        assert MOSAIC_CALL not in text
        assert TRITON_CALL in text
        assert _folded_depth_lines(text, shape)


@pytest.mark.parametrize(
    ("height", "width", "heads", "key_depth", "value_depth", "dtype", "stages"),
    [
        (1, 1, 2, 3, 2, jnp.bfloat16, 1),
        (3, 5, 2, 4, 3, jnp.float32, 1),
        (3, 5, 2, 4, 3, jnp.bfloat16, 1),
        (9, 13, 2, 4, 3, jnp.bfloat16, 1),
        (14, 14, 8, 20, 3, jnp.bfloat16, 1),
        pytest.param(11, 13, 2, 4, 3, jnp.bfloat16, 2, id="pipelined-11x13"),
        pytest.param(14, 14, 8, 20, 3, jnp.bfloat16, 2, id="pipelined-14x14"),
    ],
)
def test_on_the_device_mgpu_matches_dense(height, width, heads, key_depth, value_depth, dtype, stages):
    """``implementation="mgpu"`` as this platform runs it (a GPU: the kernels in bfloat16, fold +
    Triton in float32; elsewhere fused's XLA route) against dense: values and all five gradients;
    the ``pipelined`` cases with ``tuning(stages=2)`` (three key and query blocks at 11x13).
    ``benchmarks/device.sh`` runs these first on a GPU, the pipelined ones apart."""
    rng = np.random.default_rng(2240)
    args = (*_qkv(rng, 2, height, width, heads, key_depth, value_depth), *_rel(rng, height, width, key_depth))
    args = tuple(jnp.asarray(a, dtype) for a in args)
    cotangent = jnp.asarray(rng.normal(size=(2, height, width, heads, value_depth)), dtype)
    rounded = [a.astype(jnp.float32) for a in (*args, cotangent)]
    want_out, want = _value_and_vjp(
        functools.partial(F.self_attention_2d, implementation="dense"), tuple(rounded[:5]), rounded[5]
    )
    with relative_mgpu.tuning(stages=stages):
        out, grads = _value_and_vjp(
            functools.partial(F.self_attention_2d, implementation="mgpu"), args, cotangent
        )
    tolerance = 1e-4 if dtype == jnp.float32 else 4e-2
    for name, got, w in zip(
        ("out", "q", "k", "v", "rel_h", "rel_w"), (out, *grads), (want_out, *want), strict=True
    ):
        assert got.dtype == dtype, name
        atol = tolerance * max(1.0, float(jnp.abs(w).max()))
        np.testing.assert_allclose(got.astype(np.float32), w, rtol=0, atol=atol, err_msg=name)
