"""The model registry: ``create(name, *, num_classes, **overrides)`` and ``list_models()``.

Each registered name is a small factory function (timm style) that fills in the data of one
variant (stage sizes, block type, which convolutions are augmented, ...) and builds a generic
module with :func:`build`. Names are lowercase (``aa_resnet50``, ``aa_wrn28_10``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import flax.linen as nn
from flax import nnx

from aacn_jax.nnx.zoo import ZooModel

__all__ = ["APIS", "ModelEntry", "build", "create", "get_entry", "list_models", "register"]

IMAGENET_INPUT = (224, 224, 3)
CIFAR_INPUT = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered model.

    Attributes:
      name: registry name.
      factory: ``factory(*, num_classes, **overrides) -> nn.Module``.
      input_shape: the ``(H, W, C)`` image size the model is meant for; parameter counts and
        :func:`aacn_jax.models.summary` use it (relative position tables are sized by the
        feature maps seen at init).
      num_classes: the class count of the model's reference setting (1000 for ImageNet, 100 for
        the CIFAR-100 Wide-ResNets of the paper), used by ``summary`` when none is given.
    """

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int


_MODELS: dict[str, ModelEntry] = {}


def register(
    name: str, *, input_shape: tuple[int, int, int], num_classes: int
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory`` under ``name``; the factory is returned unchanged."""
    if name != name.lower():
        raise ValueError(f"model name={name!r} must be lowercase")

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model name={name!r} is already registered")
        _MODELS[name] = ModelEntry(name, factory, image_shape(input_shape), num_classes)
        return factory

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_MODELS)


def get_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of ``name``; unknown names raise ValueError listing close matches."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f"; did you mean one of {close}?" if close else ""
        raise ValueError(f"unknown model name={name!r}{hint} (list_models() gives all {len(_MODELS)} names)")
    return _MODELS[name]


APIS = ("linen", "nnx")


@overload
def create(
    name: str,
    *,
    num_classes: int,
    api: Literal["linen"] = "linen",
    rngs: None = None,
    input_shape: None = None,
    **overrides: Any,
) -> nn.Module: ...


@overload
def create(
    name: str,
    *,
    num_classes: int,
    api: Literal["nnx"],
    rngs: nnx.Rngs,
    input_shape: Sequence[int] | None = None,
    **overrides: Any,
) -> ZooModel: ...


def create(
    name: str,
    *,
    num_classes: int,
    api: str = "linen",
    rngs: nnx.Rngs | None = None,
    input_shape: Sequence[int] | None = None,
    **overrides: Any,
) -> nn.Module | ZooModel:
    """Build the registered model ``name`` with ``num_classes`` outputs.

    ``overrides`` replace the variant's defaults, e.g. ``dtype=jnp.bfloat16``,
    ``attention_position="none"``, ``kappa=0.3``, ``num_heads=4``; unknown override names raise
    ValueError listing the accepted ones.

    ``api="linen"`` (default) returns the ``flax.linen`` module: ``__call__(x, *, train)`` takes
    NHWC float images and returns float32 logits; BatchNorm statistics live in ``batch_stats``.
    ``api="nnx"`` returns it as an initialised :class:`aacn_jax.nnx.ZooModel`; it needs
    ``rngs`` (``nnx.Rngs``) and sizes the relative tables for ``input_shape`` ``(H, W, C)``
    (default: the entry's ``input_shape``, e.g. 224x224x3 for the ImageNet models).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int")
    if api not in APIS:
        raise ValueError(f"api={api!r} must be one of {APIS}")
    entry = get_entry(name)
    if api == "linen":
        if rngs is not None or input_shape is not None:
            raise ValueError("rngs and input_shape are for api='nnx'; a linen model gets both at init")
        return entry.factory(num_classes=num_classes, **overrides)
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(f"api='nnx' needs rngs=nnx.Rngs(seed) to initialise the model, got rngs={rngs!r}")
    shape = entry.input_shape if input_shape is None else image_shape(input_shape)
    module = entry.factory(num_classes=num_classes, **overrides)
    return ZooModel(module, input_shape=shape, rngs=rngs)


def image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as ``(H, W, C)``; ValueError unless three positive ints."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape={shape!r} must be (H, W, C) of positive ints")
    height, width, channels = shape
    return height, width, channels


def module_fields(module_cls: type[nn.Module]) -> list[str]:
    """The constructor arguments of a Flax module class, without Flax's ``parent`` and ``name``."""
    return [f.name for f in dataclasses.fields(module_cls) if f.init and f.name not in ("parent", "name")]


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def build(
    module_cls: type[ModuleT],
    defaults: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    extra_keys: Iterable[str] = (),
) -> ModuleT:
    """``module_cls(**{**defaults, **overrides})`` after checking every override name.

    Args:
      extra_keys: names the calling factory consumed itself (e.g. ``depth``), listed as
        accepted in the error message.
    """
    accepted = module_fields(module_cls)
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        options = sorted({*accepted, *extra_keys})
        raise ValueError(
            f"unknown override(s) {unknown} for {module_cls.__name__}; accepted overrides: {options}"
        )
    return module_cls(**{**defaults, **overrides})
