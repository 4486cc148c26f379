"""Reading the attention maps of every NNX :class:`SelfAttention2D` in a model during one call."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from aacn_jax.nnx.self_attention import SelfAttention2D

__all__ = ["capture_attention_weights"]


def capture_attention_weights(
    model: nnx.Module, *args: Any, **kwargs: Any
) -> tuple[Any, dict[tuple[str, ...], jax.Array]]:
    """``model(*args, **kwargs)`` with every :class:`SelfAttention2D` in it storing its maps.

    Returns:
      ``(output, weights)``: ``weights`` maps each attention layer's path in the model (a tuple
      of attribute names; ``()`` for ``model`` itself) to its softmax probabilities
      ``[B, N, H, W, H, W]`` (float32, :func:`aacn_jax.functional.attention_weights`). The
      model is left as it was: nothing stays stored, later calls store nothing.
    """
    layers = {path: m for path, m in nnx.iter_modules(model) if isinstance(m, SelfAttention2D)}
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no aacn_jax.nnx.SelfAttention2D layer")
    for layer in layers.values():
        layer.sow_weights = True
    try:
        output = model(*args, **kwargs)
    finally:
        for layer in layers.values():
            layer.sow_weights = False
    weights = {}
    for path, layer in layers.items():
        weights[tuple(str(p) for p in path)] = layer.attention_weights.get_value()
        del layer.attention_weights
    return output, weights
