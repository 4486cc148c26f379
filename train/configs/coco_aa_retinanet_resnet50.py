"""COCO 2017 detection, RetinaNet on AA-ResNet-50 (the paper: 38.2 AP, against 36.8 for ResNet-50).

Command: python -m train --config train/configs/coco_aa_retinanet_resnet50.py --config.data_dir=/path/to/coco
Expected: 38.2 COCO AP on val2017 (the paper's table, with an ImageNet-trained backbone).
Time: not measured here (no accelerator was available).

The backbone is the zoo's aa_resnet50 (the 3x3 convolutions of stages 3-4 augmented, kappa = 2
upsilon = 0.2, 8 heads); at 640x640 its attention runs on 40x40 and 20x20 maps. Everything else is
coco_retinanet_resnet50.py's recipe (TF's TPU RetinaNet; not stated in the paper); start it from an
ImageNet-trained AA-ResNet-50 with --config.init_from=runs/imagenet_aa_resnet50 (its relative
tables, learned on 14x14 and 7x7 maps, are stretched to 40x40 and 20x20).
"""

import ml_collections

from train.configs import coco_retinanet_resnet50


def get_config() -> ml_collections.ConfigDict:
    config = coco_retinanet_resnet50.get_config()
    config.model = "aa_retinanet_resnet50"
    return config
