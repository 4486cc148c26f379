"""Checkpoints with Orbax: the train state and the position of the training data stream.

Each checkpoint ``WORKDIR/checkpoints/<step>/`` holds two items: ``state`` (step, params,
optimizer state, batch_stats; Orbax's standard PyTree format, written asynchronously) and
``data`` (the grain iterator state, one small JSON file per process). Restoring reads the arrays
straight into the shardings of the current mesh, so a checkpoint written on N devices restores
on any other number of devices.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp


def create_manager(workdir: str, *, max_to_keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        },
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: grain.DatasetIterator) -> None:
    """Start an asynchronous save (returns once the arrays are copied off the devices)."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
    )
    manager.save(step, args=args)


def restore(
    manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None
) -> Any:
    """The latest state, its arrays placed as ``abstract_state``'s ``ShapeDtypeStruct.sharding``.

    With ``data_iterator``, that iterator is also moved to the saved position.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(manager.latest_step(), args=ocp.args.Composite(**items)).state
