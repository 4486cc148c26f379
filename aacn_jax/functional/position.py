"""Absolute position channels for the paper's position-encoding ablation (section 4.5).

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925,
compare relative logits with 2-D sine embeddings and CoordConv channels given to the attention.
How many sine channels and how they are scaled is not stated in the paper; the choices are below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["coordinate_channels", "position_channel_count", "sinusoidal_channels", "with_position_channels"]


def coordinate_channels(height: int, width: int) -> jax.Array:
    """CoordConv channels ``[H, W, 2]``: row and column coordinates scaled to ``[-1, 1]``.

    A size-1 axis gets coordinate 0. (CoordConv's optional radius channel is not used.)
    """
    rows = jnp.linspace(-1.0, 1.0, height) if height > 1 else jnp.zeros((1,))
    cols = jnp.linspace(-1.0, 1.0, width) if width > 1 else jnp.zeros((1,))
    grid = jnp.meshgrid(rows, cols, indexing="ij")
    return jnp.stack(grid, axis=-1)


def sinusoidal_channels(height: int, width: int, channels: int) -> jax.Array:
    """2-D Transformer sine embedding ``[H, W, channels]`` of integer pixel positions.

    The first half of the channels encodes the row, the second half the column; each half is
    ``[sin(p * f_i), cos(p * f_i)]`` with frequencies ``f_i = 10000 ** (-i / (channels / 4))``.
    ``channels`` must be a positive multiple of 4.
    """
    if channels < 4 or channels % 4:
        raise ValueError(f"channels={channels} must be a positive multiple of 4")
    quarter = channels // 4
    freqs = 10000.0 ** (-jnp.arange(quarter) / quarter)

    def encode(length: int) -> jax.Array:  # [L, channels / 2]
        angles = jnp.arange(length)[:, None] * freqs[None, :]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

    rows = jnp.broadcast_to(encode(height)[:, None, :], (height, width, 2 * quarter))
    cols = jnp.broadcast_to(encode(width)[None, :, :], (height, width, 2 * quarter))
    return jnp.concatenate([rows, cols], axis=-1)


def position_channel_count(position: str, sinusoidal_channels: int) -> int:
    """How many channels :func:`with_position_channels` appends for ``position``."""
    return {"coordconv": 2, "sinusoidal": sinusoidal_channels}.get(position, 0)


def with_position_channels(x: jax.Array, position: str, channels: int) -> jax.Array:
    """``[B, H, W, C] -> [B, H, W, C + position_channel_count(position, channels)]``.

    ``"coordconv"`` appends :func:`coordinate_channels`, ``"sinusoidal"`` appends ``channels``
    :func:`sinusoidal_channels`; any other position (``"relative"``, ``"none"``) returns x.
    """
    batch, height, width, _ = x.shape
    if position == "coordconv":
        extra = coordinate_channels(height, width)
    elif position == "sinusoidal":
        extra = sinusoidal_channels(height, width, channels)
    else:
        return x
    extra = jnp.broadcast_to(extra.astype(x.dtype), (batch, height, width, extra.shape[-1]))
    return jnp.concatenate([x, extra], axis=-1)
