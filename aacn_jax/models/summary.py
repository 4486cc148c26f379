"""Parameters and FLOPs of a registered model, per stage and in total.

Parameters are counted from ``jax.eval_shape`` of ``init`` (nothing is allocated). FLOPs come from
XLA's cost analysis of the compiled forward pass (``jax.jit(f).lower(...).compile().cost_analysis()``),
for one image in inference mode. XLA counts a multiply-add as 2 FLOPs, the paper's convention, but
only the kernel taps that fall inside the image for padded convolutions, so its counts are a few
percent below the usual nominal ones (ResNet-50: 8.00 vs 8.2 GFLOPs; ResNet-34: 6.78 vs 7.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacn_jax.models.registry import create, get_entry, image_shape

__all__ = ["ModelSummary", "StageSummary", "count_params", "summary", "xla_flops"]


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``variables["params"]``)."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))


def xla_flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs of ``jax.jit(fn)(*args)`` by XLA's cost analysis of the compiled program.

    ``args`` may be abstract (``jax.ShapeDtypeStruct``). Loops (``lax.map``, ``scan``) are counted
    once by XLA, not once per iteration: use loop-free code (``attention_implementation="dense"``).
    """
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):  # a list of per-device dicts in some JAX versions
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


@dataclasses.dataclass(frozen=True)
class StageSummary:
    """One top-level part of a model (``stem``, ``stage1`` ..., ``head``).

    ``output_shape``: the shape of its output, or a tuple of shapes when it returns several
    arrays (a detection backbone's stage outputs, a RetinaNet head's logits and box deltas).
    """

    name: str
    output_shape: tuple[int, ...] | tuple[tuple[int, ...], ...]
    params: int
    flops: float | None


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Per-stage and total parameters and FLOPs of a model for one image.

    ``flops`` is the cost of the whole jitted forward; ``sum(s.flops for s in stages)`` can differ
    slightly from it (XLA fuses across stage boundaries).
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    stages: tuple[StageSummary, ...]
    params: int
    flops: float | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        def fmt_flops(flops: float | None) -> str:
            return "-" if flops is None else f"{flops / 1e6:,.1f}"

        def fmt_shape(shape: tuple[Any, ...]) -> str:
            if shape and isinstance(shape[0], tuple):
                return ", ".join(fmt_shape(s) for s in shape)
            return "x".join(map(str, shape[1:]))

        header = f"{self.name}: input {self.input_shape}, {self.num_classes} classes"
        rows = [("stage", "output", "params", "MFLOPs")]
        for s in self.stages:
            rows.append((s.name, fmt_shape(s.output_shape), f"{s.params:,}", fmt_flops(s.flops)))
        rows.append(("total", "", f"{self.params:,}", fmt_flops(self.flops)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [header]
        for i, row in enumerate(rows):
            lines.append(
                "  ".join(
                    c.ljust(w) if j < 2 else c.rjust(w)
                    for j, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _slice(variables: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {col: tree[name] for col, tree in variables.items() if name in tree}


def _shape(output: Any) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
    shapes = tuple(tuple(leaf.shape) for leaf in jax.tree.leaves(output))
    return shapes[0] if len(shapes) == 1 else shapes


def summary(
    name: str,
    input_shape: Sequence[int] | None = None,
    *,
    num_classes: int | None = None,
    flops: bool = True,
    **overrides: Any,
) -> ModelSummary:
    """Parameters and FLOPs of the registered model ``name``, per stage and in total.

    Args:
      name: a name from :func:`aacn_jax.models.list_models`.
      input_shape: ``(H, W, C)`` of one image; the model's reference size by default (224x224x3
        for the ImageNet family, 32x32x3 for CIFAR). Relative position tables, hence parameter
        counts of AA models, depend on it.
      num_classes: the model's reference class count by default (1000 ImageNet, 100 for the
        Wide-ResNets, 10 for the small CIFAR ResNets).
      flops: compile the forward passes for XLA's FLOP counts (slow for 224x224 models on a
        CPU); False reports parameters only.
      **overrides: as in :func:`aacn_jax.models.create`. When counting FLOPs,
        ``attention_implementation`` defaults to ``"dense"`` because XLA counts the blockwise
        path's loop body once (the FLOPs of both paths are the same; only memory differs).

    Returns:
      A :class:`ModelSummary`; ``print`` it for a table.
    """
    entry = get_entry(name)
    input_shape = entry.input_shape if input_shape is None else image_shape(input_shape)
    num_classes = entry.num_classes if num_classes is None else num_classes
    if flops:
        overrides.setdefault("attention_implementation", "dense")
    model = create(name, num_classes=num_classes, **overrides)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def forward(module: nn.Module) -> Callable[[Any, Any], Any]:
        return lambda variables, x: module.apply(variables, x, train=False)

    stages = []
    h = jax.ShapeDtypeStruct(x.shape, jnp.dtype(model.dtype))
    for layer in model.components(detached=True):
        layer_vars = _slice(variables, layer.name)
        out = jax.eval_shape(forward(layer), layer_vars, h)
        layer_flops = xla_flops(forward(layer), layer_vars, h) if flops else None
        stages.append(
            StageSummary(layer.name, _shape(out), count_params(layer_vars.get("params", {})), layer_flops)
        )
        h = out
    total_flops = xla_flops(forward(model), variables, x) if flops else None
    return ModelSummary(
        name, input_shape, num_classes, tuple(stages), count_params(variables["params"]), total_flops
    )
