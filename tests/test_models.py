"""Model zoo: the paper's parameter counts, placement of the augmented layers, overrides, summary.

ImageNet-size models are only traced (``jax.eval_shape``); real forward and backward passes run
on the small CIFAR models and on reduced versions of the big ones (fewer blocks, narrower, tiny
images), so the module stays fast on a 2-core CPU.
"""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from aacn_jax import models
from aacn_jax.layers import AugmentedConv

# ---------------------------------------------------------------------------------------------
# helpers


def _abstract(name, overrides=(), input_shape=None):
    """(model, abstract variables) of a registered model at its reference input size and class count."""
    return _traced_init(name, overrides, input_shape)  # one cache entry however it is called


@functools.cache
def _traced_init(name, overrides, input_shape):
    entry = models.get_entry(name)
    model = models.create(name, num_classes=entry.num_classes, **dict(overrides))
    x = jax.ShapeDtypeStruct((1, *(input_shape or entry.input_shape)), jnp.float32)
    return model, jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _flat_params(name, **overrides):
    return traverse_util.flatten_dict(_abstract(name, tuple(sorted(overrides.items())))[1]["params"])


def _augmented_layers(flat):
    """Paths of the AugmentedConv layers: the modules holding an ``attention`` submodule."""
    return {key[: key.index("attention")] for key in flat if "attention" in key}


def _loss_and_grads(model, variables, x, labels):
    def loss_fn(params):
        logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        if isinstance(logits, tuple):  # a detector's (class logits, box deltas): any scalar of both
            loss = sum(jnp.mean(jnp.square(output)) for output in logits)
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates)

    return jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ---------------------------------------------------------------------------------------------
# registry

REQUIRED = [
    *[f"{prefix}resnet{d}" for prefix in ("", "aa_") for d in (18, 26, 34, 50, 101, 152)],
    "se_resnet50",
    "ge_resnet50",
    "fa_resnet50",
    "wrn28_10",
    "aa_wrn28_10",
    "se_wrn28_10",
    "ge_wrn28_10",
    "resnet_cifar",
    "aa_resnet_cifar",
    *[f"{prefix}retinanet_resnet{d}" for prefix in ("", "aa_") for d in (50, 101)],
]


def test_list_models_has_every_required_name():
    names = models.list_models()
    assert set(REQUIRED) <= set(names)
    assert names == sorted(names)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"aa_resnet5'.*'aa_resnet50'"):
        models.create("aa_resnet5", num_classes=10)
    with pytest.raises(ValueError, match="wrn28_10"):
        models.create("wrn_28_10", num_classes=10)


