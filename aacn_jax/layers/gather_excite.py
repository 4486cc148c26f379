"""Parameter-free Gather-Excite (GE-theta-minus), the paper's GE baseline.

Hu, Shen, Albanie, Sun, Vedaldi. "Gather-Excite: Exploiting Feature Context in Convolutional
Neural Networks", NeurIPS 2018, arXiv:1810.12348.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacn_jax.layers.self_attention import check_image

__all__ = ["GatherExcite"]


class GatherExcite(nn.Module):
    """``x * sigmoid(gather(x))`` where gather averages over a spatial extent; no parameters.

    Attributes:
      extent: None gathers over the whole map (global extent, the GE paper's strongest
        parameter-free variant); an int e averages e x e windows with stride e and
        nearest-neighbour upsamples back to the input size. The AA paper's GE baseline has the
        same parameter count as the plain network, which points at this parameter-free form.
    """

    extent: int | None = None

    def __post_init__(self):
        if self.extent is not None and self.extent < 1:
            raise ValueError(f"extent={self.extent} must be >= 1 or None (global)")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        check_image(x, "GatherExcite")
        if self.extent is None:
            gathered = jnp.mean(x, axis=(1, 2), keepdims=True)  # B, 1, 1, C
        else:
            window = (self.extent, self.extent)
            gathered = nn.avg_pool(x, window, window, padding="SAME", count_include_pad=False)
            gathered = jnp.repeat(jnp.repeat(gathered, self.extent, axis=1), self.extent, axis=2)
            gathered = gathered[:, : x.shape[1], : x.shape[2]]  # B, H, W, C
        return x * nn.sigmoid(gathered)
