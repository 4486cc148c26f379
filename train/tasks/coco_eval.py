"""COCO box AP by pycocotools (the reference implementation; not rewritten here).

Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014, arXiv:1405.0312;
https://github.com/cocodataset/cocoapi.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from train.data.coco import picture_box

# COCOeval.stats, in order: AP at IoU .50:.95, .50, .75; AP of small, medium, large objects;
# AR with 1, 10, 100 detections per image; AR of small, medium, large objects.
METRICS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100", "ar_small",
           "ar_medium", "ar_large")  # fmt: skip


def to_coco_results(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    valid: np.ndarray,
    *,
    image_ids: np.ndarray,
    scales: np.ndarray,
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO result entries of a batch of detections.

    Args:
      boxes: ``[B, D, 4]`` ``(y1, x1, y2, x2)`` in model-input pixels; divided by ``scales[b]`` to
        get back to the image's pixels.
      scores, classes, valid: ``[B, D]``; class ``c`` is category ``category_ids[c]``.
      image_ids: ``[B]``; records with ``image_id`` 0 or less are padding and skipped.
    """
    results = []
    for b in range(len(image_ids)):
        if image_ids[b] <= 0:
            continue
        for d in np.flatnonzero(valid[b]):
            x1, y1, x2, y2 = picture_box(boxes[b, d], scales[b])
            results.append(
                {
                    "image_id": int(image_ids[b]),
                    "category_id": int(category_ids[int(classes[b, d])]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(scores[b, d]),
                }
            )
    return results


def coco_metrics(instances: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, float]:
    """pycocotools' box evaluation of ``results`` against the ground truth ``instances``.

    Returns ``METRICS`` as fractions (-1 where COCOeval has nothing to measure, e.g. no small
    objects). With no detections at all every AP and AR is 0 (pycocotools refuses an empty list).
    """
    annotations = [
        {"iscrowd": 0, "area": annotation["bbox"][2] * annotation["bbox"][3], **annotation}
        for annotation in instances["annotations"]
    ]  # area and iscrowd are optional in our instances files, needed by COCOeval
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": instances["images"],
        "annotations": annotations,
        "categories": instances["categories"],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports on stdout
        ground_truth.createIndex()
        if not results:
            return dict.fromkeys(METRICS, 0.0)
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) for name, value in zip(METRICS, evaluation.stats, strict=True)}