def test_unknown_override_names_the_key_and_the_accepted_ones():
    with pytest.raises(ValueError, match=r"\['kapa'\].*accepted overrides: .*'kappa'"):
        models.create("aa_resnet50", num_classes=10, kapa=0.3)
    with pytest.raises(ValueError, match=r"\['widen'\].*'depth'"):  # the factory's own keys are listed too
        models.create("resnet_cifar", num_classes=10, widen=2)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("resnet_cifar", dict(depth=21), "depth=21"),
        ("aa_wrn28_10", dict(depth=27), "depth=27"),
        ("aa_resnet50", dict(attention_position="learned"), "attention_position='learned'"),
        ("aa_resnet50", dict(attention_implementation="flash"), "attention_implementation='flash'"),
        ("aa_resnet50", dict(augmented_stages=(5,)), "augmented_stages"),
        ("aa_resnet50", dict(augmented_convs=("conv1",)), "augmented_convs"),
        ("aa_resnet34", dict(kappa=0.0), "kappa=0.0"),
        ("aa_resnet34", dict(num_heads=256), "num_heads=256"),
        ("resnet50", dict(excite="cbam"), "excite='cbam'"),
        ("resnet50", dict(stem="vit"), "stem='vit'"),
        ("resnet_cifar", dict(stage_widths=(16, 32)), r"stage_widths=\(16, 32\).*3 stages"),
        ("resnet_cifar", dict(stage_widths=(16, 0, 64)), "stage_widths"),
    ],
)
def test_bad_override_values_raise_at_create(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        models.create(name, num_classes=10, **overrides)


def test_stage_widths_set_the_channels_of_each_stage():
    """Every convolution of stage i has stage_widths[i] outputs (augmented ones: conv + attention)."""
    module = models.create(
        "aa_resnet_cifar", num_classes=2, depth=8, stage_widths=(12, 36, 68), augmented_stages=(3,)
    )
    init = lambda: module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    params = traverse_util.flatten_dict(jax.eval_shape(init)["params"])
    flat = {k[:-1]: v.shape for k, v in params.items() if k[-1] == "kernel"}
    assert flat[("stem", "conv")] == (3, 3, 3, 16)  # the stem keeps ``width``
    assert flat[("stage1", "block1", "conv2")] == (3, 3, 12, 12)
    assert flat[("stage2", "block1", "conv2")] == (3, 3, 36, 36)
    conv, out = (
        flat[("stage3", "block1", "conv1", "conv")],
        flat[("stage3", "block1", "conv1", "attention", "out")],
    )
    assert conv[:3] == (3, 3, 36) and conv[3] + out[3] == 68
    assert flat[("head", "fc")] == (68, 2)


def test_num_classes_must_be_positive():
    with pytest.raises(ValueError, match="num_classes=0"):
        models.create("resnet_cifar", num_classes=0)


# ---------------------------------------------------------------------------------------------
# the paper's parameter counts (224x224 / 1000 classes for ImageNet, 32x32 / 100 for CIFAR-100)

PAPER_PARAMS_M = {
    "resnet34": 21.8,
    "aa_resnet34": 20.7,
    "resnet50": 25.6,
    "aa_resnet50": 25.8,
    "se_resnet50": 28.1,
    "resnet101": 44.5,
    "aa_resnet101": 45.4,
    "wrn28_10": 36.5,
    "aa_wrn28_10": 36.2,
    "se_wrn28_10": 36.5,
    "ge_wrn28_10": 36.3,
}


@pytest.mark.parametrize(("name", "paper"), sorted(PAPER_PARAMS_M.items()))
def test_parameter_count_matches_paper(name, paper):
    params = models.count_params(_abstract(name)[1]["params"])
    assert abs(params / 1e6 - paper) / paper < 0.015, f"{name}: {params / 1e6:.3f}M vs paper {paper}M"


def test_augmentation_changes_the_count_in_the_papers_direction():
    count = {name: models.count_params(_abstract(name)[1]["params"]) for name in PAPER_PARAMS_M}
    assert count["aa_resnet34"] < count["resnet34"]  # 21.8M -> 20.7M
    assert count["aa_resnet50"] > count["resnet50"]  # 25.6M -> 25.8M
    assert count["aa_resnet101"] > count["resnet101"]  # 44.5M -> 45.4M
    assert count["aa_wrn28_10"] < count["wrn28_10"]  # 36.5M -> 36.2M


@pytest.mark.parametrize(("ge", "plain"), [("ge_resnet50", "resnet50"), ("ge_wrn28_10", "wrn28_10")])
def test_gather_excite_variants_are_parameter_free(ge, plain):
    assert models.count_params(_abstract(ge)[1]["params"]) == models.count_params(
        _abstract(plain)[1]["params"]
    )


# ---------------------------------------------------------------------------------------------
# every registered model: init, forward and backward (traced at its reference size)

# Depth and width variants run the code of a shallower or narrower sibling: their backward pass
# (tracing it is the slow part, about 5x the forward's for an AA model: every attention layer's
# custom VJP on every platform branch) is traced on that sibling only, init and forward on their own.
BACKWARD_TRACED_ON = {
    **{f"{prefix}resnet34": f"{prefix}resnet18" for prefix in ("", "aa_")},
    **{f"{prefix}resnet{d}": f"{prefix}resnet26" for prefix in ("", "aa_") for d in (50, 101, 152)},
    **{
        f"{prefix}mnasnet_a1_{w}": f"{prefix}mnasnet_a1_075"
        for prefix in ("", "aa_")
        for w in (100, 125, 140)
    },
    **{f"{prefix}retinanet_resnet101": f"{prefix}retinanet_resnet50" for prefix in ("", "aa_")},
}
SIZE_FIELDS = ("stage_sizes", "width")  # the fields in which a variant may differ from its sibling


def _architecture(module):
    """A module's fields (nested modules as their fields), less ``SIZE_FIELDS``."""
    skip = ("parent", "name", *SIZE_FIELDS)
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in skip}
    return {key: _architecture(v) if isinstance(v, nn.Module) else v for key, v in fields.items()}


