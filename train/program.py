"""What a run compiles: the model, its task, and the jitted initialisation, train step and evaluation
step with their shardings.

Built from the config and the data set's :class:`~train.data.dataset.Layout` alone, so the training
loop (``train/loop.py``) and the ahead-of-time check (``train/aot.py``) compile the same programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from train import sharding
from train.data.dataset import Layout
from train.state import TrainState, create_learning_rate_fn, create_model, create_optimizer, create_state
from train.tasks import create_task
from train.tasks.task import Task


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    rng: jax.Array,
    lr_fn: optax.Schedule,
    loss_fn: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]],
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch; BatchNorm statistics are over the global batch.

    ``loss_fn(model outputs, batch) -> (loss, metrics)`` is the task's (:class:`~train.tasks.task.Task`);
    its metrics join the step's.

    Dropout (where a model has it) draws from ``fold_in(rng, step)``: a resumed run repeats it exactly.
    Metric ``finite`` is False when the loss, the gradients or the new parameters are not finite; with
    ``skip_nonfinite`` such a step keeps the old parameters, optimizer state and BatchNorm statistics
    (the step counter still advances past the batch) and counts itself in ``skipped_steps``.
    """

    def compute_loss(params: Any) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
        variables = {"params": params, "batch_stats": state.batch_stats}
        outputs, updates = state.apply_fn(
            variables,
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.fold_in(rng, state.step)},
        )
        loss, task_metrics = loss_fn(outputs, batch)
        return loss, (task_metrics, updates["batch_stats"])

    (loss, (task_metrics, batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(new_state.params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    if skip_nonfinite:
        skipped = state.replace(step=new_state.step, skipped_steps=state.skipped_steps + 1)
        new_state = jax.tree.map(functools.partial(jnp.where, finite), new_state, skipped)
    step_metrics = {
        "loss": loss,
        **task_metrics,
        "learning_rate": lr_fn(state.step),
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "finite": finite,
        "skipped_steps": new_state.skipped_steps,
    }
    return new_state, step_metrics


@dataclasses.dataclass(frozen=True)
class Program:
    """Attributes:
    model, task: the run's model and :class:`~train.tasks.task.Task`.
    lr_fn, num_steps: the learning-rate schedule and the run's step count.
    abstract_state: the train state's shapes, dtypes and (replicated) shardings.
    init: jitted ``() -> state``, the fresh state of ``config.seed``.
    train_step: jitted ``(state, batch) -> (state, metrics)``; donates the state.
    eval_step: jitted ``(state, test batch) -> outputs`` (the task's), replicated.
    """

    model: nn.Module
    task: Task
    lr_fn: optax.Schedule
    num_steps: int
    abstract_state: TrainState
    init: Any
    train_step: Any
    eval_step: Any


def batch_shapes(layout: Layout, batch_size: int, mesh: Mesh, *, test: bool = False) -> Any:
    """:meth:`Layout.batch_shapes` with the batch sharding of ``mesh``, as the steps take them."""
    batch_sharded = sharding.batch_sharded(mesh)
    return {
        name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharded)
        for name, x in layout.batch_shapes(batch_size, test=test).items()
    }


def build(config: ml_collections.ConfigDict, layout: Layout, mesh: Mesh, *, steps_per_epoch: int) -> Program:
    """The programs of a run of ``config`` on data of ``layout`` (a :class:`~train.data.dataset.Dataset`
    is one), data-parallel on ``mesh``; ``steps_per_epoch`` sets the schedule's step counts."""
    model = create_model(config, layout.num_classes)
    task = create_task(config, model, layout)
    num_steps = config.num_train_steps
    if num_steps <= 0:
        num_steps = round(config.num_epochs * steps_per_epoch)
    lr_fn = create_learning_rate_fn(config, steps_per_epoch, num_steps)
    init = functools.partial(
        create_state, model=model, tx=create_optimizer(config, lr_fn), image_shape=layout.image_shape
    )
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(init, init_rng)
    )
    state_sharding = jax.tree.map(lambda x: x.sharding, abstract_state)
    step = functools.partial(
        train_step,
        rng=dropout_rng,
        lr_fn=lr_fn,
        loss_fn=task.loss_fn,
        skip_nonfinite=config.nonfinite_policy == "skip",
    )
    return Program(
        model=model,
        task=task,
        lr_fn=lr_fn,
        num_steps=num_steps,
        abstract_state=abstract_state,
        init=jax.jit(functools.partial(init, init_rng), out_shardings=state_sharding),
        train_step=jax.jit(
            step,
            in_shardings=(state_sharding, batch_sharded),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            task.eval_step, in_shardings=(state_sharding, batch_sharded), out_shardings=replicated
        ),
    )
