"""Reference tests for ``aacn_jax.functional``.

Every numerical check compares against the brute-force float64 NumPy loops in
``tests/reference.py``, which are written from the contract equations only.
"""

from __future__ import annotations

import contextlib
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from aacn_jax import functional as F
from tests.reference import (
    attention_loss_gradients_ref,
    rel_to_abs_ref,
    relative_logits_ref,
    self_attention_2d_ref,
)

IMPLEMENTATIONS = ["dense", "blockwise", "fused"]

# float32 result vs float64 reference.
RTOL = 1e-5
ATOL = 1e-5

HYP = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HYP_ATTN = settings(HYP, max_examples=10)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _normal(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _qkv(rng, B, H, W, N, dk, dv, dtype=np.float32):
    return (
        _normal(rng, (B, H, W, N, dk), dtype),
        _normal(rng, (B, H, W, N, dk), dtype),
        _normal(rng, (B, H, W, N, dv), dtype),
    )


def _rel(rng, H, W, dk, dtype=np.float32):
    return _normal(rng, (2 * H - 1, dk), dtype), _normal(rng, (2 * W - 1, dk), dtype)


def _attn(impl, q, k, v, rel_h=None, rel_w=None):
    return F.self_attention_2d(q, k, v, rel_h, rel_w, implementation=impl)


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    """Every implementation runs every test: one that fails or is rejected fails them (never a skip)."""
    return request.param


def _assert_close(actual, expected, rtol=RTOL, atol=ATOL, err_msg=""):
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=err_msg)


