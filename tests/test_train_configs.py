"""The recipes in train/configs, the learning-rate schedules and the weight-decay rule."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import train_helpers as helpers
from train import state as train_state

RECIPES = {
    "default": "aa_resnet_cifar",
    "cifar100_wrn28_10": "wrn28_10",
    "cifar100_aa_wrn28_10": "aa_wrn28_10",
    "quickstart": "aa_wrn28_10",
    "cifar100_se_wrn28_10": "se_wrn28_10",
    "cifar100_ge_wrn28_10": "ge_wrn28_10",
    "imagenet_resnet50": "resnet50",
    "imagenet_aa_resnet50": "aa_resnet50",
    "imagenet_se_resnet50": "se_resnet50",
    "same_different": "resnet_cifar",
    "coco_retinanet_resnet50": "retinanet_resnet50",
    "coco_aa_retinanet_resnet50": "aa_retinanet_resnet50",
    "shapes_aa_retinanet": "aa_retinanet_resnet18",
    "shapes_retinanet": "retinanet_resnet18",
}


def load_config(name: str):
    """As ``--config train/configs/<name>.py`` loads it."""
    spec = importlib.util.spec_from_file_location(name, helpers.REPO / "train" / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert all(word in module.__doc__ for word in ("Command: python -m train", "Expected:", "Time:"))
    return module.get_config()


def test_every_recipe_file_is_tested():
    assert {path.stem for path in (helpers.REPO / "train" / "configs").glob("[!_]*.py")} == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_builds_its_model(name):
    config = load_config(name)
    assert config.model == RECIPES[name]
    model = train_state.create_model(config, num_classes=100)  # the registry accepts the recipe's overrides
    assert (model.num_classes, model.dtype) == (100, jnp.dtype(config.dtype))
    assert config.batch_size % 8 == 0  # fits 8-device hosts


def test_cifar100_recipe_steps_the_learning_rate_at_epochs_60_120_160():
    config = load_config("cifar100_aa_wrn28_10")
    steps_per_epoch = 50_000 // config.batch_size  # 390
    lr_fn = train_state.create_learning_rate_fn(config, steps_per_epoch, 200 * steps_per_epoch)
    rates = [float(lr_fn(epoch * steps_per_epoch)) for epoch in (0, 59, 60, 119, 120, 160, 199)]
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.02, 0.02, 0.004, 0.0008, 0.0008], rtol=1e-5)
    assert (config.weight_decay, config.momentum, config.nesterov, config.dataset) == (
        5e-4,
        0.9,
        True,
        "cifar100",
    )


def test_imagenet_recipe_warms_up_to_the_linearly_scaled_rate_then_decays_to_zero():
    config = load_config("imagenet_aa_resnet50")
    steps_per_epoch = 1_281_167 // config.batch_size  # 312
    total = 90 * steps_per_epoch
    lr_fn = train_state.create_learning_rate_fn(config, steps_per_epoch, total)
    peak_step = 5 * steps_per_epoch
    assert float(lr_fn(0)) == 0.0
    assert float(lr_fn(peak_step // 2)) == pytest.approx(0.8, rel=1e-2)
    assert float(lr_fn(peak_step)) == pytest.approx(0.1 * 4096 / 256)
    assert float(lr_fn(total)) == pytest.approx(0.0, abs=1e-6)
    assert config.label_smoothing == 0.1


def test_coco_recipe_warms_up_for_an_epoch_then_steps_down_at_epochs_8_and_11():
    config = load_config("coco_aa_retinanet_resnet50")
    steps_per_epoch = 118_287 // config.batch_size  # COCO 2017 train, batch 64: 1848
    lr_fn = train_state.create_learning_rate_fn(config, steps_per_epoch, 12 * steps_per_epoch)
    rates = [float(lr_fn(round(epoch * steps_per_epoch))) for epoch in (0, 0.5, 1, 7.9, 8, 10.9, 11, 11.9)]
    np.testing.assert_allclose(rates, [0.0, 0.04, 0.08, 0.08, 0.008, 0.008, 0.0008, 0.0008], rtol=1e-3)
    assert (config.task, config.dataset, config.image_size, config.weight_decay) == (
        "detection",
        "coco",
        640,
        1e-4,
    )


def test_shapes_twins_differ_only_in_the_backbones_attention():
    aa, plain = load_config("shapes_aa_retinanet"), load_config("shapes_retinanet")
    aa_backbone = aa.model_overrides.backbone_overrides.to_dict()
    plain_backbone = plain.model_overrides.backbone_overrides.to_dict()
    assert {k: v for k, v in aa_backbone.items() if k in plain_backbone} == plain_backbone
    assert aa_backbone["augmented_stages"] == (3, 4)
    aa.model, aa.model_overrides.backbone_overrides = plain.model, plain.model_overrides.backbone_overrides
    assert aa.to_dict() == plain.to_dict()


def test_weight_decay_applies_to_conv_and_dense_kernels_only():
    config = helpers.tiny_config({"weight_decay": 0.5})
    model = train_state.create_model(config, 10)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False))[
        "params"
    ]
    params = jax.tree.map(lambda p: jnp.ones(p.shape, p.dtype), params)
    tx = train_state.create_optimizer(config, optax.constant_schedule(1.0))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    decayed = {
        jax.tree_util.keystr(path): bool(jnp.any(u != 0))
        for path, u in jax.tree_util.tree_leaves_with_path(updates)
    }
    kernels = {name for name in decayed if name.endswith("['kernel']")}
    assert kernels and len(kernels) < len(decayed)  # BatchNorm scales, biases, relative tables exist
    assert {name for name, is_decayed in decayed.items() if is_decayed} == kernels
    assert any("attention" in name and not is_decayed for name, is_decayed in decayed.items())
