"""What differs between tasks in the training loop, as one :class:`Task` value.

The loop (``train/loop.py``) is the same for every task: it asks the task for the loss of the model's
outputs on a batch (inside the jitted step), for the per-batch evaluation outputs (jitted), how to
turn every test batch's outputs into results, and how to say the results in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between classification and detection, as functions the loop calls.

    Attributes:
      loss_fn: ``(model outputs, batch) -> (loss, metrics)``, differentiable, inside the train step.
      eval_step: ``(state, batch) -> outputs``, jitted; its outputs are replicated to every process.
      finish: ``[host copies of every test batch's outputs] -> results`` (floats by name); None
        where the task was made for a :class:`~train.data.dataset.Layout` alone, without a test set.
      headline: ``results -> str``, the final line's summary.
    """

    loss_fn: Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]
    eval_step: Callable[[Any, Batch], dict[str, jax.Array]]
    finish: Callable[[list[dict[str, np.ndarray]]], dict[str, float]] | None
    headline: Callable[[dict[str, float]], str]
