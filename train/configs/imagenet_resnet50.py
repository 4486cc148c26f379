"""ImageNet, ResNet-50: the paper's convolutional baseline; base of the AA and SE twins.

Command: python -m train --config train/configs/imagenet_resnet50.py --config.data_dir=/path/to/imagenet
  (data_dir holds an ImageFolder tree train/<class>/*.JPEG + val/<class>/*.JPEG, or TFDS's
  imagenet2012 prepared for tfds.data_source; workdir runs/imagenet_resnet50)
Expected: 76.4% top-1, 93.1% top-5 on the validation set (the paper's table; 25.6M parameters).
Time: not measured here (no accelerator was available): 90 epochs of 312 steps at batch 4096.

Recipe: the standard large-batch ResNet recipe (Goyal et al. 2017), not stated in the paper:
SGD with momentum 0.9, batch 4096, learning rate 0.1 per 256 images (1.6), 5 warm-up epochs then
cosine decay, 90 epochs, weight decay 1e-4 on the convolution and dense kernels, label smoothing
0.1, random-resized crop 224 + flip (evaluation: resize 256, centre crop 224). Also not stated in
the paper: bfloat16 compute (float32 parameters).
"""

import ml_collections

from train.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = "imagenet"
    config.data_dir = "data/imagenet"
    config.image_size = 224
    config.data_workers = 16
    config.model = "resnet50"
    config.model_overrides = ml_collections.ConfigDict()
    config.dtype = "bfloat16"

    config.batch_size = 4096
    config.base_batch_size = 256
    config.learning_rate = 0.1
    config.num_epochs = 90.0
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1

    config.log_every_steps = 100
    config.eval_every_steps = 1560  # 5 epochs of 312 steps
    config.checkpoint_every_steps = 312  # 1 epoch
    return config
