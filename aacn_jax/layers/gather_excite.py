"""Parameter-free Gather-Excite (GE-theta-minus), the paper's GE baseline.

Hu, Shen, Albanie, Sun, Vedaldi. "Gather-Excite: Exploiting Feature Context in Convolutional
Neural Networks", NeurIPS 2018, arXiv:1810.12348.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from aacn_jax import functional as F
from aacn_jax.layers.self_attention import check_image

__all__ = ["GatherExcite"]


def check_extent(extent: int | None) -> None:
    """Raise ValueError unless ``extent`` is None (global) or a positive int."""
    if extent is not None and extent < 1:
        raise ValueError(f"extent={extent} must be >= 1 or None (global)")


class GatherExcite(nn.Module):
    """``x * sigmoid(gather(x))`` where gather averages over a spatial extent; no parameters.

    Attributes:
      extent: None gathers over the whole map (global extent, the GE paper's strongest
        parameter-free variant); an int e gives each pixel the mean of its e x e cell (see
        :func:`aacn_jax.functional.gather_excite`). The AA paper's GE baseline has the
        same parameter count as the plain network, which points at this parameter-free form.
    """

    extent: int | None = None

    def __post_init__(self) -> None:
        check_extent(self.extent)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        check_image(x, "GatherExcite")
        return F.gather_excite(x, self.extent)
