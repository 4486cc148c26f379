"""Parameters between the linen and NNX forms of a layer or zoo model, both directions.

Linen keeps variables in collections (``{"params": ..., "batch_stats": ...}``); NNX keeps them
on the modules, typed ``nnx.Param`` and ``nnx.BatchStat``. The twins here have the same names
and shapes, so a collection is the NNX state of its variable type, as a plain nested dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

__all__ = ["COLLECTIONS", "linen_variables", "load_linen_variables"]

COLLECTIONS: dict[str, type[nnx.Variable]] = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def _root(model: nnx.Module) -> nnx.Module:
    """Where a model's linen-shaped variables live: a :class:`~aacn_jax.nnx.ZooModel`'s bridged
    linen module, else the model itself."""
    bridged = getattr(model, "bridged", None)
    return bridged if isinstance(bridged, nnx.bridge.ToNNX) else model


def linen_variables(model: nnx.Module) -> dict[str, Any]:
    """The linen variables of an NNX model: ``{"params": ..., "batch_stats": ...}``.

    Only collections the model has are present (layers have no ``batch_stats``). The arrays are
    the model's own (not copies); ``linen_module.apply(linen_variables(model), x)`` computes
    what ``model(x)`` does.
    """
    variables = {}
    for collection, variable_type in COLLECTIONS.items():
        tree = nnx.to_pure_dict(nnx.state(_root(model), variable_type))
        if jax.tree.leaves(tree):
            variables[collection] = tree
    return variables


def _describe(path: tuple[Any, ...]) -> str:
    return "/".join(str(part) for part in path)


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Set an NNX model's parameters (and BatchNorm statistics) from linen variables, in place.

    ``variables`` is what a linen ``init`` returns, or a checkpoint's restored tree: one entry
    per collection of ``COLLECTIONS`` (params, batch_stats) that the model has, each with exactly
    the model's names, shapes and dtypes. Anything else raises ValueError naming the first
    differences, and nothing is changed. Returns ``model``.
    """
    unknown = sorted(set(variables) - set(COLLECTIONS))
    if unknown:
        raise ValueError(f"unknown collection(s) {unknown}; an NNX model takes {sorted(COLLECTIONS)}")
    root, updates = _root(model), []
    for collection, variable_type in COLLECTIONS.items():
        state = nnx.state(root, variable_type)
        want = traverse_util.flatten_dict(nnx.to_pure_dict(state))
        if not want and collection not in variables:
            continue
        got = traverse_util.flatten_dict(dict(variables.get(collection, {})))
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            raise ValueError(
                f"{collection!r} does not match the NNX model: missing {[_describe(p) for p in missing[:3]]}"
                f"{' ...' if len(missing) > 3 else ''}, unexpected {[_describe(p) for p in extra[:3]]}"
                f"{' ...' if len(extra) > 3 else ''}"
            )
        for path, value in got.items():
            have, given = want[path], jax.ShapeDtypeStruct(np.shape(value), jnp.result_type(value))
            if (given.shape, given.dtype) != (have.shape, have.dtype):
                raise ValueError(
                    f"{collection}/{_describe(path)} is {given.dtype.name}{list(given.shape)} in the linen "
                    f"variables but {have.dtype.name}{list(have.shape)} in the NNX model (build the NNX "
                    "model with the input_size, dtype and hyperparameters the linen one was initialised with)"
                )
        nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(got))
        updates.append(state)
    if updates:
        nnx.update(root, *updates)
    return model
