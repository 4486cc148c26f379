"""What differs per task in the training loop (``config.task``), one :class:`~train.tasks.task.Task`
value each: ``classification`` and ``detection`` (with COCO evaluation)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from train.data.dataset import Layout
from train.errors import InputError
from train.tasks.classification import classification_task
from train.tasks.detection import detection_task
from train.tasks.task import Task

TASKS: dict[str, Callable[[ml_collections.ConfigDict, Any, Layout], Task]] = {
    "classification": classification_task,
    "detection": detection_task,
}


def create_task(config: ml_collections.ConfigDict, model: Any, data: Layout) -> Task:
    """The task of ``data`` (a :class:`~train.data.dataset.Dataset`, or its
    :class:`~train.data.dataset.Layout` alone) for ``model``; InputError when ``config.task`` says
    otherwise."""
    if config.task != data.task:
        raise InputError(
            f"task={config.task!r}, but dataset={config.dataset!r} is a {data.task} data set: "
            f"set --config.task={data.task}"
        )
    return TASKS[data.task](config, model, data)