@pytest.mark.parametrize(("variant", "sibling"), sorted(BACKWARD_TRACED_ON.items()))
def test_variants_differ_from_their_backward_traced_sibling_only_in_size(variant, sibling):
    assert variant in models.list_models() and sibling not in BACKWARD_TRACED_ON
    build = lambda name: models.create(name, num_classes=models.get_entry(name).num_classes)
    assert _architecture(build(variant)) == _architecture(build(sibling))
    assert models.get_entry(variant).input_shape == models.get_entry(sibling).input_shape


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_inits_and_runs_forward_and_backward_abstractly(name):
    model, variables = _abstract(name)
    entry = models.get_entry(name)
    x = jax.ShapeDtypeStruct((2, *entry.input_shape), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    if name in BACKWARD_TRACED_ON:
        forward = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
        logits, updates = jax.eval_shape(forward, variables, x)
    else:
        (loss, (logits, updates)), grads = jax.eval_shape(
            lambda v, x, y: _loss_and_grads(model, v, x, y), variables, x, labels
        )
        assert loss.shape == ()
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, variables["params"])
    if name.startswith(("retinanet_", "aa_retinanet_")):  # (class logits, box deltas) per anchor
        num_anchors = len(model.anchor_boxes(entry.input_shape[:2]))
        assert [(o.shape, o.dtype) for o in logits] == [
            ((2, num_anchors, entry.num_classes), jnp.float32),
            ((2, num_anchors, 4), jnp.float32),
        ]
    else:
        assert logits.shape == (2, entry.num_classes) and logits.dtype == jnp.float32
    chex.assert_trees_all_equal_structs(updates["batch_stats"], variables["batch_stats"])
    chex.assert_type(jax.tree.leaves(variables), jnp.float32)


# Reduced versions (fewer blocks, narrower, tiny images) run for real. Together they cover both
# stems, basic, bottleneck and pre-activation blocks, strided augmented convolutions, the fully
# attentional layer, SE and GE (compiling is what costs time on a CPU, so there are only three).
SMALL = [
    ("aa_resnet_cifar", dict(depth=8), (8, 8, 3)),
    # 64x64 so that stage 4 is 2x2: on a 1x1 map a relative table cannot receive a gradient. Without
    # zero-init, SE sees a non-zero branch from the first step (else its gradients start at 0).
    (
        "fa_resnet50",
        dict(stage_sizes=(1, 1, 1, 1), width=16, excite="se", zero_init_residual=False),
        (64, 64, 3),
    ),
    ("aa_wrn28_10", dict(depth=10, widen_factor=1, min_key_depth_per_head=2, excite="ge"), (16, 16, 3)),
]


@functools.cache
def _small(name, overrides, shape):
    """(model, variables) of a reduced model, initialised for real (jitted: eager init is slow)."""
    model = models.create(name, num_classes=5, **dict(overrides))
    # unsafe_rbg: the cheapest PRNG to compile; the distributions are the same initialisers.
    init = jax.jit(lambda x: model.init(jax.random.key(0, impl="unsafe_rbg"), x, train=False))
    return model, init(jnp.zeros((1, *shape), jnp.float32))


@pytest.mark.parametrize(("name", "overrides", "shape"), SMALL, ids=[s[0] for s in SMALL])
def test_small_models_train_on_a_fixed_batch(name, overrides, shape):
    """SGD steps on one batch lower the loss, gradients are finite, and every parameter (attention,
    SE, relative tables included) and every BatchNorm statistic moves: no branch is left unwired."""
    model, variables = _small(name, tuple(sorted(overrides.items())), shape)
    x, labels = _images((4, *shape)), jnp.arange(4) % 5
    tx = optax.sgd(0.05, momentum=0.9)

    @jax.jit
    def step(variables, opt_state):
        (loss, (_, updates)), grads = _loss_and_grads(model, variables, x, labels)
        delta, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], delta)
        return {"params": params, **updates}, opt_state, loss, grads

    opt_state = tx.init(variables["params"])
    trained, opt_state, first_loss, grads = step(variables, opt_state)
    chex.assert_tree_all_finite(grads)
    for _ in range(7):
        trained, opt_state, loss, _ = step(trained, opt_state)
    assert float(loss) < 0.7 * float(first_loss)
    moved = traverse_util.flatten_dict(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables, trained))
    assert [key for key, changed in moved.items() if not changed] == []
    if name.startswith(("aa_", "fa_")):
        assert any("attention" in key for key in moved)


