"""Channel gating by global context: the paper's squeeze-and-excitation and gather-excite baselines.

Hu, Shen, Sun. "Squeeze-and-Excitation Networks", CVPR 2018, arXiv:1709.01507.
Hu, Shen, Albanie, Sun, Vedaldi. "Gather-Excite", NeurIPS 2018, arXiv:1810.12348.
The linen and NNX layers hold the parameters and call these.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from aacn_jax.functional.pooling import mean_pool

__all__ = ["gather_excite", "squeeze_excite"]


def squeeze_excite(
    x: jax.Array, reduce: Callable[[jax.Array], jax.Array], expand: Callable[[jax.Array], jax.Array]
) -> jax.Array:
    """``x * sigmoid(expand(relu(reduce(mean_hw(x)))))`` for ``x [B, H, W, C]``.

    ``reduce`` and ``expand`` are the two fully connected layers (C -> C/r -> C).
    """
    squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)  # B, 1, 1, C
    gate = jax.nn.sigmoid(expand(jax.nn.relu(reduce(squeezed))))  # B, 1, 1, C
    return x * gate.astype(x.dtype)


def gather_excite(x: jax.Array, extent: int | None) -> jax.Array:
    """Parameter-free gather-excite ``x * sigmoid(gather(x))`` for ``x [B, H, W, C]``.

    ``extent=None`` gathers the mean of the whole map; an int e averages e x e windows with
    stride e (:func:`mean_pool`) and gives each pixel the mean of the cell that holds it.
    """
    if extent is None:
        gathered = jnp.mean(x, axis=(1, 2), keepdims=True)  # B, 1, 1, C
    else:
        height, width = x.shape[1:3]
        gathered = mean_pool(x, (extent, extent))  # B, ceil(H / e), ceil(W / e), C
        gathered = jnp.repeat(jnp.repeat(gathered, extent, axis=1), extent, axis=2)
        top, left = (-height % extent) // 2, (-width % extent) // 2  # mean_pool's padding before
        gathered = gathered[:, top : top + height, left : left + width]  # B, H, W, C
    return x * jax.nn.sigmoid(gathered)
