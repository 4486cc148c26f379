"""MnasNet-A1 and AA-MnasNet-A1: parameter counts against the papers, the block table, placement.

224x224 models are only traced (``jax.eval_shape``); real forward passes run at 32x32, width 0.75.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from aacn_jax import models
from aacn_jax.layers import AugmentedConv
from aacn_jax.models.mnasnet import MBConv, MnasNet, round_filters
from aacn_jax.nnx import ZooModel

WIDTHS = {"075": 0.75, "100": 1.0, "125": 1.25, "140": 1.4}
# Parameters (millions) at 224x224 / 1000 classes, AA paper (arXiv:1904.09925) table of MnasNet
# widths, as recalled (unconfirmed); the plain ones agree with the TF reference README (2.9M,
# 3.9M, 6.1M at widths 0.75, 1.0, 1.4).
PAPER_PARAMS_M = {
    "mnasnet_a1_075": 2.91,
    "aa_mnasnet_a1_075": 3.02,
    "mnasnet_a1_100": 3.89,
    "aa_mnasnet_a1_100": 4.06,
    "mnasnet_a1_125": 5.26,
    "aa_mnasnet_a1_125": 5.53,
    "mnasnet_a1_140": 6.10,
    "aa_mnasnet_a1_140": 6.44,
}
# Rows of MnasNet-A1 (MnasNet paper, Figure 7(a)): blocks, expansion, kernel, stride, channels at width 1, SE.
TABLE = [(1, 1, 3, 1, 16, 0), (2, 6, 3, 2, 24, 0), (3, 3, 5, 2, 40, 1), (4, 6, 3, 2, 80, 0)]
TABLE += [(2, 6, 3, 1, 112, 1), (3, 6, 5, 2, 160, 1), (1, 6, 3, 1, 320, 0)]
# Stem and stage channels by hand from the reference rule (nearest multiple of 8, +8 if it lost > 10%).
CHANNELS = {
    0.75: (24, 16, 24, 32, 64, 88, 120, 240),  # 24 * 0.75 = 18 -> 16 lost 11% -> 24
    1.0: (32, 16, 24, 40, 80, 112, 160, 320),
    1.25: (40, 24, 32, 48, 104, 144, 200, 400),  # 16 * 1.25 = 20 -> 24 (halves round up)
    1.4: (48, 24, 32, 56, 112, 160, 224, 448),
}


@functools.cache
def _abstract(name, **overrides):
    """(model, abstract variables) at 224x224 / 1000 classes."""
    model = models.create(name, num_classes=1000, **overrides)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    return model, jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _flat(name, **overrides):
    return traverse_util.flatten_dict(_abstract(name, **overrides)[1]["params"])


def _reference_count(width, num_classes=1000):
    """Parameters of plain MnasNet-A1 summed layer by layer from the table and CHANNELS."""
    stem, *widths = CHANNELS[width]
    count = 3 * 3 * 3 * stem + 2 * stem  # conv + BN scale and bias
    fin = stem
    for (blocks, expansion, kernel, _, _, se), fout in zip(TABLE, widths, strict=True):
        for _ in range(blocks):
            hidden = fin * expansion
            if expansion != 1:
                count += fin * hidden + 2 * hidden
            count += kernel * kernel * hidden + 2 * hidden  # depthwise
            if se:
                reduced = max(1, int(0.25 * fin))
                count += hidden * reduced + reduced + reduced * hidden + hidden
            count += hidden * fout + 2 * fout
            fin = fout
    count += fin * 1280 + 2 * 1280  # 1x1 head convolution, 1280 at every width
    return count + 1280 * num_classes + num_classes


@pytest.mark.parametrize("width", sorted(CHANNELS))
def test_round_filters_and_plain_count_match_the_layer_by_layer_reference(width):
    assert tuple(round_filters(c, width) for c in (32, 16, 24, 40, 80, 112, 160, 320)) == CHANNELS[width]
    name = f"mnasnet_a1_{round(width * 100):03d}"
    assert models.count_params(_abstract(name)[1]["params"]) == _reference_count(width)


@pytest.mark.parametrize(("name", "paper"), sorted(PAPER_PARAMS_M.items()))
def test_parameter_count_matches_paper(name, paper):
    params = models.count_params(_abstract(name)[1]["params"])
    assert abs(params / 1e6 - paper) / paper < 0.02, f"{name}: {params / 1e6:.3f}M vs paper {paper}M"


def test_every_registered_width_works_through_create():
    expected = {f"{prefix}mnasnet_a1_{w}" for prefix in ("", "aa_") for w in WIDTHS}
    assert expected <= set(models.list_models())
    for suffix, width in WIDTHS.items():
        assert models.create(f"aa_mnasnet_a1_{suffix}", num_classes=3).width == width


def test_strides_give_the_documented_resolutions_and_se_sits_where_a1_has_it():
    result = models.summary("mnasnet_a1_100", flops=False)
    names = ["stem", *(f"stage{i}" for i in range(1, 8)), "head_conv", "head"]
    assert [s.name for s in result.stages] == names
    sides = [s.output_shape[1] for s in result.stages[:-1]]
    assert sides == [112, 112, 56, 28, 14, 14, 7, 7, 7]
    assert [s.output_shape[-1] for s in result.stages[1:8]] == list(CHANNELS[1.0][1:])
    flat = _flat("mnasnet_a1_100")
    blocks = {key[:2] for key in flat if key[0].startswith("stage")}
    assert len(blocks) == 16  # 1 + 2 + 3 + 4 + 2 + 3 + 1
    with_se = {key[:2] for key in flat if "excite" in key}
    assert {stage for stage, _ in with_se} == {"stage3", "stage5", "stage6"}
    assert with_se == {block for block in blocks if block[0] in ("stage3", "stage5", "stage6")}
    # SE hidden units: int(0.25 * block input channels), not of the expanded channels
    assert flat[("stage3", "block1", "excite", "reduce", "kernel")].shape == (72, 6)  # 24 in, x3
    assert flat[("stage3", "block2", "excite", "reduce", "kernel")].shape == (120, 10)  # 40 in
    assert flat[("stage6", "block1", "excite", "reduce", "kernel")].shape == (672, 28)  # 112 in, x6
    # depthwise kernels [k, k, 1, C]; stage 1 (SepConv) has no expansion convolution
    assert flat[("stage3", "block2", "depthwise", "kernel")].shape == (5, 5, 1, 120)
    assert flat[("stage7", "block1", "depthwise", "kernel")].shape == (3, 3, 1, 960)
    assert not any(key[:3] == ("stage1", "block1", "expand") for key in flat)
    assert flat[("head_conv", "conv", "kernel")].shape == (1, 1, 320, 1280)


def _random_variables(module, x):
    """Random variables of ``module`` for input ``x``, without compiling its init: He-scaled kernels,
    BatchNorm scales and variances near 1, small biases, means and relative tables."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(dict(abstract))
    rng = np.random.default_rng(0)
    values = []
    for path, leaf in leaves:
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            values.append(noise * np.sqrt(2 / np.prod(leaf.shape[:-1])))
        else:
            values.append(1 + 0.1 * np.abs(noise) if name in ("scale", "var") else 0.1 * noise)
    return jax.tree.unflatten(treedef, values)


