"""shapes (synthetic detection): the plain twin of shapes_aa_retinanet.py (no attention in the backbone).

Command: python -m train --config train/configs/shapes_retinanet.py  (workdir runs/shapes_retinanet)
Expected: see docs/detection.md (measured next to the AA twin).
Time: see docs/detection.md.

Everything is shapes_aa_retinanet.py's recipe except the backbone: the same ResNet (one basic block
per stage, width 16) without attention-augmented convolutions.
"""

import ml_collections

from train.configs import shapes_aa_retinanet


def get_config() -> ml_collections.ConfigDict:
    config = shapes_aa_retinanet.get_config()
    config.model = "retinanet_resnet18"
    config.model_overrides.backbone_overrides = ml_collections.ConfigDict(
        dict(width=16, stage_sizes=(1, 1, 1, 1))
    )
    return config
