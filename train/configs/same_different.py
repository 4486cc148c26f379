"""same_different (synthetic, relational): are the image's two far-apart glyphs the same pattern?

Command: python -m train --config train/configs/same_different.py  (workdir runs/same_different;
  --config.model=aa_resnet_cifar for the attention-augmented twin of the same depth and width)
Expected: chance for this plain ResNet-8: measured 48.45% test top-1 on the 2000 held-out images
  (JAX 0.10.2, Python 3.11; it fits the training images instead, 74% training top-1 at the end).
  Pooled local glyph detectors with a linear head can reach at most 64.3%, so only accuracies
  clearly above that show that a model relates the two glyphs.
Time: 54 s wall on a 2-core CPU (1500 steps of batch 64, compilation included; 23 ms per step
  after compilation, 210 ms for aa_resnet_cifar).

The data set (train/data/same_different.py): 4000 training / 2000 test 16x16 RGB images generated in
memory, two 3x3 glyphs out of 8 with centres at least 8 pixels apart, two 2x2 distractors, dim
noise, random colours. Recipe: the default config's optimiser (SGD, Nesterov momentum 0.9,
learning rate 0.1 at batch 64, cosine decay, weight decay 5e-4) for a fixed 1500 steps (24
epochs); ResNet-8 of width 16 (three stages of one basic block at 16x16, 8x8, 4x4); random
horizontal flips. Not tuned.
"""

import ml_collections

from train.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = "same_different"
    config.model = "resnet_cifar"
    config.model_overrides = ml_collections.ConfigDict(dict(depth=8, width=16))

    config.batch_size = 64
    config.base_batch_size = 64
    config.num_train_steps = 1500

    config.log_every_steps = 100
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    return config