@st.composite
def _shapes(draw, max_hw=5):
    return dict(
        B=draw(st.integers(1, 2)),
        H=draw(st.integers(1, max_hw)),
        W=draw(st.integers(1, max_hw)),
        N=draw(st.integers(1, 3)),
        dk=draw(st.integers(1, 4)),
        dv=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# ----------------------------------------------------------------------------
# rel_to_abs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_rel_to_abs_matches_reference(L, lead):
    rng = np.random.default_rng(100 + L)
    x = _normal(rng, (*lead, L, 2 * L - 1))
    out = F.rel_to_abs(jnp.asarray(x))
    assert out.shape == (*lead, L, L)
    # pure gather: must be exact
    np.testing.assert_array_equal(np.asarray(out, np.float64), rel_to_abs_ref(x))


def test_rel_to_abs_index_pattern():
    """Integer-coded input makes the required gather pattern explicit."""
    L = 4
    x = np.arange(L * (2 * L - 1), dtype=np.float32).reshape(L, 2 * L - 1)
    out = np.asarray(F.rel_to_abs(jnp.asarray(x)))
    for i in range(L):
        for j in range(L):
            assert out[i, j] == x[i, j - i + L - 1], (i, j)


# ----------------------------------------------------------------------------
# relative_logits
# ----------------------------------------------------------------------------


@HYP
@given(s=_shapes())
def test_relative_logits_matches_reference(s):
    rng = np.random.default_rng(s["seed"])
    B, H, W, N, d = s["B"], s["H"], s["W"], s["N"], s["dk"]
    q = _normal(rng, (B, H, W, N, d))
    rel_h, rel_w = _rel(rng, H, W, d)
    out = F.relative_logits(jnp.asarray(q), jnp.asarray(rel_h), jnp.asarray(rel_w))
    assert out.shape == (B, N, H, W, H, W)
    _assert_close(out, relative_logits_ref(q, rel_h, rel_w))


@pytest.mark.parametrize("H,W", [(3, 5), (5, 2), (1, 4), (4, 1), (1, 1)])
def test_relative_logits_fixed_shapes(H, W):
    """Deterministic H != W / degenerate cases (also an easy-to-debug failure)."""
    rng = np.random.default_rng(200 + 10 * H + W)
    B, N, d = 2, 3, 4
    q = _normal(rng, (B, H, W, N, d))
    rel_h, rel_w = _rel(rng, H, W, d)
    out = F.relative_logits(jnp.asarray(q), jnp.asarray(rel_h), jnp.asarray(rel_w))
    assert out.shape == (B, N, H, W, H, W)
    _assert_close(out, relative_logits_ref(q, rel_h, rel_w))


def test_relative_logits_height_and_width_roles():
    """With rel_w = 0 the logits depend on (x, x2) only, and vice versa."""
    rng = np.random.default_rng(210)
    B, H, W, N, d = 1, 3, 4, 2, 3
    q = _normal(rng, (B, H, W, N, d))
    rel_h, rel_w = _rel(rng, H, W, d)
    zeros_w = np.zeros_like(rel_w)
    zeros_h = np.zeros_like(rel_h)
    only_h = np.asarray(F.relative_logits(q, rel_h, zeros_w))
    only_w = np.asarray(F.relative_logits(q, zeros_h, rel_w))
    _assert_close(only_h, relative_logits_ref(q, rel_h, zeros_w))
    _assert_close(only_w, relative_logits_ref(q, zeros_h, rel_w))
    # only_h must be constant along y2 (last axis); only_w along x2 (axis 4).
    np.testing.assert_allclose(only_h, np.broadcast_to(only_h[..., :1], only_h.shape), atol=1e-6)
    np.testing.assert_allclose(only_w, np.broadcast_to(only_w[..., :1, :], only_w.shape), atol=1e-6)


def test_relative_logits_is_not_scaled():
    q = np.ones((1, 2, 2, 1, 4), np.float32)
    rel_h = np.ones((3, 4), np.float32)
    rel_w = np.zeros((3, 4), np.float32)
    out = np.asarray(F.relative_logits(q, rel_h, rel_w))
    # q·rel_h = 4 for every entry; any d**-0.5 scaling would give 2.
    np.testing.assert_allclose(out, 4.0, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# self_attention_2d: numerical agreement with the reference
# ----------------------------------------------------------------------------


@HYP_ATTN
@given(s=_shapes())
def test_self_attention_with_rel_matches_reference(impl, s):
    rng = np.random.default_rng(s["seed"])
    B, H, W, N, dk, dv = s["B"], s["H"], s["W"], s["N"], s["dk"], s["dv"]
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel_h, rel_w = _rel(rng, H, W, dk)
    out = _attn(impl, q, k, v, rel_h, rel_w)
    assert out.shape == (B, H, W, N, dv)
    assert out.dtype == jnp.float32
    _assert_close(out, self_attention_2d_ref(q, k, v, rel_h, rel_w))


@HYP_ATTN
@given(s=_shapes())
def test_self_attention_without_rel_matches_reference(impl, s):
    rng = np.random.default_rng(s["seed"])
    B, H, W, N, dk, dv = s["B"], s["H"], s["W"], s["N"], s["dk"], s["dv"]
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    out = _attn(impl, q, k, v)
    assert out.shape == (B, H, W, N, dv)
    _assert_close(out, self_attention_2d_ref(q, k, v))


@pytest.mark.parametrize("use_rel", [False, True])
def test_self_attention_default_implementation_matches_reference(use_rel):
    rng = np.random.default_rng(300)
    B, H, W, N, dk, dv = 2, 3, 4, 2, 3, 5
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel = _rel(rng, H, W, dk) if use_rel else (None, None)
    out = F.self_attention_2d(q, k, v, *rel)  # implementation=None
    _assert_close(out, self_attention_2d_ref(q, k, v, *rel))


@pytest.mark.parametrize("use_rel", [False, True])
def test_self_attention_larger_map_matches_reference(impl, use_rel):
    """A bigger, non-square map (221 keys, not a power of two) so that a
    blocked implementation sees several, ragged key/query blocks."""
    rng = np.random.default_rng(310)
    B, H, W, N, dk, dv = 1, 13, 17, 1, 4, 3
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel = _rel(rng, H, W, dk) if use_rel else (None, None)
    out = _attn(impl, q, k, v, *rel)
    _assert_close(out, self_attention_2d_ref(q, k, v, *rel), rtol=2e-5, atol=2e-5)


def test_implementations_agree():
    rng = np.random.default_rng(320)
    B, H, W, N, dk, dv = 2, 5, 3, 3, 4, 2
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel_h, rel_w = _rel(rng, H, W, dk)
    dense = np.asarray(_attn("dense", q, k, v, rel_h, rel_w), np.float64)
    for name in IMPLEMENTATIONS:
        _assert_close(_attn(name, q, k, v, rel_h, rel_w), dense, err_msg=name)


def test_scale_applies_to_content_term(impl):
    """No rel tables: logits must be (q·k) * dk**-0.5."""
    B, H, W, N, dk, dv = 1, 2, 2, 1, 4, 2
    rng = np.random.default_rng(330)
    q = np.ones((B, H, W, N, dk), np.float32)
    k = np.zeros((B, H, W, N, dk), np.float32)
    k[0, 0, 0, 0, :] = 1.0  # logit 4*0.5 = 2 for key (0,0), 0 elsewhere
    v = _normal(rng, (B, H, W, N, dv))
    out = np.asarray(_attn(impl, q, k, v))
    w = np.array([np.e**2, 1.0, 1.0, 1.0]) / (np.e**2 + 3.0)
    expected = (w[:, None] * v[0, :, :, 0].reshape(4, dv).astype(np.float64)).sum(0)
    _assert_close(out[0, :, :, 0], np.broadcast_to(expected, (H, W, dv)))
    _assert_close(out, self_attention_2d_ref(q, k, v))


def test_scale_applies_to_relative_term(impl):
    """k = 0, so all logits come from the relative term, which must use the
    *scaled* query (q * dk**-0.5)."""
    rng = np.random.default_rng(340)
    B, H, W, N, dk, dv = 1, 3, 2, 2, 4, 3
    q = _normal(rng, (B, H, W, N, dk)) * 2.0
    k = np.zeros_like(q)
    v = _normal(rng, (B, H, W, N, dv))
    rel_h, rel_w = _rel(rng, H, W, dk)
    out = _attn(impl, q, k, v, rel_h, rel_w)
    _assert_close(out, self_attention_2d_ref(q, k, v, rel_h, rel_w))
    # and the unscaled variant must be distinguishable from it
    unscaled = self_attention_2d_ref(q * dk**0.5, k, v, rel_h, rel_w)
    assert np.abs(np.asarray(out, np.float64) - unscaled).max() > 1e-2


def test_relative_term_is_used(impl):
    rng = np.random.default_rng(350)
    B, H, W, N, dk, dv = 1, 3, 4, 2, 3, 3
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel_h, rel_w = _rel(rng, H, W, dk)
    rel_h *= 3.0
    rel_w *= 3.0
    with_rel = np.asarray(_attn(impl, q, k, v, rel_h, rel_w), np.float64)
    without = np.asarray(_attn(impl, q, k, v), np.float64)
    assert np.abs(with_rel - without).max() > 1e-2
    _assert_close(with_rel, self_attention_2d_ref(q, k, v, rel_h, rel_w))


# ----------------------------------------------------------------------------
# self_attention_2d: structural defects
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_rel", [False, True])
def test_attention_is_not_identity_on_v(impl, use_rel):
    """Catches 'V contracted at the query position' (attention == identity)."""
    rng = np.random.default_rng(400)
    B, H, W, N, dk, dv = 2, 3, 3, 2, 4, 4
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel = _rel(rng, H, W, dk) if use_rel else (None, None)
    out = np.asarray(_attn(impl, q, k, v, *rel), np.float64)
    assert np.abs(out - v).max() > 0.1
    # output of a softmax average lies within the per-(b, n, channel) range of v
    vmin = v.min(axis=(1, 2), keepdims=True)
    vmax = v.max(axis=(1, 2), keepdims=True)
    assert np.all(out >= vmin - 1e-5) and np.all(out <= vmax + 1e-5)
    _assert_close(out, self_attention_2d_ref(q, k, v, *rel))


def test_attention_focuses_on_selected_key(impl):
    """One dominant key: every query must return that key's value, not its own."""
    rng = np.random.default_rng(410)
    B, H, W, N, dk, dv = 2, 3, 4, 2, 2, 3
    q = np.zeros((B, H, W, N, dk), np.float32)
    q[..., 0] = 1.0
    k = np.zeros((B, H, W, N, dk), np.float32)
    target = {(0, 0): (2, 1), (0, 1): (0, 3), (1, 0): (1, 2), (1, 1): (2, 0)}
    for (b, n), (x2, y2) in target.items():
        k[b, x2, y2, n, 0] = 60.0  # logit 60/sqrt(2) ~ 42 vs 0 elsewhere
    v = _normal(rng, (B, H, W, N, dv))
    out = np.asarray(_attn(impl, q, k, v), np.float64)
    for (b, n), (x2, y2) in target.items():
        expected = np.broadcast_to(v[b, x2, y2, n].astype(np.float64), (H, W, dv))
        _assert_close(out[b, :, :, n], expected, err_msg=f"b={b} n={n}")


def test_heads_are_independent_and_distinct(impl):
    """Catches scrambled head/space reshapes: each head must equal the
    single-head reference on its own slice, heads must differ, and permuting
    the heads of the inputs must permute the heads of the output."""
    rng = np.random.default_rng(420)
    B, H, W, N, dk, dv = 2, 3, 4, 3, 4, 2
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel_h, rel_w = _rel(rng, H, W, dk)
    out = np.asarray(_attn(impl, q, k, v, rel_h, rel_w), np.float64)
    for n in range(N):
        sl = slice(n, n + 1)
        ref_n = self_attention_2d_ref(q[..., sl, :], k[..., sl, :], v[..., sl, :], rel_h, rel_w)
        _assert_close(out[..., sl, :], ref_n, err_msg=f"head {n}")
    for n in range(N):
        for m in range(n + 1, N):
            assert np.abs(out[..., n, :] - out[..., m, :]).max() > 1e-2, (n, m)
    perm = np.array([2, 0, 1])
    out_p = np.asarray(
        _attn(impl, q[..., perm, :], k[..., perm, :], v[..., perm, :], rel_h, rel_w), np.float64
    )
    _assert_close(out_p, out[..., perm, :])


def test_batch_elements_are_independent(impl):
    rng = np.random.default_rng(430)
    B, H, W, N, dk, dv = 3, 2, 3, 2, 3, 3
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel_h, rel_w = _rel(rng, H, W, dk)
    out = np.asarray(_attn(impl, q, k, v, rel_h, rel_w), np.float64)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[1] += 1.0
    k2[1] -= 1.0
    v2[1] *= 2.0
    out2 = np.asarray(_attn(impl, q2, k2, v2, rel_h, rel_w), np.float64)
    _assert_close(out2[[0, 2]], out[[0, 2]])
    assert np.abs(out2[1] - out[1]).max() > 1e-2


def test_spatial_transpose_equivariance(impl):
    """Transposing the map (H <-> W) and swapping rel_h/rel_w must transpose
    the output. Catches mixing up height and width axes on non-square maps."""
    rng = np.random.default_rng(440)
    B, H, W, N, dk, dv = 1, 2, 5, 2, 3, 2
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel_h, rel_w = _rel(rng, H, W, dk)
    out = np.asarray(_attn(impl, q, k, v, rel_h, rel_w), np.float64)
    t = lambda a: np.ascontiguousarray(np.swapaxes(a, 1, 2))
    out_t = np.asarray(_attn(impl, t(q), t(k), t(v), rel_w, rel_h), np.float64)
    _assert_close(out_t, t(out))


def test_large_logits_are_numerically_stable(impl):
    """Logits of order 1e3 overflow exp() unless the max is subtracted."""
    rng = np.random.default_rng(450)
    B, H, W, N, dk, dv = 1, 3, 3, 2, 4, 3
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    q = q * 500.0
    rel_h, rel_w = _rel(rng, H, W, dk)
    out = np.asarray(_attn(impl, q, k, v, rel_h, rel_w), np.float64)
    assert np.all(np.isfinite(out))
    # logits ~1e3 in float32 carry ~1e-4 absolute error -> looser tolerance
    _assert_close(out, self_attention_2d_ref(q, k, v, rel_h, rel_w), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------
# transformations: jit / vmap / grad
# ----------------------------------------------------------------------------


class JitAndEagerMatchTheReferences(chex.TestCase):
    """Each public function once jitted and once eagerly (chex.variants), against the references."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_rel_to_abs(self):
        x = _normal(np.random.default_rng(101), (2, 5, 9))
        out = self.variant(F.rel_to_abs)(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(out, np.float64), rel_to_abs_ref(x))

    @chex.variants(with_jit=True, without_jit=True)
    def test_relative_logits(self):
        rng = np.random.default_rng(230)
        q = _normal(rng, (2, 3, 4, 2, 3))
        rel_h, rel_w = _rel(rng, 3, 4, 3)
        _assert_close(self.variant(F.relative_logits)(q, rel_h, rel_w), relative_logits_ref(q, rel_h, rel_w))

    @chex.variants(with_jit=True, without_jit=True)
    def test_self_attention_2d_every_implementation(self):
        rng = np.random.default_rng(500)
        q, k, v = _qkv(rng, 2, 3, 4, 2, 3, 5)
        rel_h, rel_w = _rel(rng, 3, 4, 3)
        for implementation in IMPLEMENTATIONS:
            attend = self.variant(functools.partial(F.self_attention_2d, implementation=implementation))
            _assert_close(attend(q, k, v, rel_h, rel_w), self_attention_2d_ref(q, k, v, rel_h, rel_w))
            _assert_close(attend(q, k, v), self_attention_2d_ref(q, k, v))


@pytest.mark.parametrize("use_rel", [False, True])
def test_vmap_matches_loop(impl, use_rel):
    rng = np.random.default_rng(510)
    E, B, H, W, N, dk, dv = 3, 2, 2, 3, 2, 3, 2
    q = _normal(rng, (E, B, H, W, N, dk))
    k = _normal(rng, (E, B, H, W, N, dk))
    v = _normal(rng, (E, B, H, W, N, dv))
    if use_rel:
        rel_h, rel_w = _rel(rng, H, W, dk)
        fn = jax.vmap(lambda a, b, c: _attn(impl, a, b, c, rel_h, rel_w))
        ref = [self_attention_2d_ref(q[e], k[e], v[e], rel_h, rel_w) for e in range(E)]
    else:
        fn = jax.vmap(lambda a, b, c: _attn(impl, a, b, c))
        ref = [self_attention_2d_ref(q[e], k[e], v[e]) for e in range(E)]
    out = np.asarray(fn(q, k, v))
    assert out.shape == (E, B, H, W, N, dv)
    rel = (rel_h, rel_w) if use_rel else ()
    loop = np.stack([np.asarray(_attn(impl, q[e], k[e], v[e], *rel)) for e in range(E)])
    np.testing.assert_allclose(out, loop, rtol=1e-5, atol=1e-6)
    _assert_close(out, np.stack(ref))


def test_vmap_over_rel_tables(impl):
    rng = np.random.default_rng(520)
    E, B, H, W, N, dk, dv = 2, 1, 3, 2, 2, 2, 3
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel_h = _normal(rng, (E, 2 * H - 1, dk))
    rel_w = _normal(rng, (E, 2 * W - 1, dk))
    fn = jax.vmap(lambda rh, rw: _attn(impl, q, k, v, rh, rw))
    out = np.asarray(fn(rel_h, rel_w))
    for e in range(E):
        _assert_close(out[e], self_attention_2d_ref(q, k, v, rel_h[e], rel_w[e]), err_msg=f"e={e}")


@contextlib.contextmanager
def _x64():
    with jax.enable_x64(True):  # JAX 0.10 and 0.12 both have it: no version is skipped
        yield


@pytest.mark.parametrize("use_rel", [False, True])
def test_gradients_check_grads(impl, use_rel):
    """Reverse-mode gradients w.r.t. q, k, v (and rel_h, rel_w) vs. finite
    differences, in float64.  Tolerances also accommodate an implementation
    that internally performs the softmax in float32."""
    rng = np.random.default_rng(600)
    B, H, W, N, dk, dv = 1, 2, 3, 2, 3, 2
    q, k, v = _qkv(rng, B, H, W, N, dk, dv, dtype=np.float64)
    rel_h, rel_w = _rel(rng, H, W, dk, dtype=np.float64)
    with _x64():
        args = tuple(jnp.asarray(a, jnp.float64) for a in (q, k, v))
        if use_rel:
            args = (*args, jnp.asarray(rel_h, jnp.float64), jnp.asarray(rel_w, jnp.float64))
        fn = jax.jit(lambda *a: _attn(impl, *a))  # one compile, not one per eager op
        check_grads(fn, args, order=1, modes=["rev"], eps=1e-3, atol=5e-3, rtol=5e-3)


def _assert_gradients_match_central_differences(attention, args, cotangent):
    """Every input's float32 gradient of ``sum(attention(*args) * cotangent)`` against central
    differences of the float64 reference loops, to 1e-4 of the largest gradient."""
    loss = lambda *a: jnp.sum(attention(*a) * cotangent.astype(np.float32))
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*(a.astype(np.float32) for a in args))
    expected = attention_loss_gradients_ref(args, cotangent)
    for index, (grad, want) in enumerate(zip(grads, expected, strict=True)):
        np.testing.assert_allclose(grad, want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=index)


@pytest.mark.parametrize("use_rel", [False, True])
@pytest.mark.parametrize("dv", [2, 10])
def test_gradients_match_central_differences_of_the_float64_reference(impl, use_rel, dv):
    """check_grads above only sees random directional derivatives; this checks every entry.
    Value depths 2 and 10 take both ways the blockwise backward forms d_out . v (fused, matmul)."""
    rng = np.random.default_rng(620)
    B, H, W, N, dk = 1, 2, 3, 2, 3
    args = [*_qkv(rng, B, H, W, N, dk, dv, dtype=np.float64), *_rel(rng, H, W, dk, dtype=np.float64)]
    cotangent = rng.normal(size=(B, H, W, N, dv))
    attention = lambda *a: _attn(impl, *a)
    _assert_gradients_match_central_differences(attention, args if use_rel else args[:3], cotangent)


@pytest.mark.parametrize("dv", [2, 10])
@pytest.mark.parametrize("block_size", [2, 3])
def test_blockwise_gradients_with_a_padded_last_block(block_size, dv):
    """H=5 in blocks of 2 or 3 rows: the last block is padded with zero rows, which must not leak
    into any gradient."""
    rng = np.random.default_rng(630)
    B, H, W, N, dk = 1, 5, 2, 2, 3
    args = [*_qkv(rng, B, H, W, N, dk, dv, dtype=np.float64), *_rel(rng, H, W, dk, dtype=np.float64)]
    cotangent = rng.normal(size=(B, H, W, N, dv))
    attention = lambda *a: F.self_attention_2d(*a, implementation="blockwise", block_size=block_size)
    _assert_gradients_match_central_differences(attention, args, cotangent)


@pytest.mark.parametrize("use_rel", [False, True])
def test_vmap_of_gradients_matches_a_loop(impl, use_rel):
    """Per-example gradients through the custom VJP (and the blockwise forward's optimization
    barrier) under vmap, against one gradient call per example."""
    rng = np.random.default_rng(640)
    E, B, H, W, N, dk, dv = 3, 1, 3, 2, 2, 3, 2
    q, k, v = (_normal(rng, (E, B, H, W, N, d)) for d in (dk, dk, dv))
    rel = _rel(rng, H, W, dk) if use_rel else ()
    cotangent = _normal(rng, (B, H, W, N, dv))
    loss = lambda q, k, v: jnp.sum(_attn(impl, q, k, v, *rel) * cotangent)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    batched = jax.vmap(grad)(q, k, v)
    for e in range(E):
        for got, want in zip(batched, grad(q[e], k[e], v[e]), strict=True):
            np.testing.assert_allclose(got[e], want, rtol=1e-5, atol=1e-6, err_msg=f"example {e}")


def test_gradients_are_nonzero_for_every_input(impl):
    """Guards against inputs silently cut from the graph (e.g. stop_gradient)."""
    rng = np.random.default_rng(610)
    B, H, W, N, dk, dv = 1, 2, 3, 2, 3, 2
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel_h, rel_w = _rel(rng, H, W, dk)
    w = _normal(rng, (B, H, W, N, dv))
    loss = lambda *a: jnp.sum(_attn(impl, *a) * w)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, rel_h, rel_w)
    for name, g, a in zip(("q", "k", "v", "rel_h", "rel_w"), grads, (q, k, v, rel_h, rel_w), strict=True):
        assert g.shape == a.shape, name
        assert np.all(np.isfinite(np.asarray(g))), name
        assert np.abs(np.asarray(g)).max() > 1e-4, name


# ----------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_rel", [False, True])
def test_bfloat16_inputs(impl, use_rel):
    rng = np.random.default_rng(700)
    B, H, W, N, dk, dv = 1, 3, 4, 2, 4, 3
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel = _rel(rng, H, W, dk) if use_rel else (None, None)
    bf = lambda a: None if a is None else jnp.asarray(a, jnp.bfloat16)
    out = _attn(impl, bf(q), bf(k), bf(v), *(bf(r) for r in rel))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(out))
    # reference on the bf16-rounded inputs
    rd = lambda a: None if a is None else np.asarray(bf(a).astype(jnp.float32))
    ref = self_attention_2d_ref(rd(q), rd(k), rd(v), rd(rel[0]), rd(rel[1]))
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-2)
    # also close to the float32 reference on the unrounded inputs
    np.testing.assert_allclose(out, self_attention_2d_ref(q, k, v, *rel), rtol=0, atol=6e-2)


def test_bfloat16_gradients(impl):
    """bfloat16 gradients of every input within bfloat16 tolerance of the float32 ones. An 8x8 map,
    two heads: a shape at which XLA:CPU once refused the blockwise backward's bfloat16 matmuls."""
    rng = np.random.default_rng(720)
    B, H, W, N, dk, dv = 2, 8, 8, 2, 4, 2
    args = (*_qkv(rng, B, H, W, N, dk, dv), *_rel(rng, H, W, dk))
    cotangent = _normal(rng, (B, H, W, N, dv))
    loss = lambda *a: jnp.sum(_attn(impl, *a).astype(jnp.float32) * cotangent)
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(5))))
    want = grad(*args)
    got = grad(*(jnp.asarray(a, jnp.bfloat16) for a in args))
    for name, g, w in zip(("q", "k", "v", "rel_h", "rel_w"), got, want, strict=True):
        assert g.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(g.astype(np.float32), w, rtol=0, atol=0.05 * np.abs(w).max(), err_msg=name)


