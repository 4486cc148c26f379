"""Flax linen modules for attention-augmented convolutional networks (one concept per file)."""

from aacn_jax.layers.augmented_conv import AugmentedConv, attention_depths
from aacn_jax.layers.gather_excite import GatherExcite
from aacn_jax.layers.self_attention import POSITIONS, SelfAttention2D
from aacn_jax.layers.squeeze_excite import SqueezeExcite

__all__ = [
    "POSITIONS",
    "AugmentedConv",
    "GatherExcite",
    "SelfAttention2D",
    "SqueezeExcite",
    "attention_depths",
]
