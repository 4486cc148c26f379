"""The device mesh and the two shardings of data-parallel training.

One ``jax.jit``-ed step runs on a 1-D mesh of every device of every host: the batch is split
along the ``data`` axis, the train state is replicated, and XLA inserts the gradient all-reduce
(and the cross-device sums of BatchNorm's batch statistics, which are therefore over the global
batch). This is today's form of a ``jax.pmap``-ed step: pmap is in maintenance mode since
JAX 0.8 and is itself built on ``jit`` + ``shard_map``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: every device of every process).

    The axis type is set to ``Auto`` (XLA propagates the shardings) because recent JAX defaults
    ``jax.make_mesh`` to ``Explicit`` sharding-in-types, which the Flax modules do not need.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split across the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Global arrays from this process's slice of the batch (``[global_batch / process_count, ...]``)."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(functools.partial(jax.make_array_from_process_local_data, sharding), local_batch)