@pytest.mark.parametrize(
    ("fin", "fout", "strides", "residual"),
    [(16, 16, 1, True), (16, 16, 2, False), (16, 24, 1, False)],
)
def test_identity_shortcut_only_with_stride_1_and_equal_channels(fin, fout, strides, residual):
    """With the last BatchNorm's scale and bias at zero the branch is zero: a block returns its input
    exactly where it has the shortcut, zeros elsewhere."""
    block = MBConv(fout, 6, 3, strides, se=True)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, fin)), jnp.float32)
    variables = _random_variables(block, x)
    variables["params"]["project_bn"] = jax.tree.map(np.zeros_like, variables["params"]["project_bn"])
    y = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)
    np.testing.assert_array_equal(y, x if residual else jnp.zeros_like(y))


# (layer, Fin, Fout, dk, dv, attention side at 224) at width 1.0, by hand: the projection of a block
# maps its expanded channels (block input x expansion) to the stage's; dk = round8(0.1 Fout), dv =
# round8(0.05 Fout), rounding to the nearest multiple of 8 (8 heads), at least 8; the attention
# runs at the block's output resolution (stage 3: 28x28, after the stride of its first block).
AUGMENTED = [
    (("stage3", "block1", "project"), 24 * 3, 40, 8, 8, 28),  # 0.1 * 40 = 4 -> 8; 0.05 * 40 = 2 -> 8
    (("stage3", "block3", "project"), 40 * 3, 40, 8, 8, 28),
    (("stage4", "block1", "project"), 40 * 6, 80, 8, 8, 14),  # 8 -> 8; 4 -> 8 (halves round up)
    (("stage5", "block1", "project"), 80 * 6, 112, 8, 8, 14),  # 11.2 -> 8; 5.6 -> 8
    (("stage5", "block2", "project"), 112 * 6, 112, 8, 8, 14),
    (("stage6", "block2", "project"), 160 * 6, 160, 16, 8, 7),  # 16 -> 16; 8 -> 8
    (("stage7", "block1", "project"), 160 * 6, 320, 32, 16, 7),  # 32 -> 32; 16 -> 16
]


