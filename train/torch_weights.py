"""PyTorch ResNet weights as a workdir of this project: ``python -m train.convert`` (``train/convert.py``).

A torchvision or timm ResNet-18/34/50/101/152 state dict (``.pth`` read by ``torch.load(...,
weights_only=True)``, which unpickles tensors and containers only, or ``.safetensors`` read without
torch) becomes the variables of the zoo's ``resnet*`` of the same depth, and is written as the
checkpoint of step 0 of a workdir with ``config.json`` and ``dataset.json``, so that
:func:`train.load`, ``--eval_only``, ``python -m train.predict`` and ``--config.init_from`` read it
as any trained run.

The mapping (torchvision's names; timm's ``resnet*`` use the same ones):

========================================  ==========================================================
torch                                     zoo
========================================  ==========================================================
``conv1.weight`` [O, I, kh, kw]           ``stem/conv/kernel`` [kh, kw, I, O]
``bn1.{weight,bias}``                     ``stem/bn/{scale,bias}``
``bn1.running_{mean,var}``                ``batch_stats``: ``stem/bn/{mean,var}``
``layer{s}.{b}.conv{k}`` / ``.bn{k}``     ``stage{s}/block{b+1}/conv{k}`` / ``bn{k}``
``layer{s}.{b}.downsample.{0,1}``         ``stage{s}/block{b+1}/proj`` / ``proj_bn``
``fc.weight`` [classes, C], ``fc.bias``   ``head/fc/kernel`` [C, classes], ``head/fc/bias``
========================================  ==========================================================

The zoo computes the same function: BatchNorm epsilon 1e-5, the stride on a bottleneck's 3x3
convolution (torchvision's "v1.5"), the stem's 7x7/2 convolution padded by 3 and 3x3/2 max pool by
1, and, with ``conv_padding="symmetric"`` (written into the converted config), the block 3x3
convolutions padded by 1 on every side as in torch. ``num_batches_tracked`` is not used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from safetensors import SafetensorError
from safetensors.numpy import load_file

from aacn_jax.models.resnet import STAGE_SIZES
from train import checkpoint, preflight, run_record
from train.configs import default
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.errors import InputError
from train.state import TrainState, create_model, create_optimizer

SOURCES = ("torchvision", "timm")
MODELS = tuple(f"resnet{depth}" for depth in (18, 34, 50, 101, 152))
# What the weights were evaluated with, by their makers (the project's ImageNet test transform is in
# dataset.json's "preprocessing").
TRAINED_WITH = {
    "torchvision": "resize 256 (bilinear), centre crop 224, mean/std (0.485, 0.456, 0.406) / (0.229, "
    "0.224, 0.225) of 0..1 values (the IMAGENET1K_V2 weights: resize 232)",
    "timm": "the model's pretrained_cfg: ImageNet mean/std, crop_pct 0.875-0.95, bilinear or bicubic, "
    "some evaluated at 288 (e.g. resnet50.a1_in1k: bicubic, crop_pct 0.95, 288)",
}
_BLOCK_LAYER = {"proj": "downsample.0", "proj_bn": "downsample.1"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` or ``.pth`` file (a state dict, or a dict holding one under
    ``state_dict`` or ``model``) as numpy arrays; InputError for a file that does not read."""
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise InputError(
                f"--weights {path} does not read as safetensors ({error}): truncated or another format"
            ) from error
    try:
        import torch  # optional: only .pth files need it
    except ImportError as error:
        raise InputError(
            f"--weights {path}: reading a .pth file needs PyTorch (pip install torch), or give the "
            "weights as .safetensors"
        ) from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a truncated or hostile file in several exception types
        first_sentence = " ".join(str(error).split()).split(". ")[0]
        raise InputError(
            f"--weights {path} does not load with torch.load(weights_only=True) ({type(error).__name__}: "
            f"{first_sentence}): truncated, or it holds objects other than tensors"
        ) from error
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InputError(f"--weights {path} holds a {type(loaded).__name__}, not a state dict of tensors")
    return {name: tensor.detach().float().numpy() for name, tensor in loaded.items()}


def torch_name(path: tuple[str, ...]) -> str:
    """The torch name of a zoo variable ``(collection, *module path, leaf)``."""
    _, *modules, leaf = path
    if modules[0] == "stem":
        layer = {"conv": "conv1", "bn": "bn1"}[modules[1]]
    elif modules[0] == "head":
        layer = "fc"
    else:
        stage, block, name = modules
        layer = f"layer{stage.removeprefix('stage')}.{int(block.removeprefix('block')) - 1}."
        layer += _BLOCK_LAYER.get(name, name)
    return f"{layer}.{_LEAF[leaf]}"


def _to_zoo(path: tuple[str, ...], tensor: np.ndarray) -> np.ndarray:
    """A torch tensor in the zoo's layout: OIHW -> HWIO kernels, the Dense kernel [in, out]."""
    if path[-1] == "kernel":
        return tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T
    return tensor


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """A zoo variable's shape in torch's layout (the inverse of :func:`_to_zoo`)."""
    if path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    return shape


def describe(state: Mapping[str, np.ndarray]) -> str:
    """What a state dict looks like: its ResNet stage sizes and block type, or its first names."""
    blocks = [
        len({m.group(1) for name in state if (m := re.match(rf"layer{s}\.(\d+)\.", name))})
        for s in range(1, 5)
    ]
    if not all(blocks):
        return f"not a torchvision ResNet: its first tensors are {sorted(state)[:3]}"
    kind = "bottleneck" if any(".conv3." in name for name in state) else "basic"
    named = [f"resnet{d}" for d, sizes in STAGE_SIZES.items() if sizes == (kind, tuple(blocks))]
    return f"{kind} blocks {tuple(blocks)}" + (f" ({named[0]})" if named else "")


