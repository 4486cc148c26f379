"""Start a run from another run's weights (``config.init_from``): fine-tuning, or a detector's backbone
from a classifier (RetinaNet's usual start: an ImageNet-trained ResNet).

Every parameter and BatchNorm statistic of the new model (of its ``backbone`` when it has one and
the source has none) is taken from the source run's latest checkpoint at the same path, with
three exceptions: leaves the source lacks keep their initial values (e.g. a detector's pyramid and
heads); leaves the new model lacks are left out (e.g. a classifier's head); relative position
tables (``rel_h``, ``rel_w``) learned at another map size are resized to the new one by
:func:`aacn_jax.functional.resize_relative_table` (centre slice or linear interpolation). Any
other shape difference is an error naming the leaf: the source is another architecture.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aacn_jax.functional import resize_relative_table
from train.inference import load
from train.state import TrainState

RELATIVE_TABLES = ("rel_h", "rel_w")


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _adopt(target: Any, source: Any, collection: str) -> tuple[Any, int, int]:
    """``target`` with the leaves ``source`` has at the same paths; the counts taken and kept."""
    source_leaves = _flat(source)
    taken = kept = 0

    def take(path: Any, leaf: jax.Array) -> Any:
        nonlocal taken, kept
        key = tuple(k.key for k in path)
        if key not in source_leaves:
            kept += 1
            return leaf
        value = np.asarray(source_leaves[key])
        if value.shape != leaf.shape and key[-1] in RELATIVE_TABLES and value.shape[1:] == leaf.shape[1:]:
            value = np.asarray(resize_relative_table(jnp.asarray(value), (leaf.shape[0] + 1) // 2))
        if value.shape != leaf.shape:
            raise ValueError(
                f"init_from: {collection} {'/'.join(key)} has shape {value.shape} in the source run but "
                f"{leaf.shape} in this model: the source is another architecture"
            )
        taken += 1
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(take, target), taken, kept


def warm_start(params: Any, batch_stats: Any, workdir: str) -> tuple[Any, Any, str]:
    """``(params, batch_stats)`` with the weights of the run in ``workdir`` adopted (module docstring),
    and a one-line summary; ValueError when nothing matches."""
    _, variables, config = load(workdir)
    source_params, source_stats = variables["params"], variables.get("batch_stats", {})
    into_backbone = "backbone" in params and "backbone" not in source_params
    part = (lambda tree: tree["backbone"]) if into_backbone else (lambda tree: tree)
    new_params, taken, kept = _adopt(part(params), source_params, "params")
    new_stats, taken_stats, _ = _adopt(part(batch_stats), source_stats, "batch_stats")
    if not taken:
        raise ValueError(
            f"init_from: the run in {workdir} ({config.model}) shares no parameter paths with this model"
        )
    if into_backbone:
        new_params = {**params, "backbone": new_params}
        new_stats = {**batch_stats, "backbone": new_stats}
    scope = "the backbone's" if into_backbone else "the model's"
    summary = (
        f"Initialised {taken} of {scope} parameter arrays and {taken_stats} BatchNorm statistics from "
        f"{config.model} in {workdir}; {kept} of {scope} parameter arrays are not in it and keep their "
        "initial values"
    )
    return new_params, new_stats, summary


def start_from(state: TrainState, workdir: str, state_sharding: Any, *, verbose: bool) -> TrainState:
    """``state`` with the parameters and BatchNorm statistics of the run in ``workdir`` adopted
    (:func:`warm_start`); the optimizer state stays fresh."""
    params, batch_stats, summary = warm_start(
        jax.device_get(state.params), jax.device_get(state.batch_stats), workdir
    )
    if verbose:
        print(summary, flush=True)
    return jax.device_put(state.replace(params=params, batch_stats=batch_stats), state_sharding)