@pytest.mark.parametrize(("layer", "fin", "fout", "dk", "dv", "side"), AUGMENTED)
def test_augmented_layer_sizes(layer, fin, fout, dk, dv, side):
    flat = _flat("aa_mnasnet_a1_100")
    assert flat[(*layer, "conv", "kernel")].shape == (1, 1, fin, fout - dv)
    assert flat[(*layer, "attention", "qkv", "kernel")].shape == (1, 1, fin, 2 * dk + dv)
    assert flat[(*layer, "attention", "out", "kernel")].shape == (1, 1, dv, dv)
    for table in ("rel_h", "rel_w"):
        assert flat[(*layer, "attention", table)].shape == (2 * side - 1, dk // 8)


def _augmented_layers(flat):
    return {key[: key.index("attention")] for key in flat if "attention" in key}


def test_augmented_layers_are_the_projections_of_stages_3_to_7():
    expected = {
        (f"stage{stage}", f"block{block}", "project")
        for stage, blocks in ((3, 3), (4, 4), (5, 2), (6, 3), (7, 1))
        for block in range(1, blocks + 1)
    }
    assert len(expected) == 13
    for suffix in WIDTHS:
        assert _augmented_layers(_flat(f"aa_mnasnet_a1_{suffix}")) == expected
        assert _augmented_layers(_flat(f"mnasnet_a1_{suffix}")) == set()
    expansions = _augmented_layers(
        _flat("aa_mnasnet_a1_075", augmented_convs=("expand",), augmented_stages=(2,))
    )
    assert expansions == {("stage2", "block1", "expand"), ("stage2", "block2", "expand")}
    # the module's own default is the projection too (stage 1, SepConv, has no expansion)
    assert _augmented_layers(_flat("mnasnet_a1_075", augmented_stages=(1,))) == {
        ("stage1", "block1", "project")
    }


def _attention_extra(width):
    """Parameters the 13 augmented projections add to plain MnasNet-A1, from TABLE and CHANNELS: per
    layer Fin (2 dk + dv) + 2 dk + dv (qkv), dv dv + dv (output mixing), two relative tables of
    (2 side - 1) x dk / 8, less the Fin dv convolution weights the attention channels replace."""
    round8 = lambda depth: 8 * max(1, int(depth / 8 + 0.5))
    fin, *widths = CHANNELS[width]
    side, extra = 112, 0  # after the stem
    for stage, ((blocks, expansion, _, stride, _, _), fout) in enumerate(zip(TABLE, widths, strict=True), 1):
        side //= stride
        for _ in range(blocks):
            if stage >= 3:
                hidden, dk, dv = fin * expansion, round8(0.1 * fout), round8(0.05 * fout)
                extra += hidden * (2 * dk + dv) + 2 * dk + dv + dv * dv + dv
                extra += 2 * (2 * side - 1) * dk // 8 - hidden * dv
            fin = fout
    return extra


def test_augmented_count_is_the_plain_count_plus_the_attention_by_hand():
    # width 1.0, layer by layer (Fin, dk, dv, side): 1358 + 2 * 2126 (stage 3); 3990 + 3 * 7830
    # (stage 4); 7830 + 10902 (stage 5); 21668 + 2 * 30884 (stage 6); 61896 (stage 7)
    assert _attention_extra(1.0) == 197_154
    for suffix, width in WIDTHS.items():
        params = models.count_params(_abstract(f"aa_mnasnet_a1_{suffix}")[1]["params"])
        assert params == _reference_count(width) + _attention_extra(width)


TINY = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


@functools.cache
def _tiny_aa():
    """AA-MnasNet-A1 0.75 with random variables for 32x32 inputs and its jitted logits."""
    model = models.create("aa_mnasnet_a1_075", num_classes=5)
    variables = _random_variables(model, TINY[:1])
    return model, variables, jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, TINY)


