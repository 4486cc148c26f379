"""Detection data: the synthetic shapes set, COCO-format sources and their checks, the resize/pad/flip
transform, and COCO AP through pycocotools on a case computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from train.configs import default
from train.data import coco, create_dataset, pipeline, shapes
from train.tasks import coco_eval


@pytest.fixture(scope="module")
def shape_set() -> shapes.Shapes:
    return shapes.generate(40, seed=3, size=96, max_objects=4, max_side=30)


def test_shapes_is_deterministic_and_seeded():
    a, b, c = (shapes.generate(3, seed=s, size=64) for s in (7, 7, 8))
    np.testing.assert_array_equal(a.images, b.images)
    assert a.instances == b.instances
    assert not np.array_equal(a.images, c.images)


def test_shapes_boxes_are_the_tight_boxes_of_their_objects_pixels(shape_set):
    """Brute force: the object's colour (its most common one inside its box) found pixel by pixel in
    the box grown by the gap between objects; its extent is the box, its fill ratio names the shape."""
    fill = {"circle": (0.70, 0.86), "square": (1.0, 1.0), "triangle": (0.42, 0.65)}
    names = {c["id"]: c["name"] for c in shape_set.instances["categories"]}
    assert shape_set.instances["annotations"], "no objects drawn"
    for annotation in shape_set.instances["annotations"]:
        image = shape_set.images[annotation["image_id"] - 1].astype(int)
        x, y, w, h = annotation["bbox"]
        inside = image[y : y + h, x : x + w].reshape(-1, 3)
        colours, counts = np.unique(inside, axis=0, return_counts=True)
        colour = colours[np.argmax(counts)]
        top, left = max(y - shapes.GAP, 0), max(x - shapes.GAP, 0)
        region = image[top : y + h + shapes.GAP, left : x + w + shapes.GAP]
        rows, cols = np.nonzero(np.all(region == colour, axis=-1))
        width, height = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
        assert [left + cols.min(), top + rows.min(), width, height] == [x, y, w, h]
        low, high = fill[names[annotation["category_id"]]]
        assert low <= annotation["area"] / (w * h) <= high
        assert annotation["area"] == len(rows)


def test_shapes_objects_are_apart_and_every_class_occurs(shape_set):
    by_image: dict[int, list[list[int]]] = {}
    for annotation in shape_set.instances["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["bbox"])
    for boxes in by_image.values():
        for i, (x1, y1, w1, h1) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1 :]:
                apart_x = x1 + w1 + shapes.GAP <= x2 or x2 + w2 + shapes.GAP <= x1
                apart_y = y1 + h1 + shapes.GAP <= y2 or y2 + h2 + shapes.GAP <= y1
                assert apart_x or apart_y
    labels = {a["category_id"] for a in shape_set.instances["annotations"]}
    assert labels == {1, 2, 3}


@pytest.mark.parametrize("kwargs", [dict(count=0), dict(max_side=5), dict(max_objects=0)])
def test_shapes_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        shapes.generate(**{"count": 2, "seed": 0, "size": 64, **kwargs})


def tiny_instances(**changes) -> dict:
    """Two 40x60 (h x w) images; image 2 has no annotations."""
    instances = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "b.png", "height": 40, "width": 60},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 60.5, 40], "area": 2400, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    instances.update(changes)
    return instances


def blank(entry) -> np.ndarray:
    return np.zeros((entry["height"], entry["width"], 3), np.uint8)


def test_coco_source_maps_categories_clips_and_leaves_out_crowds():
    source = coco.CocoSource(tiny_instances(), blank)
    assert coco.category_ids(source.instances) == (3, 7)
    assert coco.class_names(source.instances) == ("three", "seven")
    record = source[0]
    # (y1, x1, y2, x2); the second box reaches 0.5 pixel past the image: clipped; the crowd is left out.
    np.testing.assert_array_equal(record["boxes"], [[5, 10, 15, 30], [0, 0, 40, 60]])
    np.testing.assert_array_equal(record["classes"], [1, 0])
    empty = source[1]
    assert empty["boxes"].shape == (0, 4) and empty["image_id"] == 2


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"category_id": 5}, "category_id 5"),
        ({"bbox": [50, 5, 20, 10]}, "outside its 60x40 image"),
        ({"bbox": [10, 5, -2, 10]}, "negative size"),
        ({"bbox": [10, 5, 20]}, "must be \\[x, y, width, height\\]"),
        ({"image_id": 9}, "image_id 9"),
    ],
)
def test_coco_source_names_the_bad_annotation(annotation, message):
    bad = {"id": 44, "image_id": 1, "category_id": 7, "bbox": [1, 1, 2, 2], **annotation}
    instances = tiny_instances()
    instances["annotations"].append(bad)
    with pytest.raises(ValueError, match=message) as error:
        coco.CocoSource(instances, blank)
    assert "annotation id 44" in str(error.value)


def test_instances_files_and_the_coco_layout(tmp_path):
    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / split).mkdir()
        for name in ("a.png", "b.png"):
            Image.fromarray(np.full((40, 60, 3), 9, np.uint8)).save(tmp_path / split / name)
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(tiny_instances()))
    train, test = coco.coco_sources(str(tmp_path))
    assert len(train) == len(test) == 2
    assert train[0]["image"].shape == (40, 60, 3) and train[0]["image"][0, 0, 0] == 9
    config = default.get_config()  # what python -m train reads with --config.dataset=coco
    config.update(dict(task="detection", dataset="coco", data_dir=str(tmp_path), image_size=32))
    data = create_dataset(config)
    pipeline.check_dataset(data)
    assert (data.num_classes, data.image_shape, data.class_names) == (2, (32, 32, 3), ("three", "seven"))
    record = data.test_transform(data.test[0])
    np.testing.assert_allclose(record["boxes"][:2], [[5 * 32 / 60, 10 * 32 / 60, 15 * 32 / 60, 30 * 32 / 60],
                                                     [0, 0, 40 * 32 / 60, 32]], rtol=1e-6)  # fmt: skip
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="lacks the COCO key 'annotations'"):
        coco.read_instances(str(bad))
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        coco.read_instances(str(bad))
    with pytest.raises(FileNotFoundError):
        coco.read_instances(str(tmp_path / "missing.json"))
    size_mismatch = coco.CocoSource(tiny_instances(), lambda entry: np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="instances say 60x40"):
        size_mismatch[0]


def test_resize_pad_flip_keeps_boxes_on_their_pixels():
    """A white rectangle on black: after the transform, the bounding box of its pixels (found
    pixel by pixel) is the transformed box, flipped or not."""
    image = np.zeros((60, 100, 3), np.uint8)
    image[10:30, 60:90] = 255  # y 10..30, x 60..90
    record = {"image": image, "boxes": np.array([[10, 60, 30, 90]], np.float32), "classes": np.array([2])}
    record["image_id"] = np.int32(5)
    flips = 0
    for seed in range(8):
        out = coco.resize_pad(record, np.random.default_rng(seed), size=50, max_boxes=3)
        assert out["image"].shape == (50, 50, 3) and out["scale"] == 0.5
        bright = out["image"][..., 0] > 0.5 * out["image"].max()
        rows, cols = np.nonzero(bright)
        found = [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]
        np.testing.assert_allclose(out["boxes"][0], found, atol=1)
        flips += out["boxes"][0, 1] < 20
        np.testing.assert_array_equal(out["valid"], [True, False, False])
        np.testing.assert_array_equal(out["classes"], [2, 0, 0])
        assert np.all(out["image"][30:] == 0)  # padding below the 25-pixel-high resized image (mean 0)
    assert 0 < flips < 8
    test = coco.resize_pad(record, None, size=50, max_boxes=3)
    np.testing.assert_allclose(test["boxes"][0], [5, 30, 15, 45])
    with pytest.raises(ValueError, match="more than max_boxes=0"):
        coco.resize_pad(record, None, size=50, max_boxes=0)


def test_detection_dataset_wiring_and_record_checks(shape_set):
    source = coco.CocoSource(shape_set.instances, lambda entry: shape_set.images[entry["id"] - 1])
    data = coco.detection_dataset((source, source), 96, 6)
    pipeline.check_dataset(data)
    assert data.num_classes == 3 and data.image_shape == (96, 96, 3) and data.max_boxes == 6
    record = data.test_transform(source[0])
    record["classes"] = np.where(record["valid"], 3, 0).astype(np.int32)
    with pytest.raises(ValueError, match="not all in \\[0, 3\\)"):
        pipeline.check_record(record, split="test", data=data)


def test_coco_ap_agrees_with_a_hand_computed_case():
    """One image, two boxes of one class, three detections: a hit (0.9), a miss (0.8), a hit (0.7).

    Precision/recall after each: (1, 1/2), (1/2, 1/2), (2/3, 1). COCO interpolates precision at 101
    recall points as the best precision at that recall or above: 1 for the 51 points 0..0.5, 2/3
    for the 50 points 0.51..1. Both hits are exact, so every IoU threshold gives the same AP.
    """
    instances = {
        "images": [{"id": 1, "height": 100, "width": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 40, 40]},
            {"id": 2, "image_id": 1, "category_id": 4, "bbox": [60, 60, 30, 30]},
        ],
        "categories": [{"id": 4, "name": "thing"}],
    }
    detections = [
        {"image_id": 1, "category_id": 4, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 1, "category_id": 4, "bbox": [0, 60, 20, 20], "score": 0.8},
        {"image_id": 1, "category_id": 4, "bbox": [60, 60, 30, 30], "score": 0.7},
    ]
    expected = (51 * 1 + 50 * 2 / 3) / 101
    results = coco_eval.coco_metrics(instances, detections)
    assert results["ap"] == pytest.approx(expected, abs=1e-6)
    assert results["ap50"] == pytest.approx(expected, abs=1e-6)
    assert results["ar100"] == pytest.approx(1.0)
    assert coco_eval.coco_metrics(instances, [])["ap"] == 0.0


def test_to_coco_results_scales_back_and_maps_categories():
    boxes = np.array([[[10, 20, 30, 60], [0, 0, 1, 1]], [[1, 1, 2, 2], [1, 1, 2, 2]]], np.float32)
    results = coco_eval.to_coco_results(
        boxes,
        scores=np.array([[0.9, 0.1], [0.5, 0.5]]),
        classes=np.array([[1, 0], [0, 0]]),
        valid=np.array([[True, False], [True, True]]),
        image_ids=np.array([12, 0]),  # the second record is padding
        scales=np.array([0.5, 1.0]),
        category_ids=(3, 7),
    )
    assert results == [{"image_id": 12, "category_id": 7, "bbox": [40.0, 20.0, 80.0, 40.0], "score": 0.9}]
