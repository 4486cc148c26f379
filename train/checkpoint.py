"""Checkpoints with Orbax: the train state and the position of the training data stream.

Each checkpoint ``WORKDIR/checkpoints/<step>/`` holds two items: ``state`` (step, params,
optimizer state, batch_stats; Orbax's standard PyTree format, written asynchronously) and
``data`` (the grain iterator state, one small JSON file per process). Restoring reads the arrays
straight into the shardings of the current mesh, so a checkpoint written on N devices restores
on any other number of devices.

Orbax writes a checkpoint into ``<step>.orbax-checkpoint-tmp*`` and renames it to ``<step>`` once
complete, so a process killed while saving leaves no half-written ``<step>``: the next run
deletes the temporary directory and restores the latest complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from train.errors import WorkdirError


def saved_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in ``workdir`` (read without creating anything)."""
    directory = os.path.join(workdir, "checkpoints")
    return (
        sorted(int(name) for name in os.listdir(directory) if name.isdigit())
        if os.path.isdir(directory)
        else []
    )


def create_manager(workdir: str, *, max_to_keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=True, cleanup_tmp_directories=True
        ),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        },
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: grain.DatasetIterator,
    *,
    wait: bool = False,
) -> None:
    """Start an asynchronous save (returns once the arrays are copied off the devices); with
    ``wait``, return once the checkpoint is complete on disk."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
    )
    manager.save(step, args=args)
    if wait:
        manager.wait_until_finished()


def restore(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iterator: grain.DatasetIterator | None = None,
    *,
    step: int | None = None,
) -> Any:
    """The state of ``step`` (default: the latest), its arrays placed as ``abstract_state``'s
    ``ShapeDtypeStruct.sharding``. With ``data_iterator``, that iterator is also moved to the saved
    position."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    step = manager.latest_step() if step is None else step
    return manager.restore(step, args=ocp.args.Composite(**items)).state


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{'params/stage1/.../kernel': (shape, dtype name)}`` of a tree of arrays or array metadata."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def check_compatible(manager: ocp.CheckpointManager, abstract_state: Any) -> None:
    """Raise WorkdirError listing the arrays whose shapes or dtypes differ between the latest
    checkpoint and ``abstract_state`` (a checkpoint of another model or config)."""
    step = manager.latest_step()
    saved, expected = _shapes(manager.item_metadata(step)["state"]), _shapes(abstract_state)
    problems = [f"{name}: missing from the checkpoint" for name in expected.keys() - saved.keys()]
    problems += [
        f"{name}: in the checkpoint but not in this model" for name in saved.keys() - expected.keys()
    ]
    problems += [
        f"{name}: checkpoint {saved[name][1]}{list(saved[name][0])}, this model "
        f"{expected[name][1]}{list(expected[name][0])}"
        for name in saved.keys() & expected.keys()
        if saved[name] != expected[name]
    ]
    if problems:  # the parameters first: optimizer state and BatchNorm statistics follow from them
        listed = "\n  ".join(sorted(problems, key=lambda p: (not p.startswith("params/"), p))[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise WorkdirError(
            f"the checkpoint of step {step} in {manager.directory} is not of this model and config "
            f"({len(problems)} arrays differ):\n  {listed}{more}\nUse the config it was trained with, or "
            "another --workdir to start a new run."
        )


def restore_variables(workdir: str, abstract_variables: dict[str, Any], step: int | None = None) -> dict:
    """The model variables (``params``, ``batch_stats``) of a checkpoint, without the optimizer state.

    Reads only those arrays (Orbax partial restore), into the shardings of ``abstract_variables``,
    through a manager that creates and deletes nothing: safe while a training run writes into the
    same workdir. ``step``: None for the latest complete checkpoint.
    """
    steps = saved_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {workdir} (it has {steps})")
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    )
    item = ocp.args.PyTreeRestore(
        item=abstract_variables,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_variables),
        partial_restore=True,
    )
    with manager:
        return manager.restore(step, args=ocp.args.Composite(state=item)).state
