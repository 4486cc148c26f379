"""An NNX train step against the linen one on the same zoo model: ``python -m benchmarks.nnx``.

The NNX model is ``models.create(name, api="nnx")`` (the linen model under ``flax.nnx.bridge``);
the linen step starts from the same weights (``aacn_jax.nnx.linen_variables``). Both steps are
one SGD step (forward, backward, BatchNorm update) with the state donated, jitted with
``jax.jit`` (linen) and ``nnx.jit`` (NNX, an ``nnx.Optimizer``), timed in interleaved rounds:
median seconds after compilation and their ratio. The goal: NNX within 1.1x of linen.
"""

from __future__ import annotations

import argparse
import sys

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


@nnx.jit(donate_argnums=(0, 1))
def nnx_train_step(model: aacn_nnx.ZooModel, optimizer: nnx.Optimizer, images, labels):
    """One SGD step of an NNX zoo model, updating model and optimizer in place."""

    def loss_fn(model):
        logits = model(images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    optimizer.update(model, nnx.grad(loss_fn)(model))


def measure_model(name: str, size: int, num_classes: int, batch: int, repeats: int = 5) -> dict:
    """Median seconds per step of the linen and NNX forms of ``name``, measured in one run."""
    model = models.create(
        name, num_classes=num_classes, api="nnx", rngs=nnx.Rngs(0), input_shape=(size, size, 3)
    )
    optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE), wrt=nnx.Param)
    linen_step = train_step_fn(model.linen_module)
    state = {"variables": jax.tree.map(jnp.copy, aacn_nnx.linen_variables(model))}
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    labels = jnp.zeros((batch,), jnp.int32)

    def run_linen():  # the variables are donated: each step consumes the last one's output
        state["variables"] = linen_step(state["variables"], images, labels)
        return state["variables"]

    def run_nnx():
        nnx_train_step(model, optimizer, images, labels)
        return nnx.state(model)

    seconds = measure.interleaved_median_seconds({"linen": run_linen, "nnx": run_nnx}, repeats=repeats)
    return {
        "model": name,
        "input_size": size,
        "batch": batch,
        "linen_seconds_per_step": seconds["linen"],
        "nnx_seconds_per_step": seconds["nnx"],
        "nnx_over_linen": seconds["nnx"] / seconds["linen"],
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
            f"  nnx {row['nnx_seconds_per_step'] * 1e3:9.1f} ms  nnx/linen {row['nnx_over_linen']:.3f}x",
            flush=True,
        )
        rows.append(row)
    if not args.quick:
        print(f"wrote {measure.write_results('nnx', {'rows': rows})}")


if __name__ == "__main__":
    main(sys.argv[1:])
