"""CIFAR-100, Wide-ResNet-28-10: the paper's convolutional baseline; base of the AA/SE/GE twins.

Command: python -m train --config train/configs/cifar100_wrn28_10.py
  (fetches cifar-100-python.tar.gz into data/ on first use; workdir runs/cifar100_wrn28_10)
Expected: 80.3% test top-1, 95.0% top-5 (the paper's table; 36.5M parameters).
Time: not measured here (no accelerator was available): 200 epochs of 390 steps at batch 128.

Recipe: the standard Wide-ResNet recipe (Zagoruyko & Komodakis 2016), not stated in the paper:
SGD with Nesterov momentum 0.9, learning rate 0.1 at batch 128, weight decay 5e-4 on the
convolution and dense kernels, 200 epochs, learning rate x0.2 at epochs 60, 120 and 160, pad-4
random crop + horizontal flip. Also not stated in the paper: no dropout, no label smoothing,
bfloat16 compute (float32 parameters).
"""

import ml_collections

from train.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = "cifar100"
    config.data_dir = "data"
    config.model = "wrn28_10"
    config.model_overrides = ml_collections.ConfigDict()
    config.dtype = "bfloat16"

    config.batch_size = 128
    config.base_batch_size = 128
    config.learning_rate = 0.1
    config.num_epochs = 200.0
    config.lr_schedule = "step"
    config.lr_decay_epochs = (60, 120, 160)
    config.lr_decay_factor = 0.2
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 5e-4
    config.label_smoothing = 0.0

    config.log_every_steps = 100
    config.eval_every_steps = 3900  # 10 epochs of 390 steps
    config.checkpoint_every_steps = 1950  # 5 epochs
    return config