# ---------------------------------------------------------------------------------------------
# placement of the augmented layers, as documented in resnet.py / wide_resnet.py


def _placement(stage_sizes, stages, convs):
    return {
        (f"stage{s}", f"block{b}", conv)
        for s in stages
        for b in range(1, stage_sizes[s - 1] + 1)
        for conv in convs
    }


BASIC, BOTTLENECK, FIRST = ("conv1", "conv2"), ("conv2",), ("conv1",)
WIDTHS = ("075", "100", "125", "140")  # MnasNet-A1's registered widths
PLACEMENT = {
    "aa_resnet18": _placement((2, 2, 2, 2), (2, 3, 4), BASIC),
    "aa_resnet34": _placement((3, 4, 6, 3), (2, 3, 4), BASIC),
    "aa_resnet26": _placement((1, 2, 4, 1), (3, 4), BOTTLENECK),
    "aa_resnet50": _placement((3, 4, 6, 3), (3, 4), BOTTLENECK),
    "fa_resnet50": _placement((3, 4, 6, 3), (3, 4), BOTTLENECK),
    "aa_resnet101": _placement((3, 4, 23, 3), (3, 4), BOTTLENECK),
    "aa_resnet152": _placement((3, 8, 36, 3), (3, 4), BOTTLENECK),
    "aa_wrn28_10": _placement((4, 4, 4), (1, 2, 3), FIRST),  # paper: first conv of every block
    "aa_resnet_cifar": _placement((3, 3, 3), (1, 2, 3), FIRST),
    # the 1x1 projection of every block from the first with 28x28 outputs on (mnasnet.py)
    **{
        f"aa_mnasnet_a1_{w}": _placement((1, 2, 3, 4, 2, 3, 1), (3, 4, 5, 6, 7), ("project",)) for w in WIDTHS
    },
}
PLACEMENT.update(  # a RetinaNet's backbone is its AA-ResNet under "backbone"
    {
        f"aa_retinanet_resnet{d}": {("backbone", *key) for key in PLACEMENT[f"aa_resnet{d}"]}
        for d in (18, 50, 101)
    }
)


@pytest.mark.parametrize("name", models.list_models())
def test_augmented_layers_are_where_documented(name):
    assert name.startswith(("aa_", "fa_")) == (name in PLACEMENT)
    assert _augmented_layers(_flat_params(name)) == PLACEMENT.get(name, set())


# (name, layer, Fin, Fout, dk, dv, heads, attention map side) from the paper's rules by hand:
# dk = max(round8(0.2 Fout), 20 * 8) with the key minimum, dv = round8(0.1 Fout).
DEPTHS = [
    ("aa_wrn28_10", ("stage1", "block1", "conv1"), 16, 160, 160, 16, 8, 32),
    ("aa_wrn28_10", ("stage3", "block1", "conv1"), 320, 640, 160, 64, 8, 8),  # strided: 16x16 pooled to 8x8
    ("aa_resnet50", ("stage3", "block1", "conv2"), 256, 256, 160, 24, 8, 14),
    ("aa_resnet50", ("stage4", "block3", "conv2"), 512, 512, 160, 48, 8, 7),
    ("aa_resnet34", ("stage2", "block1", "conv1"), 64, 128, 24, 16, 8, 28),  # no key minimum
    ("aa_resnet34", ("stage4", "block3", "conv2"), 512, 512, 104, 48, 8, 7),
    ("aa_resnet_cifar", ("stage1", "block1", "conv1"), 16, 16, 16, 4, 4, 32),  # 4 heads, >= 4 dims
    ("aa_resnet_cifar", ("stage3", "block2", "conv1"), 64, 64, 16, 8, 4, 8),
]


