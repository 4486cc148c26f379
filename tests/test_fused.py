"""The fused path's parts against the float64 reference loops: the folding of the relative logits
into one dot product, and the accelerator kernels run in Pallas' interpreter on this CPU (the TPU
flash-attention kernel and the GPU Triton kernel), values and gradients.

The CPU form of ``implementation="fused"`` (folding + the blockwise path) runs every test of
``test_functional.py``; these tests cover what only a TPU or GPU would otherwise execute.
"""

from __future__ import annotations

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from aacn_jax import functional as F
from aacn_jax.functional import fused
from tests.reference import relative_logits_ref, self_attention_2d_ref
from tests.test_functional import _assert_gradients_match_central_differences, _qkv, _rel, _x64


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 4), (3, 5), (6, 2)])
def test_folded_dot_products_are_the_paper_logits(height, width):
    """[qs, h, w] . [k, onehot(x2), onehot(y2)] = qs . k + relative_logits(qs) for every pair."""
    rng = np.random.default_rng(900)
    B, N, d = 2, 3, 4
    q, k, _ = _qkv(rng, B, height, width, N, d, 1)
    rel_h, rel_w = _rel(rng, height, width, d)
    q_folded, k_folded = fused.fold_relative_logits(q, k, F.absolute_table(rel_h), F.absolute_table(rel_w))
    assert q_folded.shape == k_folded.shape == (B, height, width, N, d + height + width)
    got = np.einsum("bxynd,bzwnd->bnxyzw", np.float64(q_folded), np.float64(k_folded))
    want = np.einsum("bxynd,bzwnd->bnxyzw", np.float64(q), np.float64(k)) + relative_logits_ref(
        q, rel_h, rel_w
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _gpu_interpreted(q, k, v):
    return fused.gpu_flash_attention(q, k, v, interpret=True)


def _cudnn_form_on_xla(q, k, v):
    """cuDNN's call with its padding (odd token counts, depth), computed by XLA on a CPU."""
    return fused.cudnn_attention(q, k, v, implementation="xla")


KERNELS = {"tpu": fused.tpu_flash_attention, "triton": _gpu_interpreted, "cudnn_form": _cudnn_form_on_xla}


@contextlib.contextmanager
def _interpreted(kernel_name):
    """TPU kernels run in Pallas' TPU interpreter; the Triton kernel takes ``interpret=True``."""
    with pltpu.force_tpu_interpret_mode() if kernel_name == "tpu" else contextlib.nullcontext():
        yield


def _kernel_attention(kernel_name, q, k, v, rel_h=None, rel_w=None):
    """``self_attention_2d``'s fused path with the named kernel (scaling, tables, folding);
    ``gpu_float64``: the CUDA route as it runs without a GPU kernel for the dtype."""
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    if rel_h is not None:
        q, k = fused.fold_relative_logits(q, k, F.absolute_table(rel_h), F.absolute_table(rel_w))
    kernel = fused.gpu_flash_attention if kernel_name == "gpu_float64" else KERNELS[kernel_name]
    return fused.on_tokens(kernel)(q, k, v.astype(q.dtype))


@pytest.mark.parametrize("kernel_name", KERNELS)
@pytest.mark.parametrize("use_rel", [False, True])
def test_kernel_values_and_gradients_match_the_float64_reference(kernel_name, use_rel):
    """A non-square map (keys padded to the kernel's block, padding masked), every input's gradient
    against central differences of the reference."""
    rng = np.random.default_rng(910)
    B, H, W, N, dk, dv = 1, 2, 3, 2, 3, 2
    args = [*_qkv(rng, B, H, W, N, dk, dv, dtype=np.float64), *_rel(rng, H, W, dk, dtype=np.float64)]
    args = args if use_rel else args[:3]
    cotangent = rng.normal(size=(B, H, W, N, dv))
    attention = functools.partial(_kernel_attention, kernel_name)
    with _interpreted(kernel_name):
        out = attention(*(a.astype(np.float32) for a in args))
        np.testing.assert_allclose(out, self_attention_2d_ref(*args), rtol=1e-5, atol=1e-5)
        _assert_gradients_match_central_differences(attention, args, cotangent)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 5)])
def test_cudnn_form_shuts_out_the_padding_token_of_odd_maps(height, width):
    """cuDNN's training kernels need an even token count: an odd map gets one padding key, shut
    out by an extra depth column. Values and every input's gradient against the reference."""
    rng = np.random.default_rng(915)
    B, N, dk, dv = 1, 2, 3, 2
    args = [
        *_qkv(rng, B, height, width, N, dk, dv, dtype=np.float64),
        *_rel(rng, height, width, dk, dtype=np.float64),
    ]
    cotangent = rng.normal(size=(B, height, width, N, dv))
    attention = functools.partial(_kernel_attention, "cudnn_form")
    out = attention(*(a.astype(np.float32) for a in args))
    np.testing.assert_allclose(out, self_attention_2d_ref(*args), rtol=1e-5, atol=1e-5)
    _assert_gradients_match_central_differences(attention, args, cotangent)


