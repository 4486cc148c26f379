"""Parameter-free Gather-Excite as a Flax NNX module, the paper's GE baseline.

Hu, Shen, Albanie, Sun, Vedaldi. "Gather-Excite", NeurIPS 2018, arXiv:1810.12348. The twin of
:class:`aacn_jax.layers.GatherExcite`.
"""

from __future__ import annotations

import jax
from flax import nnx

from aacn_jax import functional as F
from aacn_jax.layers.gather_excite import check_extent
from aacn_jax.layers.self_attention import check_image

__all__ = ["GatherExcite"]


class GatherExcite(nnx.Module):
    """``x * sigmoid(gather(x))``; ``extent=None`` gathers over the whole map, an int e over e x e
    cells (see :func:`aacn_jax.functional.gather_excite`). No parameters."""

    def __init__(self, extent: int | None = None):
        check_extent(extent)
        self.extent = extent

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        check_image(x, "GatherExcite")
        return F.gather_excite(x, self.extent)
