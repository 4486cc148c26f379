"""aacn_jax: Attention Augmented Convolutional Networks in JAX/Flax.

Bello, Zoph, Vaswani, Shlens, Le. "Attention Augmented Convolutional Networks", ICCV 2019,
arXiv:1904.09925.
"""

from aacn_jax import detection, functional, models, nnx
from aacn_jax.functional import rel_to_abs, relative_logits, self_attention_2d
from aacn_jax.layers import (
    POSITIONS,
    AugmentedConv,
    GatherExcite,
    SelfAttention2D,
    SqueezeExcite,
    attention_depths,
)

__version__ = "0.1.0"

__all__ = [
    "POSITIONS",
    "AugmentedConv",
    "GatherExcite",
    "SelfAttention2D",
    "SqueezeExcite",
    "attention_depths",
    "detection",
    "functional",
    "models",
    "nnx",
    "rel_to_abs",
    "relative_logits",
    "self_attention_2d",
]