def test_gpu_route_takes_float64_through_xla():
    """No flash kernel takes float64: the CUDA route computes it with XLA (seen failing on an
    H200, where float64 reached the Triton kernel), value depth unlike the key depth."""
    rng = np.random.default_rng(917)
    args = _qkv(rng, 1, 2, 3, 2, 3, 2, dtype=np.float64)
    with _x64():
        out = _kernel_attention("gpu_float64", *(jnp.asarray(a) for a in args))
        assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, self_attention_2d_ref(*args), rtol=1e-6, atol=1e-6)  # f32 softmax


@pytest.mark.parametrize("kernel_name", KERNELS)
def test_kernel_over_several_blocks_with_a_masked_tail(kernel_name):
    """156 tokens: two 128-token blocks, the last 100 keys padding. Values against the reference;
    gradients of all five inputs against the dense path (itself checked against the reference)."""
    rng = np.random.default_rng(920)
    B, H, W, N, dk, dv = 1, 12, 13, 2, 4, 3
    args = (*_qkv(rng, B, H, W, N, dk, dv), *_rel(rng, H, W, dk))
    cotangent = rng.normal(size=(B, H, W, N, dv)).astype(np.float32)
    loss = lambda attention: lambda *a: jnp.sum(attention(*a) * cotangent)
    want = jax.grad(loss(functools.partial(F.self_attention_2d, implementation="dense")), argnums=range(5))(
        *args
    )
    with _interpreted(kernel_name):
        attention = functools.partial(_kernel_attention, kernel_name)
        np.testing.assert_allclose(attention(*args), self_attention_2d_ref(*args), rtol=2e-5, atol=2e-5)
        got = jax.grad(loss(attention), argnums=range(5))(*args)
    for name, g, w in zip(("q", "k", "v", "rel_h", "rel_w"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=name)


def test_tpu_kernel_in_bfloat16():
    """bfloat16 inputs: the relative factors are rounded to bfloat16 before the kernel's float32
    dot products; within bfloat16 tolerance of the reference on the rounded inputs."""
    rng = np.random.default_rng(930)
    B, H, W, N, dk, dv = 1, 3, 4, 2, 4, 3
    args = (*_qkv(rng, B, H, W, N, dk, dv), *_rel(rng, H, W, dk))
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)) for a in args]
    with _interpreted("tpu"):
        out = _kernel_attention("tpu", *(jnp.asarray(a, jnp.bfloat16) for a in args))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), self_attention_2d_ref(*rounded), rtol=0, atol=3e-2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU form's memory")
def test_fused_on_cpu_holds_no_quadratic_temporary():
    """The CPU form of fused at 32x32, forward and backward: its temporaries (blocks of logits, the
    folded q and k and their gradients, O(HW (d + H + W)): 213 MiB here) stay below half the
    dense path's (HW)^2 logits alone (512 MiB; dense needs 1.5 GiB in all)."""
    shape = (32, 32, 32, 4, 8)
    q = jax.ShapeDtypeStruct(shape, jnp.float32)
    tables = jax.ShapeDtypeStruct((63, 8), jnp.float32)

    def temp_bytes(implementation):
        loss = lambda *a: F.self_attention_2d(*a, implementation=implementation).sum()
        compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(q, q, q, tables, tables).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense_logits = F.attention.dense_logits_bytes(shape)
    assert temp_bytes("fused") < dense_logits / 2 < temp_bytes("dense")


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (the suite simulates 4 CPUs)")
@pytest.mark.parametrize("implementation", ["fused", None])
def test_under_a_mesh_each_device_attends_to_its_images(implementation):
    """Under ``jax.set_mesh`` (4 devices, batch split) the attention runs per device; values and
    every input's gradient equal those of one device."""
    rng = np.random.default_rng(940)
    B, H, W, N, dk, dv = 8, 5, 3, 2, 4, 3
    args = (*_qkv(rng, B, H, W, N, dk, dv), *_rel(rng, H, W, dk))
    loss = lambda *a: jnp.sum(F.self_attention_2d(*a, implementation=implementation) ** 2)
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=range(5)))
    want = value_and_grad(*args)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        specs = [PartitionSpec("data")] * 3 + [PartitionSpec()] * 2
        sharded = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)]
        got = value_and_grad(*sharded)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
