"""Start a run from another run's weights (``config.init_from``): fine-tuning, or a detector's backbone
from a classifier (RetinaNet's usual start: an ImageNet-trained ResNet, e.g. torchvision's converted
by ``python -m train.convert``).

Every parameter and BatchNorm statistic of the new model (of its ``backbone`` when it has one and
the source has none) is taken from the source run's latest checkpoint at the same path, except:

- leaves the source lacks keep their initial values (a detector's pyramid and heads, the attention
  of an augmented convolution, a squeeze-excite layer); leaves the new model lacks are left out (a
  classifier's head under a detector, the 3x3 kernel of a fully attentional layer);
- the convolution branch of an attention-augmented convolution (``.../conv2/conv/kernel``, ``Fout -
  dv`` filters) takes the first ``Fout - dv`` output filters of the plain convolution it replaces
  (``.../conv2/kernel``); its attention starts fresh and the BatchNorm after it keeps all of the
  source's statistics. (The alternative, distilling the dropped ``dv`` filters into the attention's
  output projection, would need data; the fine-tuning re-learns them instead.)
- a leaf of the classifier ``head`` of another shape (another number of classes) keeps its initial
  value;
- relative position tables (``rel_h``, ``rel_w``) learned at another map size are resized to the
  new one by :func:`aacn_jax.functional.resize_relative_table` (centre slice or linear
  interpolation).

Any other shape difference is an error naming the leaf: the source is another architecture. What
is new and what is dropped is printed, grouped by layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aacn_jax.functional import resize_relative_table
from train.errors import InputError
from train.inference import load
from train.state import TrainState

RELATIVE_TABLES = ("rel_h", "rel_w")
Path = tuple[str, ...]


def _flat(tree: Any) -> dict[Path, Any]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _source_of(key: Path, source_leaves: dict[Path, Any]) -> Path | None:
    """The source path of a target leaf: the same path, or, for the convolution branch of an
    augmented convolution (``.../conv2/conv/kernel``), the plain convolution it replaces
    (``.../conv2/kernel``)."""
    if key in source_leaves:
        return key
    if key[-2:] == ("conv", "kernel") and (*key[:-2], "kernel") in source_leaves:
        return (*key[:-2], "kernel")
    return None


def _adopt(target: Any, source: Any, collection: str) -> tuple[Any, dict[str, list[Path]]]:
    """``target`` with the leaves ``source`` has at the same paths (module docstring), and the paths
    ``taken``, ``cut`` (the first filters of a kernel), ``new`` (kept initial), ``reshaped`` (a head
    of another shape, kept initial) and ``dropped`` (source leaves not used)."""
    source_leaves = _flat(source)
    paths: dict[str, list[Path]] = {kind: [] for kind in ("taken", "cut", "new", "reshaped", "dropped")}
    used = set()

    def take(path: Any, leaf: jax.Array) -> Any:
        key = tuple(k.key for k in path)
        origin = _source_of(key, source_leaves)
        if origin is None:
            paths["new"].append(key)
            return leaf
        value = np.asarray(source_leaves[origin])
        used.add(origin)
        if value.shape != leaf.shape and key[-1] in RELATIVE_TABLES and value.shape[1:] == leaf.shape[1:]:
            value = np.asarray(resize_relative_table(jnp.asarray(value), (leaf.shape[0] + 1) // 2))
        if origin != key and value.shape[:-1] == leaf.shape[:-1] and value.shape[-1] > leaf.shape[-1]:
            paths["cut"].append(key)
            return value[..., : leaf.shape[-1]].astype(leaf.dtype)  # the convolution branch's filters
        if value.shape != leaf.shape and key[0] == "head":
            paths["reshaped"].append(key)
            return leaf
        if value.shape != leaf.shape:
            raise InputError(
                f"init_from: {collection} {'/'.join(key)} has shape {value.shape} in the source run but "
                f"{leaf.shape} in this model: the source is another architecture"
            )
        paths["taken"].append(key)
        return value.astype(leaf.dtype)

    adopted = jax.tree_util.tree_map_with_path(take, target)
    paths["dropped"] = [key for key in source_leaves if key not in used]
    return adopted, paths


def _grouped(keys: list[Path]) -> str:
    """``stage{3,4}/block*/conv2/attention (54 arrays), head (2 arrays)``: leaves by layer, the blocks
    of a stage and the stages merged."""
    counts: dict[str, int] = {}
    stages: dict[str, list[str]] = {}
    for key in keys:
        parts = key[:-1]
        if parts[0].startswith("stage"):
            rest = parts[2:4]
            for layer in ("attention", "excite"):
                rest = rest[: rest.index(layer) + 1] if layer in rest else rest
            name = "/".join(("block*", *rest))
            stages.setdefault(name, [])
            if parts[0].removeprefix("stage") not in stages[name]:
                stages[name].append(parts[0].removeprefix("stage"))
        else:
            name = parts[0]
        counts[name] = counts.get(name, 0) + 1
    named = [
        (f"stage{{{','.join(stages[name])}}}/{name}" if name in stages else name, n)
        for name, n in counts.items()
    ]
    return ", ".join(f"{name} ({n} array{'s' * (n > 1)})" for name, n in named) or "none"


def warm_start(params: Any, batch_stats: Any, workdir: str) -> tuple[Any, Any, str]:
    """``(params, batch_stats)`` with the weights of the run in ``workdir`` adopted (module docstring),
    and a summary naming what is new and what is dropped; InputError when nothing matches."""
    try:
        _, variables, config = load(workdir)
    except FileNotFoundError as error:
        raise InputError(
            f"init_from: {error}: give the workdir of a finished run, or convert PyTorch weights into one "
            "(python -m train.convert)"
        ) from error
    source_params, source_stats = variables["params"], variables.get("batch_stats", {})
    into_backbone = "backbone" in params and "backbone" not in source_params
    part = (lambda tree: tree["backbone"]) if into_backbone else (lambda tree: tree)
    new_params, found = _adopt(part(params), source_params, "params")
    new_stats, found_stats = _adopt(part(batch_stats), source_stats, "batch_stats")
    if not found["taken"] and not found["cut"]:
        raise InputError(
            f"init_from: the run in {workdir} ({config.model}) shares no parameter paths with this model"
        )
    new = found["new"] + found_stats["new"]
    if into_backbone:
        new_params = {**params, "backbone": new_params}
        new_stats = {**batch_stats, "backbone": new_stats}
        new += [key for key in _flat({**params, "backbone": {}}) if key[0] != "backbone"]
    total = len(_flat(part(params)))
    scope = "the backbone's" if into_backbone else "the model's"
    lines = [
        f"Initialised {len(found['taken']) + len(found['cut'])} of {scope} {total} parameter arrays and "
        f"{len(found_stats['taken'])} BatchNorm statistics from {config.model} in {workdir}",
        f"  new (initial values): {_grouped(new)}",
        f"  dropped (not in this model): {_grouped(found['dropped'] + found_stats['dropped'])}",
    ]
    if found["cut"]:
        lines.append(
            f"  the first filters of the source kernel (convolution branch): {_grouped(found['cut'])}"
        )
    if found["reshaped"]:
        key = found["reshaped"][0]
        was, now = tuple(_flat(source_params)[key].shape), tuple(_flat(part(params))[key].shape)
        lines.append(
            f"  another shape, initial values: {_grouped(found['reshaped'])} ({'/'.join(key)}: {was} in "
            f"the source run, {now} here)"
        )
    return new_params, new_stats, "\n".join(lines)


def start_from(state: TrainState, workdir: str, state_sharding: Any, *, verbose: bool) -> TrainState:
    """``state`` with the parameters and BatchNorm statistics of the run in ``workdir`` adopted
    (:func:`warm_start`); the optimizer state stays fresh."""
    params, batch_stats, summary = warm_start(
        jax.device_get(state.params), jax.device_get(state.batch_stats), workdir
    )
    if verbose:
        print(summary, flush=True)
    return jax.device_put(state.replace(params=params, batch_stats=batch_stats), state_sharding)
