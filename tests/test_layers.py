"""Flax modules against NumPy forward passes written from the paper, plus shapes, counts and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aacn_jax as A
from aacn_jax import functional as F
from tests.reference import layer_self_attention_ref, mean_pool_ref


def _normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _init(module, x, seed=0):
    return module.init(jax.random.key(seed), jnp.asarray(x))


@pytest.mark.parametrize(
    ("shape", "dk", "dv", "heads"),
    [((2, 5, 3, 6), 8, 4, 2), ((1, 1, 4, 3), 6, 3, 3), ((1, 4, 4, 2), 4, 8, 1)],
)
@pytest.mark.parametrize("position", ["relative", "none"])
def test_self_attention_matches_reference(shape, dk, dv, heads, position):
    x = _normal(shape)
    layer = A.SelfAttention2D(dk, dv, heads, position=position)
    variables = _init(layer, x)
    got = layer.apply(variables, x)
    want = layer_self_attention_ref(x, variables["params"], dk, dv, heads, relative=position == "relative")
    assert got.shape == (*shape[:3], dv)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_relative_tables_shared_across_heads_and_sized_per_axis():
    layer = A.SelfAttention2D(16, 8, 4)
    params = _init(layer, _normal((1, 5, 7, 3)))["params"]
    assert params["rel_h"].shape == (2 * 5 - 1, 16 // 4)
    assert params["rel_w"].shape == (2 * 7 - 1, 16 // 4)


def test_relative_table_init_is_std_not_mean():
    depth = 16
    layer = A.SelfAttention2D(depth * 2, 2, 2)
    params = _init(layer, _normal((1, 64, 64, 1)))["params"]
    table = np.asarray(params["rel_w"])
    assert abs(table.mean()) < 0.05
    np.testing.assert_allclose(table.std(), depth**-0.5, rtol=0.05)


def _param_count(tree):
    return sum(np.size(p) for p in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    ("position", "extra_in", "tables"), [("relative", 0, True), ("none", 0, False), ("coordconv", 2, False)]
)
def test_augmented_conv_parameter_count_closed_form(position, extra_in, tables):
    fin, fout, k, dk, dv, heads, h, w = 6, 20, 3, 16, 8, 4, 7, 5
    layer = A.AugmentedConv(fout, k, dk=dk, dv=dv, num_heads=heads, position=position)
    params = _init(layer, _normal((1, h, w, fin)))["params"]
    conv = k * k * fin * (fout - dv)
    qkv = (fin + extra_in) * (2 * dk + dv) + 2 * dk + dv
    out = dv * dv + dv
    rel = (2 * (h + w) - 2) * (dk // heads) if tables else 0  # the paper's (2(H+W)-2) dkh
    assert _param_count(params) == conv + qkv + out + rel


def test_sinusoidal_position_adds_its_channels_to_the_attention_input():
    layer = A.SelfAttention2D(8, 4, 2, position="sinusoidal", sinusoidal_channels=12)
    params = _init(layer, _normal((1, 4, 4, 3)))["params"]
    assert params["qkv"]["kernel"].shape == (1, 1, 3 + 12, 2 * 8 + 4)


@pytest.mark.parametrize(
    ("size", "strides", "out_size"),
    [
        ((8, 8), 1, (8, 8)),
        ((8, 8), 2, (4, 4)),
        ((7, 9), 2, (4, 5)),
        ((5, 6), (2, 1), (3, 6)),
        ((1, 3), 1, (1, 3)),
    ],
)
def test_augmented_conv_output_shapes(size, strides, out_size):
    layer = A.AugmentedConv(12, (3, 3), strides, dk=8, dv=4, num_heads=2)
    x = _normal((2, *size, 3))
    y = layer.apply(_init(layer, x), x)
    assert y.shape == (2, *out_size, 12)


def test_augmented_conv_is_concat_of_conv_and_attention_on_pooled_input():
    x = _normal((2, 6, 4, 3))
    layer = A.AugmentedConv(10, 3, 2, dk=4, dv=4, num_heads=2)
    variables = _init(layer, x)
    y = np.asarray(layer.apply(variables, x))
    params = variables["params"]
    # Convolution branch, first channels: an explicit strided 3x3 correlation; SAME padding
    # with stride 2 on an even size pads one row/column at the end only.
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    kernel = np.asarray(params["conv"]["kernel"])
    conv = np.zeros((2, 3, 2, 6))
    for i in range(3):
        for j in range(2):
            patch = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
            conv[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel)
    np.testing.assert_allclose(y[..., :6], conv, rtol=1e-5, atol=1e-5)
    # Attention branch, last dv channels: attention of the 2x2-average-pooled input.
    pooled = x.reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4))
    attention = layer_self_attention_ref(pooled, params["attention"], 4, 4, 2)
    np.testing.assert_allclose(y[..., 6:], attention, rtol=2e-5, atol=2e-5)


def test_fully_attentional_layer_has_no_convolution():
    layer = A.AugmentedConv(8, 3, dk=8, dv=8, num_heads=2)
    params = _init(layer, _normal((1, 4, 4, 3)))["params"]
    assert set(params) == {"attention"}


def test_smaller_input_uses_exact_centre_of_tables():
    layer = A.SelfAttention2D(8, 4, 2)
    big = _init(layer, _normal((1, 8, 6, 3)))
    x = _normal((2, 4, 3, 3), seed=1)
    params = big["params"]
    centre = {  # offsets -(L-1)..L-1 of tables learned at H=8 (15 rows) and W=6 (11 rows)
        **params,
        "rel_h": params["rel_h"][8 - 4 : 8 + 4 - 1],
        "rel_w": params["rel_w"][6 - 3 : 6 + 3 - 1],
    }
    want = layer_self_attention_ref(x, centre, 8, 4, 2)
    np.testing.assert_allclose(layer.apply(big, x), want, rtol=2e-5, atol=2e-5)


def test_larger_input_interpolates_tables():
    layer = A.SelfAttention2D(8, 4, 2)
    small = _init(layer, _normal((1, 4, 4, 3)))
    y = layer.apply(small, _normal((1, 9, 6, 3), seed=2))
    assert y.shape == (1, 9, 6, 4)
    assert np.all(np.isfinite(y))
    assert small["params"]["rel_h"].shape == (7, 4)  # parameters keep their init size


def test_resize_relative_table_centre_slice_and_linear_interpolation():
    offsets = np.arange(-4, 5, dtype=np.float32)  # L = 5: a table linear in the offset
    table = np.stack([offsets, 2 * offsets + 1], axis=-1)
    np.testing.assert_array_equal(F.resize_relative_table(table, 3), table[2:7])
    np.testing.assert_array_equal(F.resize_relative_table(table, 5), table)
    bigger = np.asarray(F.resize_relative_table(table, 9))  # 17 rows
    assert bigger.shape == (17, 2)
    np.testing.assert_allclose(bigger[8], table[4])  # offset 0 stays offset 0
    # Interior rows stay on the line, the offset axis stretched from 9 rows to 17.
    interior = slice(2, 15)
    slope = bigger[9, 0] - bigger[8, 0]
    np.testing.assert_allclose(slope, 9 / 17, rtol=1e-5)
    np.testing.assert_allclose(np.diff(bigger[interior, 0]), slope, rtol=1e-5)


def _roll(x, shift):
    return np.roll(x, shift, axis=(1, 2))


@pytest.mark.parametrize("position", ["none", "relative"])
def test_translation_is_only_seen_with_positions(position):
    # Plain attention is permutation equivariant: a circular translation of the input translates
    # the output. Relative logits see where keys are relative to the query, so they do not.
    x = _normal((1, 6, 5, 4))
    layer = A.SelfAttention2D(8, 4, 2, position=position)
    variables = _init(layer, x)
    shifted = np.asarray(layer.apply(variables, _roll(x, (2, 1))))
    moved_output = _roll(np.asarray(layer.apply(variables, x)), (2, 1))
    equal = np.allclose(shifted, moved_output, rtol=1e-5, atol=1e-5)
    assert equal == (position == "none")


@pytest.mark.parametrize("position", A.POSITIONS)
def test_bfloat16_layer(position):
    x = _normal((2, 5, 4, 3))
    layer32 = A.AugmentedConv(8, 3, dk=4, dv=4, num_heads=2, position=position)
    layer16 = A.AugmentedConv(8, 3, dk=4, dv=4, num_heads=2, position=position, dtype=jnp.bfloat16)
    variables = _init(layer32, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_init(layer16, x)))
    y16 = layer16.apply(variables, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), layer32.apply(variables, x), atol=0.1, rtol=0.05)


def test_layer_under_jit_and_grad():
    x = _normal((2, 4, 4, 3))
    layer = A.AugmentedConv(8, 3, dk=4, dv=4, num_heads=2)
    variables = _init(layer, x)
    loss = lambda v: jnp.sum(layer.apply(v, x) ** 2)
    grads = jax.jit(jax.grad(loss))(variables)
    chex.assert_tree_all_finite(grads)
    assert np.abs(np.asarray(grads["params"]["attention"]["rel_h"])).sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dk=10, dv=8, num_heads=4), "num_heads=4 must divide dk=10"),
        (dict(dk=8, dv=6, num_heads=4), "num_heads=4 must divide dv=6"),
        (dict(dk=0, dv=4, num_heads=4), "dk=0 must be >= 1"),
        (dict(dk=8, dv=4, num_heads=0), "num_heads=0 must be >= 1"),
        (dict(dk=8, dv=16, num_heads=4), "dv=16 must be <= features=12"),
        (dict(dk=8, dv=4, num_heads=4, position="learned"), "position='learned' must be one of"),
        (dict(dk=8, dv=4, num_heads=4, kernel_size=(3, 3, 3)), "kernel_size="),
        (dict(dk=8, dv=4, num_heads=4, strides=0), "strides=0"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, message):
    kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        A.AugmentedConv(12, **kwargs)


@pytest.mark.parametrize(
    "layer",
    [
        A.SelfAttention2D(4, 4, 2),
        A.AugmentedConv(8, 3, dk=4, dv=4, num_heads=2),
        A.SqueezeExcite(),
        A.GatherExcite(),
    ],
)
def test_non_4d_input_is_rejected(layer):
    with pytest.raises(ValueError, match="4-D NHWC input"):
        layer.init(jax.random.key(0), jnp.ones((4, 4, 3)))


@pytest.mark.parametrize(
    ("features", "kwargs", "want"),
    [
        (160, dict(min_key_depth_per_head=20), (160, 16)),  # WRN-28-10 stage 1: dk raised to 8 * 20
        (640, dict(min_key_depth_per_head=20), (160, 64)),  # WRN-28-10 stage 3
        (256, {}, (48, 24)),  # 51.2 -> 48, 25.6 -> 24 (nearest multiple of 8)
        (64, {}, (16, 8)),  # 12.8 -> 16, 6.4 -> 8
        (16, dict(upsilon=1.0), (8, 16)),  # fully attentional
        (4, dict(num_heads=4), (4, 4)),  # at least one channel per head
    ],
)
def test_attention_depths(features, kwargs, want):
    assert A.attention_depths(features, **kwargs) == want


def test_attention_depths_rejects_bad_ratios():
    with pytest.raises(ValueError, match="kappa=0"):
        A.attention_depths(64, kappa=0)
    with pytest.raises(ValueError, match="num_heads=8 must be <= features=4"):
        A.attention_depths(4)


def test_squeeze_excite_matches_formula():
    x = _normal((2, 3, 5, 32))
    layer = A.SqueezeExcite(reduction=8)
    variables = _init(layer, x)
    p = variables["params"]
    squeezed = x.mean(axis=(1, 2))
    hidden = np.maximum(squeezed @ p["reduce"]["kernel"] + p["reduce"]["bias"], 0)
    gate = 1 / (1 + np.exp(-(hidden @ p["expand"]["kernel"] + p["expand"]["bias"])))
    assert p["reduce"]["kernel"].shape == (32, 4)
    np.testing.assert_allclose(layer.apply(variables, x), x * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


def test_gather_excite_global_and_local_extent():
    x = _normal((2, 4, 6, 3))
    glob = A.GatherExcite().apply({}, x)
    np.testing.assert_allclose(glob, x / (1 + np.exp(-x.mean(axis=(1, 2), keepdims=True))), rtol=1e-5)
    local = np.asarray(A.GatherExcite(extent=2).apply({}, x))
    blocks = x.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4))  # 2x2 cells
    gathered = blocks.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(local, x / (1 + np.exp(-gathered)), rtol=1e-5)
    assert A.GatherExcite().init(jax.random.key(0), x) == {}


@pytest.mark.parametrize(
    ("size", "window"), [((7, 5), (3, 2)), ((6, 6), (4, 4)), ((5, 9), (2, 3)), ((3, 3), (1, 1))]
)
def test_mean_pool_and_local_gather_excite_at_any_size(size, window):
    x = _normal((2, *size, 3))
    pooled, (top, left) = mean_pool_ref(x, window)
    np.testing.assert_allclose(F.mean_pool(jnp.asarray(x), window), pooled, rtol=1e-5, atol=1e-6)
    if window[0] == window[1]:  # gather-excite: each pixel gated by the mean of its own cell
        gathered = np.zeros_like(x)
        for r in range(size[0]):
            for c in range(size[1]):
                gathered[:, r, c] = pooled[:, (r + top) // window[0], (c + left) // window[1]]
        got = A.GatherExcite(extent=window[0]).apply({}, x)
        np.testing.assert_allclose(got, x / (1 + np.exp(-gathered)), rtol=1e-5, atol=1e-6)


def test_kernel_init_reaches_the_convolution_branch():
    layer = A.AugmentedConv(8, 3, dk=4, dv=4, num_heads=2, kernel_init=jax.nn.initializers.ones)
    params = _init(layer, _normal((1, 4, 4, 3)))["params"]
    np.testing.assert_array_equal(params["conv"]["kernel"], np.ones((3, 3, 3, 4)))
    assert not np.all(params["attention"]["qkv"]["kernel"] == 1)
