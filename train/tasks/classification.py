"""The classification task: cross-entropy against (smoothed) labels in training, top-1 and top-5 in
evaluation."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from train.data.dataset import Layout
from train.tasks.task import Batch, Task


def correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """``[B]`` float: 1 where the label is among the ``k`` largest logits (k capped at the class count)."""
    top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def classification_loss(
    logits: jax.Array, batch: Batch, *, label_smoothing: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy against ``label_smoothing``-smoothed one-hot labels; top-1 and top-5 hit rates."""
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, {
        "top1": correct(logits, batch["label"], 1).mean(),
        "top5": correct(logits, batch["label"], 5).mean(),
    }


def classification_eval_step(state: Any, batch: Batch) -> dict[str, jax.Array]:
    """Sums over the batch's real records (``mask`` 1): cross-entropy, top-1 and top-5 hits, count."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, batch["image"], train=False)
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum(correct(logits, batch["label"], 1) * mask),
        "top5": jnp.sum(correct(logits, batch["label"], 5) * mask),
        "count": jnp.sum(mask),
    }


def mean_of_sums(outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Totals of :func:`classification_eval_step`'s sums divided by the record count."""
    totals = {name: np.sum([output[name] for output in outputs]) for name in outputs[0]}
    count = totals.pop("count")
    return {name: float(total / count) for name, total in totals.items()}


def classification_headline(results: dict[str, float]) -> str:
    return f"top-1 {results['top1']:.2%} (top-5 {results['top5']:.2%}, loss {results['loss']:.4f})"


def classification_task(config: ml_collections.ConfigDict, model: Any, data: Layout) -> Task:
    del model, data  # any classifier, any classification data set
    return Task(
        functools.partial(classification_loss, label_smoothing=config.label_smoothing),
        classification_eval_step,
        mean_of_sums,
        classification_headline,
    )