def test_float32_output_dtype(impl):
    rng = np.random.default_rng(710)
    q, k, v = _qkv(rng, 1, 2, 2, 1, 2, 3)
    assert _attn(impl, q, k, v).dtype == jnp.float32


# ----------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------


def _assert_names(err: pytest.ExceptionInfo, *names: str):
    msg = str(err.value)
    pattern = r"(?<![A-Za-z0-9])(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z0-9])"
    assert re.search(pattern, msg), f"message {msg!r} does not name any of {names}"


def _valid(rng, B=1, H=3, W=4, N=2, dk=3, dv=2):
    q, k, v = _qkv(rng, B, H, W, N, dk, dv)
    rel_h, rel_w = _rel(rng, H, W, dk)
    return q, k, v, rel_h, rel_w


@pytest.mark.parametrize("which", ["rel_h", "rel_w"])
def test_only_one_rel_table_raises(which):
    rng = np.random.default_rng(800)
    q, k, v, rel_h, rel_w = _valid(rng)
    kw = {"rel_h": rel_h, "rel_w": None} if which == "rel_h" else {"rel_h": None, "rel_w": rel_w}
    with pytest.raises(ValueError) as err:
        F.self_attention_2d(q, k, v, **kw)
    _assert_names(err, "rel_h", "rel_w")


