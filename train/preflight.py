"""Checks that run before anything is compiled or trained, so a run fails in seconds, not after an hour:
the config's keys and values, and a workdir that can hold the checkpoints."""

from __future__ import annotations

import difflib
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from train.configs import default
from train.errors import InputError, WorkdirError

CHOICES = {
    "task": ("classification", "detection"),
    "lr_schedule": ("cosine", "step"),
    "nonfinite_policy": ("stop", "skip"),
}
DETECTION_POSITIVE = ("max_boxes", "pre_nms_top_k", "max_detections")
POSITIVE = ("batch_size", "base_batch_size", "log_every_steps", "eval_every_steps", "checkpoint_every_steps")
FREE_SPACE_MARGIN = 1.1  # Orbax's metadata and file-system blocks on top of the arrays' bytes


def _flat_keys(config: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of a nested dict; ``model_overrides`` counts as one key (models.create checks it)."""
    keys = set()
    for name, value in config.items():
        if isinstance(value, dict) and name != "model_overrides":
            keys |= _flat_keys(value, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def check_config(config: ml_collections.ConfigDict) -> None:
    """ValueError for keys that train/configs/default.py does not define (typos are not ignored),
    missing keys, and values out of range."""
    known, given = _flat_keys(default.get_config().to_dict()), _flat_keys(config.to_dict())
    if unknown := sorted(given - known):
        close = {key: difflib.get_close_matches(key, known, 1) for key in unknown}
        hints = [
            f"{key!r}" + (f" (did you mean {close[key][0]!r}?)" if close[key] else "") for key in unknown
        ]
        raise InputError(
            f"unknown config key(s) {', '.join(hints)}; train/configs/default.py defines every key"
        )
    if missing := sorted(known - given):
        raise InputError(
            f"config lacks key(s) {missing}: build configs on train/configs/default.get_config()"
        )
    for key, choices in CHOICES.items():
        if config[key] not in choices:
            raise InputError(f"{key}={config[key]!r} must be one of {choices}")
    for key in POSITIVE:
        if config[key] <= 0:
            raise InputError(f"{key}={config[key]} must be positive")
    if config.max_checkpoints_to_keep < 1:
        raise InputError(f"max_checkpoints_to_keep={config.max_checkpoints_to_keep} must be at least 1")
    if config.max_skipped_steps < 0:
        raise InputError(f"max_skipped_steps={config.max_skipped_steps} must be >= 0")
    check_detection(config.detection)
    if not jnp.issubdtype(jnp.dtype(config.dtype), jnp.floating):
        raise InputError(
            f"dtype={config.dtype!r} must be a floating-point type, e.g. 'float32' or 'bfloat16'"
        )


def check_detection(settings: ml_collections.ConfigDict) -> None:
    """ValueError for ``config.detection`` values out of range (checked for every task: cheap)."""
    for key in DETECTION_POSITIVE:
        if settings[key] < 1:
            raise InputError(f"detection.{key}={settings[key]} must be >= 1")
    if not 0 <= settings.background_iou <= settings.foreground_iou <= 1:
        raise InputError(
            f"detection.background_iou={settings.background_iou} and detection.foreground_iou="
            f"{settings.foreground_iou} must satisfy 0 <= background_iou <= foreground_iou <= 1"
        )
    if not 0 <= settings.nms_iou <= 1:
        raise InputError(f"detection.nms_iou={settings.nms_iou} must be in [0, 1]")
    if settings.max_detections > settings.pre_nms_top_k:
        raise InputError(
            f"detection.max_detections={settings.max_detections} must be <= detection.pre_nms_top_k="
            f"{settings.pre_nms_top_k}"
        )


def state_bytes(abstract_state: Any) -> int:
    """Bytes of the arrays of a tree of ``jax.ShapeDtypeStruct`` (one checkpoint's payload)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))


def check_workdir(workdir: str, *, checkpoint_bytes: int, checkpoints_to_write: int) -> None:
    """OSError unless ``workdir`` exists or can be created, accepts a file, and has room for
    ``checkpoints_to_write`` more checkpoints of ``checkpoint_bytes``."""
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as error:
        raise WorkdirError(
            f"the workdir {workdir} is not writable ({error.strerror}): choose another --workdir",
        ) from error
    free = shutil.disk_usage(workdir).free
    needed = round(checkpoint_bytes * checkpoints_to_write * FREE_SPACE_MARGIN)
    if free < needed:
        mib = 2**20
        raise WorkdirError(
            f"the workdir {workdir} has {free / mib:.1f} MiB free, but this run writes up to "
            f"{checkpoints_to_write} more checkpoints of {checkpoint_bytes / mib:.1f} MiB: free some space, "
            "lower --config.max_checkpoints_to_keep, or choose another --workdir",
        )
