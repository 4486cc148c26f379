"""Squeeze-and-Excitation channel gating, the paper's SE baseline.

Hu, Shen, Sun. "Squeeze-and-Excitation Networks", CVPR 2018, arXiv:1709.01507.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacn_jax import functional as F
from aacn_jax.layers.self_attention import check_image

__all__ = ["SqueezeExcite"]


def check_reduction(reduction: int) -> None:
    """Raise ValueError unless the SE ratio is a positive int."""
    if reduction < 1:
        raise ValueError(f"reduction={reduction} must be >= 1")


class SqueezeExcite(nn.Module):
    """``x * sigmoid(W2 relu(W1 mean_hw(x)))`` with a bottleneck of ``C // reduction`` units (at least 1).

    Attributes:
      reduction: the SE ratio r (16 in the SE paper and in the AA paper's baselines).
      dtype, param_dtype: as in ``flax.linen``.
    """

    reduction: int = 16
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_reduction(self.reduction)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        check_image(x, "SqueezeExcite")
        channels = x.shape[-1]
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        reduce = nn.Dense(max(1, channels // self.reduction), name="reduce", **dense)
        return F.squeeze_excite(x, reduce, nn.Dense(channels, name="expand", **dense))
