"""COCO 2017 detection, RetinaNet on ResNet-50 (the paper's detection baseline: 36.8 AP).

Command: python -m train --config train/configs/coco_retinanet_resnet50.py --config.data_dir=/path/to/coco
  (data_dir holds annotations/instances_{train,val}2017.json, train2017/ and val2017/)
Expected: 36.8 COCO AP on val2017 (the paper's table; with an ImageNet-trained backbone, see below).
Time: not measured here (no accelerator was available).

The paper says RetinaNet, 640x640 images and the AA backbone; the rest of its detection recipe is
not stated in it. Values below are TF's TPU RetinaNet recipe (the code base of the paper's
authors; "standard recipe, not stated in the paper"): batch 64, SGD with momentum 0.9, learning
rate 0.08 at batch 64 with a linear warm-up over the first epoch and x0.1 steps at epochs 8 and 11
(of 12), weight decay 1e-4, random horizontal flips, focal loss alpha 0.25 / gamma 2, Huber box
loss (delta 0.1, weight 50), anchors of 3 scales x 3 aspect ratios at P3-P7 with anchor scale 4.
RetinaNet's usual start, an ImageNet-trained backbone (the paper's numbers assume one; it does
not say): --config.init_from=runs/imagenet_resnet50, the workdir of a finished
train/configs/imagenet_resnet50.py run (train/warm_start.py adopts its weights). The 80 classes
are the instances file's categories in the order of their ids (COCO's ids run to 90).
"""

import ml_collections

from train.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.task = "detection"
    config.dataset = "coco"
    config.image_size = 640
    config.model = "retinanet_resnet50"
    config.model_overrides = ml_collections.ConfigDict()
    config.dtype = "bfloat16"

    config.batch_size = 64
    config.base_batch_size = 64
    config.learning_rate = 0.08
    config.lr_schedule = "step"
    config.warmup_epochs = 1.0
    config.lr_decay_epochs = (8, 11)
    config.lr_decay_factor = 0.1
    config.num_epochs = 12.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    config.data_workers = 8

    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 1000
    return config
