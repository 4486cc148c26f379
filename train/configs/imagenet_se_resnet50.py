"""ImageNet, SE-ResNet-50: Squeeze-and-Excitation (reduction 16) on every residual branch
(the paper's SE baseline).

Command: python -m train --config train/configs/imagenet_se_resnet50.py --config.data_dir=/path/to/imagenet
Expected: 77.5% top-1, 93.7% top-5 (the paper's table; 28.1M parameters).
Time: not measured here (no accelerator was available): 90 epochs of 312 steps at batch 4096.

Everything else is the recipe of imagenet_resnet50.py (the standard large-batch ResNet recipe,
not stated in the paper).
"""

import ml_collections

from train.configs import imagenet_resnet50


def get_config() -> ml_collections.ConfigDict:
    config = imagenet_resnet50.get_config()
    config.model = "se_resnet50"
    return config
