"""Pure jax.numpy / NumPy detection functions for RetinaNet; no Flax.

Lin, Goyal, Girshick, He, Dollar. "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
Boxes are float32 ``(y1, x1, y2, x2)`` in pixels of the model input; classes are ``0..C-1``
(sigmoid classification, no background class).
"""

from aacn_jax.detection.anchors import anchor_boxes, num_anchors_per_location
from aacn_jax.detection.boxes import box_area, box_iou, clip_boxes, decode_boxes, encode_boxes
from aacn_jax.detection.losses import huber_loss, retinanet_loss, sigmoid_focal_loss
from aacn_jax.detection.postprocess import Detections, detect, non_max_suppression
from aacn_jax.detection.targets import BACKGROUND, IGNORED, assign_targets

__all__ = [
    "BACKGROUND",
    "IGNORED",
    "Detections",
    "anchor_boxes",
    "assign_targets",
    "box_area",
    "box_iou",
    "clip_boxes",
    "decode_boxes",
    "detect",
    "encode_boxes",
    "huber_loss",
    "non_max_suppression",
    "num_anchors_per_location",
    "retinanet_loss",
    "sigmoid_focal_loss",
]