@pytest.mark.parametrize(
    "names,build",
    [
        (("rel_h",), lambda q, k, v, rh, rw: (q, k, v, rh[:-1], rw)),  # 2H-2 rows
        (("rel_h",), lambda q, k, v, rh, rw: (q, k, v, np.concatenate([rh, rh[:1]]), rw)),  # 2H rows
        (("rel_w",), lambda q, k, v, rh, rw: (q, k, v, rh, rw[:-1])),
        (("rel_h",), lambda q, k, v, rh, rw: (q, k, v, rh[:, :-1], rw)),  # depth != dk
        (("rel_w",), lambda q, k, v, rh, rw: (q, k, v, rh, np.concatenate([rw, rw[:, :1]], 1))),
        (("rel_h",), lambda q, k, v, rh, rw: (q, k, v, rh[None], rw)),  # rank 3
        (("rel_h", "rel_w"), lambda q, k, v, rh, rw: (q, k, v, rw, rh)),  # swapped (H != W)
    ],
    ids=["rel_h-short", "rel_h-long", "rel_w-short", "rel_h-depth", "rel_w-depth", "rel_h-rank", "swapped"],
)
def test_bad_rel_table_shapes_raise(names, build):
    rng = np.random.default_rng(810)
    args = build(*_valid(rng))
    with pytest.raises(ValueError) as err:
        F.self_attention_2d(*args)
    _assert_names(err, *names)