@pytest.mark.parametrize(("name", "layer", "fin", "fout", "dk", "dv", "heads", "side"), DEPTHS)
def test_augmented_layer_sizes(name, layer, fin, fout, dk, dv, heads, side):
    flat = _flat_params(name)
    assert flat[(*layer, "conv", "kernel")].shape == (3, 3, fin, fout - dv)
    assert flat[(*layer, "attention", "qkv", "kernel")].shape == (1, 1, fin, 2 * dk + dv)
    assert flat[(*layer, "attention", "out", "kernel")].shape == (1, 1, dv, dv)
    for table in ("rel_h", "rel_w"):  # shared across heads: one [2L - 1, dk / Nh] table per axis
        assert flat[(*layer, "attention", table)].shape == (2 * side - 1, dk // heads)


def test_fully_attentional_layers_have_no_spatial_convolution():
    flat = _flat_params("fa_resnet50")
    layers = _augmented_layers(flat)
    assert layers == PLACEMENT["aa_resnet50"]
    for layer in layers:
        inside = {key[len(layer) :]: leaf for key, leaf in flat.items() if key[: len(layer)] == layer}
        assert not any(key[0] == "conv" for key in inside)  # no convolution branch
        kernels = [leaf.shape for key, leaf in inside.items() if key[-1] == "kernel"]
        assert kernels and all(shape[:2] == (1, 1) for shape in kernels)
        features = 256 if layer[0] == "stage3" else 512
        assert inside[("attention", "out", "kernel")].shape == (1, 1, features, features)  # dv = Fout


def test_augmented_conv_output_feeds_the_blocks_batch_norm():
    """Paper: the augmented convolution is followed by BatchNorm (which weighs conv and attention)."""
    records = {"augmented": [], "bn_inputs": []}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            if isinstance(context.module, AugmentedConv):
                records["augmented"].append(out)
            elif isinstance(context.module, nn.BatchNorm):
                records["bn_inputs"].append(args[0])
        return out

    for name, overrides, shape in SMALL:
        model = models.create(name, num_classes=5, **overrides)
        with nn.intercept_methods(interceptor):
            jax.eval_shape(
                lambda x, model=model: model.init(jax.random.key(0), x, train=False), _images((1, *shape))
            )
    assert records["augmented"]
    for out in records["augmented"]:
        assert any(out is bn_input for bn_input in records["bn_inputs"])


# ---------------------------------------------------------------------------------------------
# overrides: each of the paper's ablations is one argument


@pytest.mark.parametrize(
    ("position", "extra"), [("relative", 0), ("none", 0), ("coordconv", 2), ("sinusoidal", 32)]
)
def test_attention_position_override(position, extra):
    flat = _flat_params("aa_resnet_cifar", attention_position=position)
    layers = _augmented_layers(flat)
    assert layers == PLACEMENT["aa_resnet_cifar"]
    tables = {key[:-2] for key in flat if key[-1] in ("rel_h", "rel_w")}
    assert tables == (layers if position == "relative" else set())
    qkv = flat[("stage2", "block2", "conv1", "attention", "qkv", "kernel")]
    assert qkv.shape[2] == 32 + extra  # absolute encodings are channels of the attention input


def test_num_heads_kappa_upsilon_and_key_minimum_overrides():
    layer = ("stage4", "block3", "conv2")

    def sizes(name, **overrides):
        flat = _flat_params(name, **overrides)
        return flat[(*layer, "attention", "qkv", "kernel")].shape[-1], flat[
            (*layer, "attention", "rel_h")
        ].shape[-1]

    assert sizes("aa_resnet34") == (2 * 104 + 48, 13)  # 8 heads: dk = 104, dv = 48
    assert sizes("aa_resnet34", num_heads=4) == (2 * 104 + 52, 26)  # 4 heads: dk = 104, dv = 52
    assert sizes("aa_resnet34", kappa=0.4, upsilon=0.2) == (2 * 208 + 104, 26)
    assert sizes("aa_resnet50") == (2 * 160 + 48, 20)  # at least 20 key dims per head
    assert sizes("aa_resnet50", min_key_depth_per_head=0) == (2 * 104 + 48, 13)


def test_augmented_stages_override():
    assert _augmented_layers(_flat_params("aa_resnet50", augmented_stages=(4,))) == _placement(
        (3, 4, 6, 3), (4,), BOTTLENECK
    )
    assert _augmented_layers(_flat_params("resnet50", augmented_stages=(4,))) == _placement(
        (3, 4, 6, 3), (4,), BOTTLENECK
    )


def test_last_batch_norm_of_each_residual_branch_starts_at_zero():
    params = _small("aa_resnet_cifar", (("depth", 8),), (8, 8, 3))[1]["params"]
    for stage in ("stage1", "stage2", "stage3"):
        block = params[stage]["block1"]
        np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)
        np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)  # zero_init_residual (Goyal et al.)


