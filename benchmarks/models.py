"""Train-step speed and memory of AA models against their plain twins: ``python -m benchmarks.models``.

Each pair is measured in one run, its two steps timed in interleaved rounds, so the ratio
compares like with like: one SGD step (forward, backward, BatchNorm update) at a small batch,
median seconds after compilation, images/s, and XLA's temporary bytes. The paper's FLOP ratios
for reference: AA-WRN-28-10 / WRN-28-10 about 10.9 / 10.4, AA-ResNet-50 / ResNet-50 8.3 / 8.2.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import optax

from aacn_jax import models
from benchmarks import measure

# (name, input size, classes, batch)
PAIRS = (
    (("wrn28_10", "aa_wrn28_10"), 32, 100, 8),
    (("resnet50", "aa_resnet50"), 224, 1000, 4),
)
TRAINING_PAIRS = (  # per accelerator: the CIFAR recipe's batch, ImageNet 4096 over 128 chips
    (("wrn28_10", "aa_wrn28_10"), 32, 100, 128),
    (("resnet50", "aa_resnet50"), 224, 1000, 32),
)
QUICK_PAIRS = ((("resnet_cifar", "aa_resnet_cifar"), 32, 10, 4),)


def train_step_fn(model):
    """A jitted SGD step ``(variables, images, labels) -> variables`` with BatchNorm in train mode."""

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    def step(variables, images, labels):
        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(
            variables["params"], variables["batch_stats"], images, labels
        )
        params = jax.tree.map(lambda p, g: p - 0.01 * g, variables["params"], grads)
        return {"params": params, "batch_stats": batch_stats}

    return jax.jit(step, donate_argnums=0)


def prepare_model(name: str, size: int, num_classes: int, batch: int, dtype=jnp.float32):
    """A row of facts about the model and a no-argument call that runs one train step."""
    model = models.create(name, num_classes=num_classes, dtype=dtype)
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    labels = jnp.zeros((batch,), jnp.int32)
    variables = model.init(jax.random.key(1), images, train=False)
    step = train_step_fn(model)
    row = {
        "model": name,
        "input_size": size,
        "batch": batch,
        "dtype": jnp.dtype(dtype).name,
        "temp_bytes": measure.compiled_temp_bytes(step, variables, images, labels),
        "params": models.count_params(variables["params"]),
    }
    state = {"variables": variables}

    def run():  # the input buffers are donated, so each step consumes the last one's output
        state["variables"] = step(state["variables"], images, labels)
        return state["variables"]

    return row, run


def measure_pair(names, size: int, num_classes: int, batch: int, repeats: int = 5, dtype=jnp.float32):
    """Rows of a plain model and its AA twin, their steps timed in interleaved rounds."""
    prepared = {name: prepare_model(name, size, num_classes, batch, dtype) for name in names}
    calls = {name: run for name, (_, run) in prepared.items()}
    seconds = measure.interleaved_median_seconds(calls, repeats=repeats)
    return [
        row | {"seconds_per_step": seconds[name], "images_per_second": batch / seconds[name]}
        for name, (row, _) in prepared.items()
    ]


def main(argv=None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="the small CIFAR pair only; writes nothing")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument(
        "--training_batch", action="store_true", help="batch 128 (WRN, 32x32) and 32 (ResNet-50, 224x224)"
    )
    args = parser.parse_args(argv)
    rows = []
    pairs = QUICK_PAIRS if args.quick else TRAINING_PAIRS if args.training_batch else PAIRS
    for names, size, num_classes, batch in pairs:
        plain, augmented = measure_pair(names, size, num_classes, batch, dtype=jnp.dtype(args.dtype))
        ratio = plain["images_per_second"] / augmented["images_per_second"]
        memory_ratio = augmented["temp_bytes"] / plain["temp_bytes"]
        for row in (plain, augmented):
            print(
                f"{row['model']:<16}{row['images_per_second']:9.2f} img/s"
                f"{row['temp_bytes'] / 2**20:10.0f} MiB temp{row['params'] / 1e6:9.2f}M params",
                flush=True,
            )
        print(f"  {names[1]} / {names[0]}: time {ratio:.2f}x, temp memory {memory_ratio:.2f}x", flush=True)
        rows += [plain, augmented | {"time_ratio": ratio, "memory_ratio": memory_ratio}]
    if not args.quick:
        print(f"wrote {measure.write_results('models', {'rows': rows})}")


if __name__ == "__main__":
    main(sys.argv[1:])