@pytest.mark.parametrize("name", ["mnasnet_a1_075", "aa_mnasnet_a1_075"])
def test_tiny_input_gives_logits_and_augmented_convs_feed_batch_norm(name):
    """32x32 -> 16, 16, 8, 4, 2, 2, 1, 1 (traced): logits [2, 5] float32; the augmented layers are
    AugmentedConv modules, each followed by its block's BatchNorm."""
    model = models.create(name, num_classes=5)
    calls = {"augmented": [], "bn_inputs": []}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, AugmentedConv):
            calls["augmented"].append((context.module.scope.path, out))
        elif isinstance(context.module, nn.BatchNorm):
            calls["bn_inputs"].append(args[0])
        return out

    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), TINY)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, TINY)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    paths = {path for path, _ in calls["augmented"]}
    assert paths == _augmented_layers(traverse_util.flatten_dict(variables["params"]))
    assert len(paths) == (13 if name.startswith("aa_") else 0)
    for _, out in calls["augmented"]:
        assert any(out is bn_input for bn_input in calls["bn_inputs"])


def test_tiny_forward_is_finite_and_depends_on_the_image():
    _, _, logits = _tiny_aa()
    assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
    assert not np.allclose(logits[0], logits[1])


def test_nnx_model_equals_linen():
    """The NNX twin (flax.nnx.bridge, as ``create(..., api="nnx")`` builds it) around the same weights."""
    model, variables, logits = _tiny_aa()
    converted = ZooModel(model, input_shape=(32, 32, 3), rngs=nnx.Rngs(0), variables=variables)
    converted.eval()
    # Two programs of the same float32 network: rounding apart (3.4e-5 seen with XLA's older CPU
    # emitters, tests/train_helpers.py); a wrongly mapped weight is off by O(1).
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(converted, TINY), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(width=0), "width=0 must be a finite number > 0"),
        (dict(width=-1.0), "width=-1.0"),
        (dict(width=float("nan")), "width=nan"),
        (dict(width=float("inf")), "width=inf"),
        (dict(width="1.0"), "width='1.0'"),
        (dict(augmented_stages=(8,)), r"augmented_stages=\(8,\).*1..7"),
        (dict(augmented_convs=("depthwise",)), r"augmented_convs=\('depthwise',\).*'expand', 'project'"),
        (
            dict(augmented_stages=(1,), augmented_convs=("expand",)),
            r"augmented_convs=\('expand',\) names no convolution of stage 1",
        ),
        (dict(augmented_stages=(3,), num_heads=0), "num_heads=0"),
        (dict(num_classes=0), "num_classes=0"),
        (dict(stages=()), r"stages=\(\) must be a non-empty"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        MnasNet(**overrides)


def test_bad_width_through_create():
    with pytest.raises(ValueError, match=r"width=0.0 must be a finite number > 0"):
        models.create("aa_mnasnet_a1_100", num_classes=10, width=0.0)
