"""The training script of aacn_jax: ``python -m train --config train/configs/<recipe>.py``.

``train.load(workdir)`` returns a trained model, its variables and config (from
``train/inference.py``, imported when first asked for: ``import train.<module>`` loads nothing
else); ``python -m train.predict --workdir DIR IMAGE...`` classifies pictures with it.

Layout, imports one way: ``data/`` (the data sets) and ``tasks/`` (what differs per task) ->
``state.py`` (model, optimizer, train state) -> ``loop.py`` (the jitted steps and the loop) ->
``__main__.py`` (the CLI); ``inference.py`` (trained models) -> ``predict.py`` (its CLI).
"""

from typing import Any

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from train.inference import load

        return load
    raise AttributeError(f"module 'train' has no attribute {name!r}")
