"""What a workdir records of its run: ``config.json`` and ``dataset.json``.

Written by the first start of ``python -m train`` in a workdir and checked by every later one, so
that a workdir holds one model trained on one data set, and so that ``--eval_only``,
:func:`train.load` and ``python -m train.predict`` need nothing but the workdir.
``dataset.json``: the data set's name, number of classes, image shape and class names.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from train.errors import WorkdirError

CONFIG_FILE, DATASET_FILE = "config.json", "dataset.json"
# The keys that define the model and its inputs: a resumed run must not change them. (The
# attention implementation computes the same function: a run may resume on another platform.)
IDENTITY_KEYS = ("model", "model_overrides", "dataset", "image_size")
FREE_OVERRIDES = ("attention_implementation",)


def write_or_check(
    workdir: str, config: ml_collections.ConfigDict, dataset: dict[str, Any], *, write: bool = True
) -> None:
    """Record the run in a new workdir (if ``write``); in a recorded one, raise WorkdirError if it is
    another run."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        recorded = read_config(workdir)
        changed = [key for key in IDENTITY_KEYS if _plain(recorded.get(key)) != _plain(config.get(key))]
        if changed:
            differences = ", ".join(f"{key}: {recorded.get(key)!r} -> {config.get(key)!r}" for key in changed)
            raise WorkdirError(
                f"workdir {workdir} holds another run ({differences}; recorded in {path}): "
                "use another --workdir, or the recorded values to resume it"
            )
        return
    if not write:
        return
    _write_json(os.path.join(workdir, DATASET_FILE), dataset)
    _write_json(path, json.loads(config.to_json_best_effort()))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(_read_json(workdir, CONFIG_FILE))


def read_dataset(workdir: str) -> dict[str, Any]:
    return _read_json(workdir, DATASET_FILE)


def _plain(value: Any) -> Any:
    """A config value as JSON would give it back (ConfigDicts as dicts, tuples as lists), without
    the overrides that leave the model's function unchanged."""
    value = json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))
    return {k: v for k, v in value.items() if k not in FREE_OVERRIDES} if isinstance(value, dict) else value


def _read_json(workdir: str, name: str) -> dict[str, Any]:
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no {name} in {workdir}: not a workdir of python -m train (its first start writes it)"
        )
    with open(path) as file:
        return json.load(file)


def _write_json(path: str, value: Any) -> None:
    """Write atomically: a killed process leaves the old file or the new one, never half of one."""
    with open(path + ".tmp", "w") as file:
        json.dump(value, file, indent=1)
    os.replace(path + ".tmp", path)