def zoo_variables(state: Mapping[str, np.ndarray], abstract: Any, model: str) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` shaped as ``abstract`` (the zoo model's ``eval_shape``d
    variables) from ``state``; InputError naming the first tensor missing, misshapen or left over."""
    found = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        path = tuple(k.key for k in key_path)
        name = torch_name(path)
        if name not in state:
            raise InputError(
                f"no tensor {name} (for {'/'.join(path)}): it is not {model} ({describe(state)})"
            )
        value = _to_zoo(path, np.asarray(state[name], np.float32))
        if value.shape != leaf.shape:
            raise InputError(
                f"{name} has shape {list(state[name].shape)}, but {model}'s {'/'.join(path)} needs "
                f"{list(_torch_shape(path, leaf.shape))} ({describe(state)})"
            )
        found[path] = value
    used = {torch_name(path) for path in found}
    left = sorted(name for name in state if name not in used and not name.endswith(".num_batches_tracked"))
    if left:
        raise InputError(
            f"tensor {left[0]} (and {len(left) - 1} more) has no place in {model} ({describe(state)})"
        )
    variables: dict[str, Any] = {}
    for path, value in found.items():
        node = variables
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return variables


def converted_config(
    model: str, state: Mapping[str, np.ndarray], *, image_size: int, data_dir: str
) -> ml_collections.ConfigDict:
    """``train/configs/default.py`` for ``model`` on ImageNet, with the overrides the weights need:
    torch's padding, and the stem's width where it is not 64 (a reduced-width test network)."""
    for name in ("conv1.weight", "fc.weight"):
        if name not in state or state[name].ndim not in (2, 4):
            raise InputError(f"no tensor {name} of a ResNet: it is not {model} ({describe(state)})")
    config = default.get_config()
    config.model, config.dataset, config.data_dir, config.image_size = model, "imagenet", data_dir, image_size
    overrides: dict[str, Any] = {"conv_padding": "symmetric"}
    if state["conv1.weight"].shape[0] != 64:
        overrides["width"] = int(state["conv1.weight"].shape[0])
    config.model_overrides = ml_collections.ConfigDict(overrides)
    return config


def dataset_record(
    config: ml_collections.ConfigDict, num_classes: int, class_names: list[str], source: str
) -> dict[str, Any]:
    """``dataset.json`` of a converted workdir: what :func:`train.loop.dataset_record` writes for an
    ImageNet run, and the preprocessing: this project's test transform and the weights' own."""
    size = config.image_size
    return {
        "task": "classification",
        "dataset": "imagenet",
        "image_size": size,
        "num_classes": num_classes,
        "image_shape": [size, size, 3],
        "class_names": class_names,
        "preprocessing": {
            "resize_shorter_side": round(size / 0.875),
            "center_crop": size,
            "interpolation": "bicubic",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "trained_with": f"{source}: {TRAINED_WITH[source]}",
        },
    }


def convert(
    state: Mapping[str, np.ndarray],
    *,
    model: str,
    source: str,
    image_size: int = 224,
    data_dir: str = "data/imagenet",
    class_names: list[str] | None = None,
) -> tuple[ml_collections.ConfigDict, dict[str, Any], dict[str, Any]]:
    """``(config, dataset record, variables)`` of the zoo's ``model`` holding the torch ``state``;
    InputError for anything that does not fit (nothing is written here)."""
    if model not in MODELS:
        raise InputError(f"--model {model}: give one of {MODELS}")
    if source not in SOURCES:
        raise InputError(f"--source {source}: give one of {SOURCES}")
    config = converted_config(model, state, image_size=image_size, data_dir=data_dir)
    num_classes = int(state["fc.weight"].shape[0])
    if class_names is not None and len(class_names) != num_classes:
        raise InputError(
            f"--class_names has {len(class_names)} names for the {num_classes} classes of the weights: "
            "give one name per line, in the order of the classifier's outputs"
        )
    network = create_model(config, num_classes)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: network.init(jax.random.key(0), images, train=False))
    variables = zoo_variables(state, abstract, model)
    return config, dataset_record(config, num_classes, class_names or [], source), variables


def write_workdir(
    workdir: str, config: ml_collections.ConfigDict, record: dict[str, Any], variables: dict[str, Any]
) -> None:
    """The checkpoint of step 0 (a ``TrainState`` with a fresh optimizer state, as ``python -m
    train`` saves it), then ``dataset.json`` and ``config.json``; WorkdirError for a workdir that
    holds a run or cannot be written."""
    if os.path.exists(os.path.join(workdir, run_record.CONFIG_FILE)) or checkpoint.saved_steps(workdir):
        raise InputError(f"--workdir {workdir} holds a run already: give a new folder")
    model = create_model(config, record["num_classes"])
    tx = create_optimizer(config, optax.constant_schedule(config.learning_rate))
    create = lambda variables: TrainState.create(  # jitted, as the loop's init: arrays, step included
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
        skipped_steps=jnp.zeros((), jnp.int32),
    )
    state = jax.jit(create)(variables)
    preflight.check_workdir(workdir, checkpoint_bytes=preflight.state_bytes(state), checkpoints_to_write=1)
    with checkpoint.create_manager(workdir, max_to_keep=1) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    run_record.write_or_check(workdir, config, record)
