"""Attention probabilities: ``functional.attention_weights`` against the float64 reference, and the
``attention_weights`` collection that SelfAttention2D fills when it is mutable."""

from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aacn_jax as A
from aacn_jax import functional as F
from aacn_jax import models
from tests.reference import attention_weights_ref, conv1x1_ref, self_attention_2d_ref


def _normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _zeros(shape):
    return np.zeros(shape, np.float32)


def _inputs(shape, relative, seed=0):
    rng = np.random.default_rng(seed)
    _, height, width, _, depth = shape
    q, k = _normal(rng, shape), _normal(rng, shape)
    tables = (_normal(rng, (2 * height - 1, depth)), _normal(rng, (2 * width - 1, depth)))
    return q, k, tables if relative else (None, None)


SHAPES = [(2, 3, 5, 2, 4), (1, 4, 1, 3, 2), (1, 1, 1, 1, 3), (1, 2, 6, 1, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relative", [True, False])
def test_matches_reference(shape, relative):
    q, k, (rel_h, rel_w) = _inputs(shape, relative)
    got = F.attention_weights(q, k, rel_h, rel_w)
    assert got.shape == (shape[0], shape[3], *shape[1:3], *shape[1:3])
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, attention_weights_ref(q, k, rel_h, rel_w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["dense", "blockwise", "fused"])
def test_weights_applied_to_values_give_self_attention(implementation):
    shape = (2, 4, 3, 2, 4)
    q, k, (rel_h, rel_w) = _inputs(shape, relative=True)
    v = _normal(np.random.default_rng(1), (*shape[:4], 3))
    weights = F.attention_weights(q, k, rel_h, rel_w)
    mixed = jnp.einsum("bnxyzw,bzwne->bxyne", weights, v)
    want = F.self_attention_2d(q, k, v, rel_h, rel_w, implementation=implementation, block_size=1)
    np.testing.assert_allclose(mixed, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed, self_attention_2d_ref(q, k, v, rel_h, rel_w), rtol=1e-5, atol=1e-5)


def test_relative_tables_change_the_weights_and_each_row_is_a_distribution():
    q, k, (rel_h, rel_w) = _inputs((1, 3, 4, 2, 4), relative=True)
    with_tables, without = F.attention_weights(q, k, rel_h, rel_w), F.attention_weights(q, k)
    np.testing.assert_allclose(with_tables.sum(axis=(-2, -1)), 1.0, rtol=1e-6)
    assert np.all(with_tables >= 0)
    assert np.abs(with_tables - without).max() > 1e-2


def test_bfloat16_inputs_give_float32_probabilities():
    q, k, (rel_h, rel_w) = _inputs((1, 3, 3, 2, 4), relative=True)
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, rel_h, rel_w)]
    got = F.attention_weights(*bf16)
    assert got.dtype == jnp.float32
    want = attention_weights_ref(*[np.asarray(a, np.float32) for a in bf16])
    np.testing.assert_allclose(got, want, atol=2e-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(q=_zeros((1, 2, 2, 1, 3)), k=_zeros((1, 2, 2, 1, 4))), "k.shape=(1, 2, 2, 1, 4)"),
        (dict(q=_zeros((2, 2, 1, 3)), k=_zeros((2, 2, 1, 3))), "q.shape=(2, 2, 1, 3)"),
        (
            dict(q=_zeros((1, 2, 2, 1, 3)), k=_zeros((1, 2, 2, 1, 3)), rel_h=_zeros((3, 3))),
            "rel_h and rel_w",
        ),
        (
            dict(
                q=_zeros((1, 2, 2, 1, 3)),
                k=_zeros((1, 2, 2, 1, 3)),
                rel_h=_zeros((3, 3)),
                rel_w=_zeros((2, 3)),
            ),
            "rel_w.shape=(2, 3)",
        ),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        F.attention_weights(**kwargs)


# ----------------------------------------------------------------------------------------------
# The "attention_weights" collection of SelfAttention2D
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["relative", "none", "coordconv"])
def test_layer_weights_reproduce_the_layer_output(position):
    dk, dv, heads = 8, 6, 2
    x = _normal(np.random.default_rng(0), (2, 3, 4, 5))
    layer = A.SelfAttention2D(dk, dv, heads, position=position)
    variables = layer.init(jax.random.key(0), x)
    y, state = layer.apply(variables, x, mutable=["attention_weights"])
    (weights,) = state["attention_weights"]["weights"]
    assert weights.shape == (2, heads, 3, 4, 3, 4)
    params = variables["params"]
    layer_input = (
        x
        if position != "coordconv"
        else np.concatenate([x, np.broadcast_to(F.coordinate_channels(3, 4), (2, 3, 4, 2))], axis=-1)
    )
    qkv = conv1x1_ref(layer_input, params["qkv"])
    q, k, v = (qkv[..., :dk], qkv[..., dk : 2 * dk], qkv[..., 2 * dk :])
    q, k = q.reshape(2, 3, 4, heads, dk // heads), k.reshape(2, 3, 4, heads, dk // heads)
    tables = (params["rel_h"], params["rel_w"]) if position == "relative" else (None, None)
    np.testing.assert_allclose(weights, attention_weights_ref(q, k, *tables), rtol=1e-4, atol=1e-6)
    # weights @ v, heads concatenated, then W^O: the layer's output.
    v = v.reshape(2, 3, 4, heads, dv // heads)
    mixed = np.einsum("bnxyzw,bzwne->bxyne", np.asarray(weights, np.float64), v).reshape(2, 3, 4, dv)
    np.testing.assert_allclose(y, conv1x1_ref(mixed, params["out"]), rtol=1e-4, atol=1e-5)


def test_collection_is_opt_in_and_leaves_outputs_and_parameters_unchanged():
    x = _normal(np.random.default_rng(0), (1, 4, 4, 3))
    layer = A.AugmentedConv(8, 3, dk=4, dv=4, num_heads=2)
    variables = layer.init(jax.random.key(0), x)
    assert set(variables) == {"params"}  # init sows nothing
    y = layer.apply(variables, x)
    assert isinstance(y, jax.Array)
    y_sown, state = layer.apply(variables, x, mutable=["attention_weights"])
    np.testing.assert_array_equal(y_sown, y)
    assert jax.tree.structure(state) == jax.tree.structure(
        {"attention_weights": {"attention": {"weights": (0,)}}}
    )


def test_model_collects_one_map_per_augmented_layer_under_jit():
    model = models.create("aa_resnet_cifar", num_classes=3, depth=8, width=8)
    x = _normal(np.random.default_rng(0), (1, 8, 8, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    assert "attention_weights" not in variables

    @jax.jit
    def forward(variables, x):
        return model.apply(variables, x, train=False, mutable=["attention_weights"])

    logits, state = forward(variables, x)
    np.testing.assert_allclose(logits, model.apply(variables, x, train=False), rtol=1e-6, atol=1e-6)
    flat = flax.traverse_util.flatten_dict(state["attention_weights"], sep="/")
    sizes = {name: w.shape for name, (w,) in flat.items()}
    # depth 8: one block per stage, its conv1 augmented; stages 2 and 3 attend at the strided size.
    assert sizes == {
        "stage1/block1/conv1/attention/weights": (1, 4, 8, 8, 8, 8),
        "stage2/block1/conv1/attention/weights": (1, 4, 4, 4, 4, 4),
        "stage3/block1/conv1/attention/weights": (1, 4, 2, 2, 2, 2),
    }
