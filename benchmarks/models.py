"""Train-step speed and memory of AA models against their plain twins: ``python -m benchmarks.models``.

Each pair is measured in one run, its steps timed in interleaved rounds, so the ratio compares
like with like: one SGD step (forward, backward, BatchNorm update) at a small batch, median
seconds after compilation, images/s, and XLA's temporary bytes. ``--attention_implementations
default mgpu`` times the AA model once per attention implementation (``default``: the library's
per-platform choice; else an ``implementation=`` name of ``self_attention_2d``), all in the same
interleaved rounds as the plain twin; each row records its ``attention_implementation`` (null for
the plain model) and each AA row its ``time_ratio`` and ``memory_ratio`` to the plain twin. The
paper's FLOP ratios for reference: AA-WRN-28-10 / WRN-28-10 about 10.9 / 10.4, AA-ResNet-50 /
ResNet-50 8.3 / 8.2.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import optax

from aacn_jax import models
from aacn_jax.functional import IMPLEMENTATIONS
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
QUICK_OVERRIDES = {"depth": 8}  # --quick: one block per stage (same code, a third of the compile)
DEFAULT = "default"  # --attention_implementations: the library's per-platform choice (None)


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


def prepare_model(
    name: str,
    size: int,
    num_classes: int,
    batch: int,
    dtype=jnp.float32,
    attention_implementation: str | None = None,
    overrides: dict | None = None,
):
    """A row of facts about the model and a no-argument call that runs one train step.

    ``attention_implementation``: passed to the model (an AA model; None leaves its default);
    ``overrides``: the model's other overrides (``models.create``), recorded in the row.
    """
    overrides = dict(overrides or {})
    implementation = (
        {} if attention_implementation is None else {"attention_implementation": attention_implementation}
    )
    model = models.create(name, num_classes=num_classes, dtype=dtype, **overrides, **implementation)
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    labels = jnp.zeros((batch,), jnp.int32)
    variables = model.init(jax.random.key(1), images, train=False)
    # compiled once: its memory analysis, and the executable that run() calls
    step = train_step_fn(model).lower(variables, images, labels).compile()
    row = {
        "model": name,
        "input_size": size,
        "batch": batch,
        "dtype": jnp.dtype(dtype).name,
        "model_overrides": overrides,
        "temp_bytes": int(step.memory_analysis().temp_size_in_bytes),
        "params": models.count_params(variables["params"]),
    }
    state = {"variables": variables}

    def run():  # the input buffers are donated, so each step consumes the last one's output
        state["variables"] = step(state["variables"], images, labels)
        return state["variables"]

    return row, run


def measure_pair(
    names,
    size: int,
    num_classes: int,
    batch: int,
    repeats: int = 5,
    dtype=jnp.float32,
    attention_implementations=(DEFAULT,),
    overrides: dict | None = None,
):
    """Rows of a plain model and of its AA twin once per attention implementation (``DEFAULT`` or an
    ``implementation=`` name), all their steps timed in the same interleaved rounds.

    Each row records its ``attention_implementation`` (None for the plain model); each AA row its
    ``time_ratio`` (step time over the plain model's) and ``memory_ratio`` (temporary bytes).
    """
    plain, augmented = names
    cases = [(plain, None)] + [(augmented, impl) for impl in attention_implementations]
    prepared = {
        case: prepare_model(
            case[0],
            size,
            num_classes,
            batch,
            dtype,
            None if case[1] in (None, DEFAULT) else case[1],
            overrides,
        )
        for case in cases
    }
    calls = {case: run for case, (_, run) in prepared.items()}
    seconds = measure.interleaved_median_seconds(calls, repeats=repeats)
    rows = [
        row
        | {
            "attention_implementation": case[1],
            "seconds_per_step": seconds[case],
            "images_per_second": batch / seconds[case],
        }
        for case, (row, _) in prepared.items()
    ]
    for row in rows[1:]:
        row["time_ratio"] = row["seconds_per_step"] / rows[0]["seconds_per_step"]
        row["memory_ratio"] = row["temp_bytes"] / rows[0]["temp_bytes"]
    return rows


def main(argv=None) -> list[dict]:
    """Run the benchmark; returns its rows (also in ``--quick``, which writes nothing)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--quick", action="store_true", help="the small CIFAR pair at depth 8 only; writes nothing"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument(
        "--training_batch", action="store_true", help="batch 128 (WRN, 32x32) and 32 (ResNet-50, 224x224)"
    )
    parser.add_argument(
        "--attention_implementations",
        nargs="+",
        default=[DEFAULT],
        choices=[DEFAULT, *IMPLEMENTATIONS],
        help="time each AA model once per attention implementation (default: the library's choice)",
    )
    args = parser.parse_args(argv)
    rows = []
    pairs = QUICK_PAIRS if args.quick else TRAINING_PAIRS if args.training_batch else PAIRS
    implementations = list(dict.fromkeys(args.attention_implementations))
    print(
        f"timing train steps of {[names for names, *_ in pairs]} on {jax.devices()[0].device_kind}, "
        f"{args.dtype}, AA attention {implementations}",
        flush=True,
    )
    for names, size, num_classes, batch in pairs:
        measured = measure_pair(
            names,
            size,
            num_classes,
            batch,
            dtype=jnp.dtype(args.dtype),
            attention_implementations=implementations,
            overrides=QUICK_OVERRIDES if args.quick else None,
        )
        for row in measured:
            label = row["model"] + (
                "" if row["attention_implementation"] is None else f" [{row['attention_implementation']}]"
            )
            print(
                f"{label:<28}{row['images_per_second']:9.2f} img/s"
                f"{row['temp_bytes'] / 2**20:10.0f} MiB temp{row['params'] / 1e6:9.2f}M params",
                flush=True,
            )
        for row in measured[1:]:
            twins = f"{names[1]} [{row['attention_implementation']}] / {names[0]}"
            print(
                f"  {twins}: time {row['time_ratio']:.2f}x, temp memory {row['memory_ratio']:.2f}x",
                flush=True,
            )
        rows += measured
        if not args.quick:  # after every pair, so a run stopped at its time limit keeps what it measured
            path = measure.write_results("models", {"rows": rows})
    if not args.quick:
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
