"""The Colab quickstart's run (colabs/quickstart.ipynb): AA-WRN-16-4 on CIFAR-100, sized for a free
Colab TPU v5e-1 session.

The paper's AA-WRN-28-10 recipe (cifar100_aa_wrn28_10.py: batch 128, bfloat16, SGD with Nesterov
momentum) at depth 16 and width 4 (2.9M parameters instead of 36.3M), for 30 epochs with a cosine
schedule instead of 200 with step decays.

Command: python -m train --config train/configs/quickstart.py
Fits Colab's chip? python -m train.compile --topology v5e:1x1 --config train/configs/quickstart.py
Expected: not measured (no TPU was available while this was written); the paper's 81.6% top-1 is
for AA-WRN-28-10.
Time: not measured: 30 epochs of 390 steps at batch 128.
"""

import ml_collections

from train.configs import cifar100_aa_wrn28_10


def get_config() -> ml_collections.ConfigDict:
    config = cifar100_aa_wrn28_10.get_config()
    config.model_overrides.depth = 16
    config.model_overrides.widen_factor = 4
    config.num_epochs = 30.0
    config.lr_schedule = "cosine"
    config.eval_every_steps = 780  # every 2 epochs of 390 steps
    return config
