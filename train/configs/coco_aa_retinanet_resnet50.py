"""COCO 2017 detection, RetinaNet on AA-ResNet-50 (the paper: 38.2 AP, against 36.8 for ResNet-50),
started from torchvision's ImageNet-trained ResNet-50.

Command: python -m train --config train/configs/coco_aa_retinanet_resnet50.py --config.data_dir=/path/to/coco
  after converting the backbone's weights (torchvision's resnet50-0676ba61.pth or -11ad3fa6.pth, or
  timm's resnet50 model.safetensors) once:
    python -m train.convert --source torchvision --model resnet50 --weights resnet50-0676ba61.pth \
      --workdir runs/torchvision_resnet50
Expected: 38.2 COCO AP on val2017 (the paper's table, with an ImageNet-trained AA-ResNet-50; this
  recipe starts from a plain ResNet-50, whose attention starts fresh: expect less until measured).
Time: not measured here (no accelerator was available).

The backbone is the zoo's aa_resnet50 (the 3x3 convolutions of stages 3-4 augmented, kappa = 2
upsilon = 0.2, 8 heads); at 640x640 its attention runs on 40x40 and 20x20 maps. Everything else is
coco_retinanet_resnet50.py's recipe (TF's TPU RetinaNet; not stated in the paper).
``init_from`` (train/warm_start.py) copies every backbone layer of the converted ResNet-50; each
augmented convolution takes the first Fout - dv filters of the pretrained 3x3 kernel for its
convolution branch and starts its attention fresh, and the pyramid and heads start from their own
initialisation. The backbone pads its 3x3 convolutions as torch does (``conv_padding``), the padding
the pretrained kernels were trained with. To start from an ImageNet-trained AA-ResNet-50 of this
project instead: --config.init_from=runs/imagenet_aa_resnet50 (its relative tables, learned on 14x14
and 7x7 maps, are stretched to 40x40 and 20x20).
"""

import ml_collections

from train.configs import coco_retinanet_resnet50


def get_config() -> ml_collections.ConfigDict:
    config = coco_retinanet_resnet50.get_config()
    config.model = "aa_retinanet_resnet50"
    config.model_overrides = ml_collections.ConfigDict({"backbone_overrides": {"conv_padding": "symmetric"}})
    config.init_from = (
        "runs/torchvision_resnet50"  # python -m train.convert ... --workdir runs/torchvision_resnet50
    )
    return config