@pytest.mark.parametrize(
    "names,build",
    [
        (("q",), lambda q, k, v: (q[0], k, v)),
        (("k",), lambda q, k, v: (q, k[0], v)),
        (("v",), lambda q, k, v: (q, k, v[0])),
        (("q",), lambda q, k, v: (q[None], k, v)),
        (("q", "k"), lambda q, k, v: (q, k[..., :-1], v)),
        (("k", "v"), lambda q, k, v: (q, k, v[:, :-1])),  # spatial mismatch
        (("k", "v", "q"), lambda q, k, v: (q, k, v[:, :, :, :-1])),  # heads mismatch
        (("q", "k"), lambda q, k, v: (q[:, :-1], k, v)),  # q spatial != k spatial
    ],
    ids=["q-rank4", "k-rank4", "v-rank4", "q-rank6", "qk-depth", "kv-spatial", "v-heads", "qk-spatial"],
)
def test_bad_qkv_shapes_raise(names, build):
    rng = np.random.default_rng(820)
    q, k, v, _, _ = _valid(rng)
    with pytest.raises(ValueError) as err:
        F.self_attention_2d(*build(q, k, v))
    _assert_names(err, *names)


@pytest.mark.parametrize(
    "name,build",
    [
        ("rel_h", lambda q, rh, rw: (q, rh[:-1], rw)),
        ("rel_w", lambda q, rh, rw: (q, rh, rw[:-1])),
        ("rel_h", lambda q, rh, rw: (q, rh[:, :-1], rw)),
        ("q", lambda q, rh, rw: (q[0], rh, rw)),
    ],
    ids=["rel_h-rows", "rel_w-rows", "rel_h-depth", "q-rank"],
)
def test_relative_logits_bad_shapes_raise(name, build):
    rng = np.random.default_rng(830)
    q, _, _, rel_h, rel_w = _valid(rng)
    with pytest.raises(ValueError) as err:
        F.relative_logits(*build(q, rel_h, rel_w))
    _assert_names(err, name)


