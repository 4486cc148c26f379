"""Squeeze-and-Excitation channel gating as a Flax NNX module, the paper's SE baseline.

Hu, Shen, Sun. "Squeeze-and-Excitation Networks", CVPR 2018, arXiv:1709.01507. The twin of
:class:`aacn_jax.layers.SqueezeExcite`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from aacn_jax import functional as F
from aacn_jax.layers.squeeze_excite import check_reduction
from aacn_jax.nnx.self_attention import check_channels

__all__ = ["SqueezeExcite"]


class SqueezeExcite(nnx.Module):
    """``x * sigmoid(expand(relu(reduce(mean_hw(x)))))``, ``reduce``: C -> max(1, C // reduction).

    Args:
      in_features: channels C.
      reduction: the SE ratio r (16 in the SE paper and in the AA paper's baselines).
      dtype, param_dtype: as in ``flax.nnx``.
      rngs: ``nnx.Rngs`` for the parameter initialisers.
    """

    def __init__(
        self,
        in_features: int,
        reduction: int = 16,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_reduction(reduction)
        self.in_features = in_features
        hidden = max(1, in_features // reduction)
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.reduce = nnx.Linear(in_features, hidden, **dense)
        self.expand = nnx.Linear(hidden, in_features, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        check_channels(x, self.in_features, "SqueezeExcite")
        return F.squeeze_excite(x, self.reduce, self.expand)
