"""CIFAR-100, SE-WRN-28-10: Squeeze-and-Excitation (reduction 16) on every residual branch
(the paper's SE baseline).

Command: python -m train --config train/configs/cifar100_se_wrn28_10.py
Expected: 81.0% test top-1, 95.3% top-5 (the paper's table; 36.5M parameters).
Time: not measured here (no accelerator was available): 200 epochs of 390 steps at batch 128.

Everything else is the recipe of cifar100_wrn28_10.py (the standard WRN recipe, not stated in the paper).
"""

import ml_collections

from train.configs import cifar100_wrn28_10


def get_config() -> ml_collections.ConfigDict:
    config = cifar100_wrn28_10.get_config()
    config.model = "se_wrn28_10"
    return config