def test_attention_implementations_agree_inside_a_model():
    x = _images((2, 8, 8, 3))
    variables = _small("aa_resnet_cifar", (("depth", 8),), (8, 8, 3))[1]
    got = {}
    for implementation in ("dense", "blockwise", "fused"):
        model = models.create(
            "aa_resnet_cifar", num_classes=5, depth=8, attention_implementation=implementation
        )
        got[implementation] = jax.jit(lambda v, m=model: m.apply(v, x, train=False))(variables)
    np.testing.assert_allclose(got["blockwise"], got["dense"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["fused"], got["dense"], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_float32_params_and_logits():
    model = models.create("aa_resnet_cifar", num_classes=5, depth=8, dtype=jnp.bfloat16)
    x = _images((2, 8, 8, 3))
    variables = _small("aa_resnet_cifar", (("depth", 8),), (8, 8, 3))[1]
    chex.assert_type(jax.tree.leaves(variables), jnp.float32)
    forward = jax.jit(
        lambda v: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"])
    )
    logits, state = forward(variables)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    inter = state["intermediates"]
    for stage in ("stage1", "stage2", "stage3"):
        assert inter[stage]["__call__"][0].dtype == jnp.bfloat16
    assert inter["stage2"]["block1"]["conv1"]["attention"]["__call__"][0].dtype == jnp.bfloat16
    float32 = models.create("aa_resnet_cifar", num_classes=5, depth=8)
    reference = jax.jit(lambda v: float32.apply(v, x, train=False))(variables)
    np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.1)  # same function, lower precision
    # a dtype given by name (as from a config file) is accepted too
    by_name = models.create("aa_resnet_cifar", num_classes=5, depth=8, dtype="bfloat16")
    out = jax.eval_shape(lambda v: by_name.apply(v, x, train=False), variables)
    assert out.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# summary


def test_summary_counts_params_and_xla_flops_per_stage():
    result = models.summary("resnet_cifar", (8, 8, 3), depth=8)
    model, variables = _abstract("resnet_cifar", (("depth", 8),), (8, 8, 3))
    del model
    assert [s.name for s in result.stages] == ["stem", "stage1", "stage2", "stage3", "head"]
    assert result.params == models.count_params(variables["params"]) == sum(s.params for s in result.stages)
    assert [s.output_shape for s in result.stages][1:] == [
        (1, 8, 8, 16),
        (1, 4, 4, 32),
        (1, 2, 2, 64),
        (1, 10),
    ]
    # XLA counts a multiply-add as 2 FLOPs (the paper's convention): the head is pooling + a 64x10 Dense.
    head = result.stages[-1].flops
    assert 2 * 64 * 10 <= head <= 2 * 64 * 10 + 2 * 4 * 64 + 10
    # stage 3 is dominated by its 3x3 convolutions on 2x2 maps: at most 2 * 4 * 9 * Cin * Cout each.
    assert result.stages[3].flops <= 2 * 4 * 9 * (32 * 64 + 64 * 64) + 2 * 4 * 32 * 64 + 1e4
    assert sum(s.flops for s in result.stages) == pytest.approx(result.flops, rel=0.05)
    text = str(result)
    assert "stage3" in text and f"{result.params:,}" in text


def test_summary_without_flops_and_with_overrides():
    plain = models.summary("resnet_cifar", flops=False)
    augmented = models.summary("aa_resnet_cifar", flops=False, attention_position="none")
    assert plain.flops is None and all(s.flops is None for s in plain.stages)
    assert plain.input_shape == (32, 32, 3) and plain.num_classes == 10
    assert augmented.params == models.count_params(_flat_params("aa_resnet_cifar", attention_position="none"))


@pytest.mark.parametrize("name", ["resnet_cifar", "wrn28_10"])
def test_non_nhwc_input_is_rejected(name):
    model = models.create(name, num_classes=10)
    with pytest.raises(ValueError, match="expects NHWC images"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((32, 32, 3)))
