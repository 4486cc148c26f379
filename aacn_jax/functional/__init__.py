"""Pure jax.numpy functions for attention-augmented convolutions; no Flax.

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv:1904.09925.
"""

from aacn_jax.functional.attention import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_MEMORY_BUDGET_BYTES,
    IMPLEMENTATIONS,
    self_attention_2d,
)
from aacn_jax.functional.excite import gather_excite, squeeze_excite
from aacn_jax.functional.fused import fold_relative_logits
from aacn_jax.functional.heads import merge_heads, split_heads
from aacn_jax.functional.pooling import mean_pool
from aacn_jax.functional.position import (
    coordinate_channels,
    position_channel_count,
    sinusoidal_channels,
    with_position_channels,
)
from aacn_jax.functional.relative import (
    absolute_table,
    rel_to_abs,
    relative_index,
    relative_logit_factors,
    relative_logits,
    resize_relative_table,
)
from aacn_jax.functional.weights import attention_weights

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "IMPLEMENTATIONS",
    "absolute_table",
    "attention_weights",
    "coordinate_channels",
    "fold_relative_logits",
    "gather_excite",
    "mean_pool",
    "merge_heads",
    "position_channel_count",
    "rel_to_abs",
    "relative_index",
    "relative_logit_factors",
    "relative_logits",
    "resize_relative_table",
    "self_attention_2d",
    "sinusoidal_channels",
    "split_heads",
    "squeeze_excite",
    "with_position_channels",
]
