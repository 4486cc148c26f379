"""CIFAR-100, GE-WRN-28-10: parameter-free global Gather-Excite on every residual branch
(the paper's GE baseline).

Command: python -m train --config train/configs/cifar100_ge_wrn28_10.py
Expected: 79.8% test top-1, 95.0% top-5 (the paper's table; 36.3M parameters).
Time: not measured here (no accelerator was available): 200 epochs of 390 steps at batch 128.

Everything else is the recipe of cifar100_wrn28_10.py (the standard WRN recipe, not stated in the paper).
"""

import ml_collections

from train.configs import cifar100_wrn28_10


def get_config() -> ml_collections.ConfigDict:
    config = cifar100_wrn28_10.get_config()
    config.model = "ge_wrn28_10"
    return config
