"""NNX twins against the linen layers and the brute-force reference: outputs, gradients, maps, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import aacn_jax as A
from aacn_jax import models
from aacn_jax import nnx as ann
from tests.reference import attention_weights_ref, conv1x1_ref, layer_self_attention_ref


def _normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _perturbed(tree, seed):
    """Different values of the same structure, so a conversion that drops a leaf shows."""
    leaves, treedef = jax.tree.flatten(tree)
    noise = [0.1 * _normal(np.shape(leaf), seed + i) for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(treedef, [leaf + n for leaf, n in zip(leaves, noise, strict=True)])


# (linen layer, NNX layer, input shape [B, H, W, C] the layers are built for)
LAYER_PAIRS = {
    "attention_relative": (
        A.SelfAttention2D(8, 4, 2),
        lambda rngs: ann.SelfAttention2D(3, 8, 4, 2, input_size=(5, 4), rngs=rngs),
        (2, 5, 4, 3),
    ),
    "attention_sinusoidal": (
        A.SelfAttention2D(8, 6, 2, position="sinusoidal", sinusoidal_channels=8),
        lambda rngs: ann.SelfAttention2D(3, 8, 6, 2, position="sinusoidal", sinusoidal_channels=8, rngs=rngs),
        (2, 4, 4, 3),
    ),
    "attention_coordconv": (
        A.SelfAttention2D(4, 4, 1, position="coordconv"),
        lambda rngs: ann.SelfAttention2D(3, 4, 4, 1, position="coordconv", rngs=rngs),
        (1, 3, 5, 3),
    ),
    "augmented_strided": (
        A.AugmentedConv(10, 3, 2, dk=4, dv=4, num_heads=2),
        lambda rngs: ann.AugmentedConv(3, 10, 3, 2, dk=4, dv=4, num_heads=2, input_size=(7, 5), rngs=rngs),
        (2, 7, 5, 3),
    ),
    "augmented_fully_attentional_none": (
        A.AugmentedConv(6, 3, dk=6, dv=6, num_heads=3, position="none", use_bias=True),
        lambda rngs: ann.AugmentedConv(
            4, 6, 3, dk=6, dv=6, num_heads=3, position="none", use_bias=True, rngs=rngs
        ),
        (2, 4, 3, 4),
    ),
    "squeeze_excite": (
        A.SqueezeExcite(reduction=4),
        lambda rngs: ann.SqueezeExcite(8, reduction=4, rngs=rngs),
        (2, 3, 5, 8),
    ),
    "gather_excite_local": (A.GatherExcite(extent=2), lambda rngs: ann.GatherExcite(extent=2), (2, 5, 4, 3)),
}


def _value_and_grads_linen(layer, variables, x):
    def loss(params, x):
        return jnp.sum(jnp.sin(layer.apply({**variables, "params": params}, x)))

    y = layer.apply(variables, x)
    return y, jax.grad(loss, argnums=(0, 1))(variables.get("params", {}), x)


def _value_and_grads_nnx(model, x):
    def loss(model, x):
        return jnp.sum(jnp.sin(model(x)))

    param_grads, x_grad = nnx.grad(loss, argnums=(0, 1))(model, x)
    return model(x), (nnx.to_pure_dict(param_grads), x_grad)


@pytest.mark.parametrize("name", list(LAYER_PAIRS))
@pytest.mark.parametrize("direction", ["linen_to_nnx", "nnx_to_linen"])
def test_converted_layers_give_equal_outputs_and_gradients(name, direction):
    linen_layer, make_nnx, shape = LAYER_PAIRS[name]
    x = jnp.asarray(_normal(shape, seed=1))
    model = make_nnx(nnx.Rngs(0))
    variables = dict(linen_layer.init(jax.random.key(2), x))
    # Same names and shapes: the NNX layer's variables are what linen's init gives.
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)
    assert shapes(ann.linen_variables(model)) == shapes(variables)
    if direction == "linen_to_nnx":
        variables = _perturbed(variables, seed=3)
        ann.load_linen_variables(model, variables)
    else:
        variables = ann.linen_variables(model)
    y_linen, grads_linen = _value_and_grads_linen(linen_layer, variables, x)
    y_nnx, grads_nnx = _value_and_grads_nnx(model, x)
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(grads_nnx, grads_linen, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(3, 2), (5, 4), (8, 7)])
def test_nnx_attention_matches_the_reference_at_smaller_equal_and_larger_sizes(size):
    """Tables sized for 5x4; a 3x2 map uses their centre, an 8x7 map their interpolation (as linen)."""
    model = ann.SelfAttention2D(3, 8, 4, 2, input_size=(5, 4), rngs=nnx.Rngs(0))
    x = _normal((2, *size, 3), seed=4)
    linen_layer = A.SelfAttention2D(8, 4, 2)
    variables = ann.linen_variables(model)
    np.testing.assert_allclose(model(x), linen_layer.apply(variables, x), rtol=1e-6, atol=1e-6)
    if size == (5, 4):  # the tables' own size: the paper's equations, unresized
        want = layer_self_attention_ref(x, variables["params"], 8, 4, 2)
        np.testing.assert_allclose(model(x), want, rtol=2e-5, atol=2e-5)


def test_captured_attention_maps_equal_linens_and_leave_nothing_behind():
    linen_layer, make_nnx, shape = LAYER_PAIRS["augmented_strided"]
    x = jnp.asarray(_normal(shape, seed=5))
    model = make_nnx(nnx.Rngs(0))
    variables = ann.linen_variables(model)
    y_linen, state = linen_layer.apply(variables, x, mutable=["attention_weights"])
    before = nnx.state(model)
    y_nnx, weights = ann.capture_attention_weights(model, x)
    assert list(weights) == [("attention",)]
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        weights[("attention",)], state["attention_weights"]["attention"]["weights"][0], rtol=1e-6, atol=1e-7
    )
    assert weights[("attention",)].shape == (2, 2, 4, 3, 4, 3)
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(before)
    model(x)  # an ordinary call stores nothing
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(before)


def test_capture_inside_nnx_jit_and_on_a_model_without_attention():
    model = ann.SelfAttention2D(3, 4, 4, 2, input_size=4, rngs=nnx.Rngs(0))
    x = _normal((1, 4, 4, 3))
    _, weights = nnx.jit(ann.capture_attention_weights)(model, x)
    params = ann.linen_variables(model)["params"]
    qkv = conv1x1_ref(x, params["qkv"])  # the paper's maps from the layer's own parameters
    q, k = qkv[..., :4].reshape(1, 4, 4, 2, 2), qkv[..., 4:8].reshape(1, 4, 4, 2, 2)
    want = attention_weights_ref(q, k, params["rel_h"], params["rel_w"])
    np.testing.assert_allclose(weights[()], want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"holds no aacn_jax\.nnx\.SelfAttention2D"):
        ann.capture_attention_weights(ann.GatherExcite(), x)


@pytest.mark.parametrize(
    ("linen_kwargs", "nnx_kwargs"),
    [
        (dict(dk=6, dv=4, num_heads=4), dict(in_features=3, dk=6, dv=4, num_heads=4)),
        (dict(dk=0, dv=4, num_heads=1), dict(in_features=3, dk=0, dv=4, num_heads=1)),
        (
            dict(dk=4, dv=4, num_heads=2, position="learned"),
            dict(in_features=3, dk=4, dv=4, num_heads=2, position="learned"),
        ),
    ],
)
def test_bad_attention_configurations_raise_the_linen_message(linen_kwargs, nnx_kwargs):
    with pytest.raises(ValueError) as linen_error:
        A.SelfAttention2D(**linen_kwargs)
    with pytest.raises(ValueError) as nnx_error:
        ann.SelfAttention2D(**nnx_kwargs, input_size=4, rngs=nnx.Rngs(0))
    assert str(nnx_error.value) == str(linen_error.value)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda r: ann.SelfAttention2D(3, 4, 4, 2, rngs=r), r"input_size=None: position='relative'"),
        (
            lambda r: ann.AugmentedConv(3, 4, 3, dk=4, dv=8, num_heads=2, input_size=4, rngs=r),
            "dv=8 must be <= features=4",
        ),
        (lambda r: ann.AugmentedConv(3, 8, 3, 0, dk=4, dv=4, num_heads=2, input_size=4, rngs=r), "strides=0"),
        (lambda r: ann.SqueezeExcite(8, reduction=0, rngs=r), "reduction=0 must be >= 1"),
        (lambda r: ann.GatherExcite(extent=0), "extent=0 must be >= 1"),
    ],
)
def test_bad_nnx_arguments_name_the_argument(build, message):
    with pytest.raises(ValueError, match=message):
        build(nnx.Rngs(0))


def test_wrong_input_channels_and_rank_are_one_line_errors():
    model = ann.AugmentedConv(3, 8, 3, dk=4, dv=4, num_heads=2, input_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"built for in_features=3 channels, got x.shape=\(1, 4, 4, 5\)"):
        model(jnp.ones((1, 4, 4, 5)))
    with pytest.raises(ValueError, match="expects a 4-D NHWC input"):
        model(jnp.ones((4, 4, 3)))


def test_loading_mismatched_variables_names_the_difference_and_changes_nothing():
    model = ann.SelfAttention2D(3, 8, 4, 2, input_size=(5, 4), rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, ann.linen_variables(model))
    other_size = A.SelfAttention2D(8, 4, 2).init(jax.random.key(0), jnp.ones((1, 6, 4, 3)))
    message = r"params/rel_h is float32\[11, 4\] in the linen variables but float32\[9, 4\]"
    with pytest.raises(ValueError, match=message):
        ann.load_linen_variables(model, other_size)
    no_tables = A.SelfAttention2D(8, 4, 2, position="none").init(jax.random.key(0), jnp.ones((1, 5, 4, 3)))
    with pytest.raises(ValueError, match=r"missing \['rel_h', 'rel_w'\], unexpected \[\]"):
        ann.load_linen_variables(model, no_tables)
    with pytest.raises(ValueError, match=r"unknown collection\(s\) \['cache'\]"):
        ann.load_linen_variables(model, {"params": before["params"], "cache": {}})
    chex.assert_trees_all_equal(ann.linen_variables(model), before)


def test_an_nnx_model_built_from_the_layers_trains_with_nnx_jit():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.augmented = ann.AugmentedConv(3, 8, 3, dk=4, dv=4, num_heads=2, input_size=6, rngs=rngs)
            self.excite = ann.SqueezeExcite(8, reduction=2, rngs=rngs)
            self.head = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.mean(jax.nn.relu(self.excite(self.augmented(x))), axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    x = jnp.asarray(_normal((8, 6, 6, 3), seed=6))
    labels = jnp.arange(8) % 2

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.2 * losses[0]


def test_create_nnx_checks_its_arguments_before_building():
    with pytest.raises(ValueError, match="unknown model name='aa_resnet_5'"):
        models.create("aa_resnet_5", num_classes=10, api="nnx", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"api='jax' must be one of \('linen', 'nnx'\)"):
        models.create("resnet18", num_classes=10, api="jax")
    with pytest.raises(ValueError, match=r"api='nnx' needs rngs=nnx.Rngs\(seed\)"):
        models.create("resnet18", num_classes=10, api="nnx")
    with pytest.raises(ValueError, match="rngs and input_shape are for api='nnx'"):
        models.create("resnet18", num_classes=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"input_shape=\(32, 32\) must be \(H, W, C\)"):
        models.create("resnet18", num_classes=10, api="nnx", rngs=nnx.Rngs(0), input_shape=(32, 32))


def _linen_step(module, variables, x, labels):
    def loss_fn(params):
        logits, updates = module.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)

    grads, (logits, updates) = jax.grad(loss_fn, has_aux=True)(variables["params"])
    return logits, grads, updates["batch_stats"]


@nnx.jit
def _nnx_step(model, x, labels):
    def loss_fn(model):
        logits = model(x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    grads, logits = nnx.grad(loss_fn, has_aux=True)(model)
    return logits, grads


def _random_variables(module, shape, seed):
    """Random linen variables of ``module`` (positive variances), without running its init."""
    example = jnp.zeros((1, *shape))
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), example, train=False))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(dict(abstract))
    values = []
    for i, (path, leaf) in enumerate(leaves):
        noise = 0.05 * _normal(leaf.shape, seed + i)
        values.append(1 + np.abs(noise) if path[-1].key == "var" else noise)
    return jax.tree.unflatten(treedef, values)


# Each family of the zoo at a smaller depth and width: the same modules and names, built faster.
@pytest.mark.parametrize(
    ("name", "size", "weights", "overrides"),
    [
        ("aa_resnet_cifar", 32, "initialised", dict(depth=8)),
        ("aa_wrn28_10", 32, "given", dict(depth=10, widen_factor=2)),
        ("aa_resnet50", 64, "given", dict(stage_sizes=(1, 2, 1, 1), width=16)),
    ],
)
def test_zoo_model_in_nnx_equals_linen_in_training_and_inference(name, size, weights, overrides):
    shape = (size, size, 3)
    if weights == "initialised":  # models.create's own initialisation, then other values loaded
        model = models.create(
            name, num_classes=10, api="nnx", rngs=nnx.Rngs(0), input_shape=shape, **overrides
        )
        variables = _perturbed(ann.linen_variables(model), seed=7)
        ann.load_linen_variables(model, variables)
    else:  # built abstractly around given variables (much faster than initialising)
        linen_model = models.create(name, num_classes=10, **overrides)
        variables = _random_variables(linen_model, shape, seed=7)
        model = ann.ZooModel(linen_model, input_shape=shape, rngs=nnx.Rngs(0), variables=variables)
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    labels = jnp.array([1, 7])
    linen_step = jax.jit(_linen_step, static_argnums=0)
    logits, grads, batch_stats = linen_step(model.linen_module, variables, x, labels)
    nnx_logits, nnx_grads = _nnx_step(model, x, labels)
    np.testing.assert_allclose(nnx_logits, logits, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(nnx.to_pure_dict(nnx_grads)["bridged"], grads, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(ann.linen_variables(model)["batch_stats"], batch_stats, rtol=1e-5, atol=1e-6)
    model.eval()  # inference: running statistics, nothing updated
    after = ann.linen_variables(model)
    inference = jax.jit(model.linen_module.apply, static_argnames="train")(after, x, train=False)
    scale = float(np.abs(inference).max())  # perturbed weights and stale statistics: logits can be huge
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), inference, rtol=1e-5, atol=1e-5 * scale)
    chex.assert_trees_all_equal(ann.linen_variables(model), after)


def test_zoo_model_built_from_given_variables_without_initialising():
    linen_model = models.create("aa_wrn28_10", num_classes=3, depth=10, widen_factor=1, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = _perturbed(dict(linen_model.init(jax.random.key(1), x, train=False)), seed=8)
    model = ann.ZooModel(linen_model, input_shape=(8, 8, 3), rngs=nnx.Rngs(0), variables=variables)
    chex.assert_trees_all_equal(ann.linen_variables(model), variables)
    model.eval()
    np.testing.assert_allclose(model(x), linen_model.apply(variables, x, train=False), rtol=1e-5, atol=1e-5)
    model.train()  # dropout draws concrete keys from rngs: two training calls differ
    assert not np.allclose(model(x), model(x))
