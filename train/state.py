"""What a run trains: the model from the registry, the optimizer and its schedule, the train state.

Every function here is a pure function of the config (and the data set's sizes), shared by the loop
(``train/loop.py``), :func:`train.inference.load` and ahead-of-time checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from aacn_jax import models
from train.errors import InputError


class TrainState(train_state.TrainState):
    """Flax's train state (step, params, optimizer and its state) plus BatchNorm statistics and the
    number of updates skipped for non-finite values (``nonfinite_policy='skip'``)."""

    batch_stats: Any
    skipped_steps: jax.Array


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """``config.model`` from the registry; ``config.dtype`` is the compute dtype (params stay float32)."""
    overrides = config.model_overrides.to_dict()
    try:  # models.create checks the name and the overrides before building anything
        return models.create(
            config.model, num_classes=num_classes, dtype=jnp.dtype(config.dtype), **overrides
        )
    except ValueError as error:
        raise InputError(f"{error}: fix --config.model or --config.model_overrides") from error


def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_steps: int
) -> optax.Schedule:
    """Linear warm-up to the peak rate, then cosine decay to 0 or step decay.

    The peak is ``learning_rate * batch_size / base_batch_size`` (linear scaling, Goyal et al. 2017).
    """
    peak = config.learning_rate * config.batch_size / config.base_batch_size
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if warmup_steps >= num_steps:
        raise InputError(
            f"warmup_epochs={config.warmup_epochs} is {warmup_steps} steps, not fewer than the run's "
            f"{num_steps} steps: lower --config.warmup_epochs"
        )
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, num_steps)
    if config.lr_schedule == "step":  # boundaries at absolute epochs, counted from the end of warm-up
        decays = {
            round(e * steps_per_epoch) - warmup_steps: config.lr_decay_factor for e in config.lr_decay_epochs
        }
        warmup = optax.linear_schedule(0.0, peak, warmup_steps)
        return optax.join_schedules([warmup, optax.piecewise_constant_schedule(peak, decays)], [warmup_steps])
    raise InputError(f"lr_schedule={config.lr_schedule!r} must be 'cosine' or 'step'")


def decay_mask(params: Any) -> Any:
    """True for convolution and dense kernels (leaves named ``kernel``): the weights that are decayed.

    Biases, BatchNorm scales and offsets and the relative position tables are not decayed.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def create_optimizer(
    config: ml_collections.ConfigDict, lr_fn: optax.Schedule
) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and L2 weight decay on the kernels (added to the gradient)."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(lr_fn, momentum=config.momentum, nesterov=config.nesterov),
    )


def create_state(
    rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation, image_shape: Sequence[int]
) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
        skipped_steps=jnp.zeros((), jnp.int32),
    )
