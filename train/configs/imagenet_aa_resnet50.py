"""ImageNet, AA-ResNet-50: the 3x3 convolution of every bottleneck attention-augmented
(kappa = 2 upsilon = 0.2, 8 heads, at least 20 key dimensions per head).

Command: python -m train --config train/configs/imagenet_aa_resnet50.py --config.data_dir=/path/to/imagenet
Expected: 77.7% top-1, 93.8% top-5 (the paper's table; 25.8M parameters).
Time: not measured here (no accelerator was available): 90 epochs of 312 steps at batch 4096.

Everything else is the recipe of imagenet_resnet50.py (the standard large-batch ResNet recipe,
not stated in the paper).
"""

import ml_collections

from train.configs import imagenet_resnet50


def get_config() -> ml_collections.ConfigDict:
    config = imagenet_resnet50.get_config()
    config.model = "aa_resnet50"
    return config
