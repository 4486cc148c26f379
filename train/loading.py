"""A trained model from its workdir: ``train.load(workdir) -> (model, variables, config)``.

Lives in ``train/``, not in the library, because it reads a workdir (the library does no I/O) and
rebuilds the model the way the training script built it (its config, its registry call).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from train import checkpoint, run_record, sharding
from train.train import create_model


def load(
    workdir: str, step: int | None = None
) -> tuple[nn.Module, dict[str, Any], ml_collections.ConfigDict]:
    """The model, its variables (``params``, ``batch_stats``) and the config of a training run.

    Reads ``config.json`` and ``dataset.json`` (written by the run's first start) and the model
    variables of the checkpoint of ``step`` (None: the latest), without the optimizer state,
    replicated on every local device. Apply as ``model.apply(variables, images, train=False)``
    with images prepared as the run's test transform does (``train.predict.prepare``).
    """
    config = run_record.read_config(workdir)
    dataset = run_record.read_dataset(workdir)
    model = create_model(config, dataset["num_classes"])
    images = jnp.zeros((1, *dataset["image_shape"]), jnp.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    replicated = NamedSharding(sharding.make_mesh(jax.local_devices()), PartitionSpec())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    variables = checkpoint.restore_variables(workdir, dict(abstract), step)
    return model, variables, config
