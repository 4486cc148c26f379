"""The model zoo in Flax NNX: each registered linen model wrapped with ``flax.nnx.bridge``.

A native NNX copy of every ResNet and Wide-ResNet would duplicate the zoo's ~800 lines of model
structure; the bridge keeps one definition, with parameter paths identical to linen's. The
layers themselves have native NNX twins (:mod:`aacn_jax.nnx`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from aacn_jax.nnx.convert import load_linen_variables

__all__ = ["ZooModel"]


class ZooModel(nnx.Module):
    """A linen zoo model as an NNX module, initialised for ``input_shape`` ``(H, W, C)``.

    ``model(x, train=...)`` returns what the linen model returns (float32 logits, a RetinaNet's
    pair); in training mode it updates the BatchNorm statistics in place (and draws dropout keys
    from ``rngs``). ``train=None`` follows the
    NNX mode: training after construction or ``model.train()``, inference after
    ``model.eval()``. ``model.linen_module`` is the linen model; ``model.bridged`` (its
    ``nnx.bridge.ToNNX`` wrapper) holds the variables under the linen names, which
    :func:`aacn_jax.nnx.linen_variables` and :func:`aacn_jax.nnx.load_linen_variables` convert.

    Args:
      module: the linen model (from :func:`aacn_jax.models.create`).
      input_shape: the image size the relative tables are sized for, as linen's ``init`` input.
      rngs: ``nnx.Rngs`` for initialisation and dropout.
      variables: linen variables to start from (e.g. ``train.load``'s); the model is then
        built abstractly (traced, not run) and takes them, which is much faster than an
        initialisation that is thrown away.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        input_shape: Sequence[int],
        rngs: nnx.Rngs,
        variables: Mapping[str, Any] | None = None,
    ):
        self.linen_module = module
        self.use_running_average = False
        example = jnp.zeros((1, *input_shape), jnp.float32)
        if variables is None:
            self.bridged = nnx.bridge.ToNNX(module, rngs=rngs)
            nnx.bridge.lazy_init(self.bridged, example, train=False)
            return
        self.bridged = nnx.eval_shape(
            lambda: nnx.bridge.lazy_init(nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0)), example, train=False)
        )
        self.bridged.to_nnx__rngs = rngs.fork()  # concrete keys for dropout, in place of the traced ones
        load_linen_variables(self, variables)

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> Any:
        """``[B, H, W, C]`` images -> the linen model's output: ``[B, num_classes]`` float32 logits, or
        a detector's tuple (``RetinaNet``: class logits and box deltas)."""
        train = not self.use_running_average if train is None else train
        mutable = ["batch_stats"] if train else False
        return self.bridged(x, train=train, mutable=mutable)
