"""Flax NNX twins of the layers, and the model zoo as NNX modules.

Same functional core, hyperparameters, errors, parameter names and shapes as the linen layers
in :mod:`aacn_jax.layers`; :func:`linen_variables` and :func:`load_linen_variables` move
parameters between the two forms. ``aacn_jax.models.create(name, num_classes=...,
api="nnx", rngs=nnx.Rngs(0))`` gives a zoo model as a :class:`ZooModel`.
"""

from aacn_jax.nnx.augmented_conv import AugmentedConv
from aacn_jax.nnx.convert import COLLECTIONS, linen_variables, load_linen_variables
from aacn_jax.nnx.gather_excite import GatherExcite
from aacn_jax.nnx.self_attention import AttentionWeights, SelfAttention2D
from aacn_jax.nnx.squeeze_excite import SqueezeExcite
from aacn_jax.nnx.weights import capture_attention_weights
from aacn_jax.nnx.zoo import ZooModel

__all__ = [
    "COLLECTIONS",
    "AttentionWeights",
    "AugmentedConv",
    "GatherExcite",
    "SelfAttention2D",
    "SqueezeExcite",
    "ZooModel",
    "capture_attention_weights",
    "linen_variables",
    "load_linen_variables",
]
