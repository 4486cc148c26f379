"""Model zoo: ResNets and Wide-ResNets with attention-augmented (AA), SE and GE variants.

``create(name, *, num_classes, **overrides)`` builds a registered model, ``list_models()`` lists
the names, ``summary(name, input_shape)`` reports parameters and FLOPs per stage.
"""

from aacn_jax.models import resnet, wide_resnet  # noqa: F401  (registers the models)
from aacn_jax.models.mnasnet import MnasNet
from aacn_jax.models.registry import ModelEntry, create, get_entry, list_models, register
from aacn_jax.models.resnet import ResNet
from aacn_jax.models.retinanet import RetinaNet
from aacn_jax.models.summary import ModelSummary, StageSummary, count_params, summary
from aacn_jax.models.wide_resnet import WideResNet

__all__ = [
    "MnasNet",
    "ModelEntry",
    "ModelSummary",
    "ResNet",
    "RetinaNet",
    "StageSummary",
    "WideResNet",
    "count_params",
    "create",
    "get_entry",
    "list_models",
    "register",
    "summary",
]
