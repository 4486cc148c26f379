"""The training script of aacn_jax: ``python -m train --config train/configs/<recipe>.py``."""