def test_rel_to_abs_bad_last_dim_raises():
    x = np.zeros((2, 3, 6), np.float32)  # should be 2*3-1 = 5
    with pytest.raises(ValueError):
        F.rel_to_abs(x)


# ----------------------------------------------------------------------------
# the TPU route: folded, chunked over images, recomputed in the backward pass
# ----------------------------------------------------------------------------


def _tokens_attention(q, k, v):
    """Plain softmax attention on ``[B, T, N, d]`` tokens, q already scaled: the kernel's contract."""
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k)
    return jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(logits, axis=-1), v)


def _tpu_route(images_per_chunk, q, k, v, rel_h=None, rel_w=None):
    """``self_attention_2d``'s TPU route (its scaling and tables), a kernel on tokens written out in
    jnp in place of the Pallas one (whose own tests are in tests/test_fused.py; its interpreter's
    callbacks cannot be recomputed by ``jax.checkpoint``)."""
    from aacn_jax.functional import fused

    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    tables = (None, None) if rel_h is None else (F.absolute_table(rel_h), F.absolute_table(rel_w))
    return fused.tpu_relative_attention(
        q, k, v.astype(q.dtype), *tables, kernel=_tokens_attention, images_per_chunk=images_per_chunk
    )


@pytest.mark.parametrize("use_rel", [False, True])
def test_tpu_route_in_chunks_matches_the_float64_reference(use_rel):
    """Four images in two chunks of two, each chunk's folding and kernel recomputed by the backward
    pass: values and every input's gradient against the reference, so no chunk sees another's
    images or gradients."""
    rng = np.random.default_rng(640)
    B, H, W, N, dk, dv = 4, 2, 3, 2, 3, 2
    args = [*_qkv(rng, B, H, W, N, dk, dv, dtype=np.float64), *_rel(rng, H, W, dk, dtype=np.float64)]
    args = args if use_rel else args[:3]
    cotangent = rng.normal(size=(B, H, W, N, dv))
    attention = functools.partial(_tpu_route, 2)
    _assert_close(attention(*(a.astype(np.float32) for a in args)), self_attention_2d_ref(*args))
    _assert_gradients_match_central_differences(attention, args, cotangent)


def test_tpu_chunks_divide_the_batch_and_fit_the_budget():
    """The most images whose float32 [images, N, tokens padded to 128, 128] array fits 8 MiB, a
    divisor of the batch: 2 of 128 at 32x32 with 8 heads (4 MiB an image), 16 at 8x8 (0.5 MiB)."""
    from aacn_jax.functional import fused

    assert fused.tpu_images_per_chunk(128, 32, 32, 8) == 2
    assert fused.tpu_images_per_chunk(128, 8, 8, 8) == 16
    assert fused.tpu_images_per_chunk(12, 16, 16, 8) == 6  # 1 MiB an image: 8 would fit, 6 divides 12
    assert fused.tpu_images_per_chunk(7, 56, 56, 8) == 1  # 12.5 MiB an image: over the budget, still 1
    with pytest.raises(ValueError, match="images_per_chunk=3 must divide the batch 4"):
        _tpu_route(3, *_qkv(np.random.default_rng(0), 4, 2, 2, 1, 2, 1))
