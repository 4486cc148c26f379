"""CIFAR-100, AA-WRN-28-10: the first convolution of every residual block attention-augmented
(kappa = 2 upsilon = 0.2, 8 heads, at least 20 key dimensions per head).

Command: python -m train --config train/configs/cifar100_aa_wrn28_10.py
Expected: 81.6% test top-1, 95.2% top-5 (the paper's table; 36.2M parameters).
Time: not measured here (no accelerator was available): 200 epochs of 390 steps at batch 128.

Everything else is the recipe of cifar100_wrn28_10.py (the standard WRN recipe, not stated in the paper).
"""

import ml_collections

from train.configs import cifar100_wrn28_10


def get_config() -> ml_collections.ConfigDict:
    config = cifar100_wrn28_10.get_config()
    config.model = "aa_wrn28_10"
    return config
