"""The training script of aacn_jax: ``python -m train --config train/configs/<recipe>.py``.

``train.load(workdir)`` returns a trained model, its variables and config;
``python -m train.predict --workdir DIR IMAGE...`` classifies pictures with it.
"""

from train.loading import load

__all__ = ["load"]
