"""An NNX train step against the linen one on the same zoo model: ``python -m benchmarks.nnx``.

The NNX model is ``models.create(name, api="nnx")`` (the linen model under ``flax.nnx.bridge``);
the linen step starts from the same weights (``aacn_jax.nnx.linen_variables``). All steps are
one SGD step (forward, backward, BatchNorm update) with the state donated: linen under
``jax.jit``; NNX (an ``nnx.Optimizer``) under ``nnx.jit``, and the same NNX step on the state of
``nnx.split((model, optimizer))`` under ``jax.jit`` (no graph traversal per call). Timed in
interleaved rounds: median seconds after compilation and ratios. The goal: NNX within 1.1x.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from aacn_jax import models
from aacn_jax import nnx as aacn_nnx
from benchmarks import measure
from benchmarks.models import train_step_fn

# (name, input size, classes, batch)
MODELS = (
    ("aa_resnet_cifar", 32, 10, 32),
    ("aa_wrn28_10", 32, 100, 8),
    ("aa_resnet50", 224, 1000, 4),
)
QUICK_MODELS = (("resnet_cifar", 32, 10, 2),)
LEARNING_RATE = 0.01  # benchmarks.models.train_step_fn's


def sgd_step(
    model: aacn_nnx.ZooModel, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array
) -> None:
    """One SGD step of an NNX zoo model, updating model and optimizer in place."""

    def loss_fn(model: aacn_nnx.ZooModel) -> jax.Array:
        logits = model(images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    optimizer.update(model, nnx.grad(loss_fn)(model))


nnx_train_step = nnx.jit(sgd_step, donate_argnums=(0, 1))


def split_train_step(graphdef: nnx.GraphDef) -> Callable[..., nnx.State]:
    """The same step on the split state of ``(model, optimizer)``, jitted with ``jax.jit``: NNX's
    functional pattern, without a graph traversal per call. Returns the updated state."""

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: nnx.State, images: jax.Array, labels: jax.Array) -> nnx.State:
        model, optimizer = nnx.merge(graphdef, state)
        sgd_step(model, optimizer, images, labels)
        return nnx.state((model, optimizer))

    return step


def measure_model(name: str, size: int, num_classes: int, batch: int, repeats: int = 5) -> dict:
    """Median seconds per step of the linen and NNX forms of ``name``, measured in one run."""
    model = models.create(
        name, num_classes=num_classes, api="nnx", rngs=nnx.Rngs(0), input_shape=(size, size, 3)
    )
    optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE), wrt=nnx.Param)
    linen_step = train_step_fn(model.linen_module)
    graphdef, split_state = nnx.split((model, optimizer))
    split_step = split_train_step(graphdef)
    state = {
        "variables": jax.tree.map(jnp.copy, aacn_nnx.linen_variables(model)),
        "split": jax.tree.map(jnp.copy, split_state),
    }
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    labels = jnp.zeros((batch,), jnp.int32)

    def run_linen():  # the variables are donated: each step consumes the last one's output
        state["variables"] = linen_step(state["variables"], images, labels)
        return state["variables"]

    def run_nnx():
        nnx_train_step(model, optimizer, images, labels)
        return nnx.state(model)

    def run_split():
        state["split"] = split_step(state["split"], images, labels)
        return state["split"]

    calls = {"linen": run_linen, "nnx": run_nnx, "nnx_split": run_split}
    seconds = measure.interleaved_median_seconds(calls, repeats=repeats)
    return {
        "model": name,
        "input_size": size,
        "batch": batch,
        "linen_seconds_per_step": seconds["linen"],
        "nnx_seconds_per_step": seconds["nnx"],
        "nnx_over_linen": seconds["nnx"] / seconds["linen"],
        "nnx_split_seconds_per_step": seconds["nnx_split"],
        "nnx_split_over_linen": seconds["nnx_split"] / seconds["linen"],
    }


def main(argv=None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="resnet_cifar at batch 2 only; writes nothing")
    args = parser.parse_args(argv)
    chosen = QUICK_MODELS if args.quick else MODELS
    print(f"NNX vs linen train step: {', '.join(m[0] for m in chosen)} on {jax.devices()[0].device_kind}")
    rows = []
    for name, size, num_classes, batch in chosen:
        row = measure_model(name, size, num_classes, batch)
        print(
            f"{name:<16} batch {batch:<4} linen {row['linen_seconds_per_step'] * 1e3:9.1f} ms"
            f"  nnx {row['nnx_seconds_per_step'] * 1e3:9.1f} ms  nnx/linen {row['nnx_over_linen']:.3f}x"
            f"  split+jax.jit/linen {row['nnx_split_over_linen']:.3f}x",
            flush=True,
        )
        rows.append(row)
    if not args.quick:
        print(f"wrote {measure.write_results('nnx', {'rows': rows})}")


if __name__ == "__main__":
    main(sys.argv[1:])
