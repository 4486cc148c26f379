"""The detection task end to end: python -m train on COCO-format data (a tiny shapes set), checkpoints and
resumption, COCO metrics, the task/data/model checks, and train.predict on a detection run."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests import train_helpers as helpers
from train import checkpoint, inference, loop, predict, warm_start
from train import state as train_state
from train.data import coco, dataset, shapes, transforms
from train.tasks import coco_eval

# A tiny AA-RetinaNet: P3-P4 of a one-block-per-stage ResNet of width 8, attention in stage 4.
TINY_BACKBONE = dict(
    width=8, stage_sizes=(1, 1, 1, 1), augmented_stages=(4,), num_heads=2, min_key_depth_per_head=2
)
TINY_DETECTOR = dict(
    min_level=3,
    max_level=4,
    fpn_features=16,
    head_convs=1,
    anchor_scale=2.0,
    backbone_overrides=TINY_BACKBONE,
)
SIZE = 64


def tiny_detection_config(**changes):
    config = helpers.tiny_config({"task": "detection", "dataset": "shapes", "model": "aa_retinanet_resnet18"})
    config.model_overrides = ml_collections.ConfigDict(TINY_DETECTOR)
    config.detection.max_boxes = 3
    config.detection.pre_nms_top_k = 50
    config.detection.max_detections = 10
    config.detection.score_threshold = 0.0  # an untrained detector's scores are near its prior, 0.01
    config.update(changes)
    return config


def tiny_shapes(count: int, seed: int) -> coco.CocoSource:
    data = shapes.generate(count, seed=seed, size=SIZE, max_objects=3, max_side=24)
    return coco.CocoSource(data.instances, lambda entry: data.images[entry["id"] - 1])


def tiny_detection_data() -> dataset.Dataset:
    return coco.detection_dataset((tiny_shapes(16, 0), tiny_shapes(6, 1)), SIZE, 3)


@pytest.fixture(scope="module")
def tiny_data() -> dataset.Dataset:
    return tiny_detection_data()


def train_classifier(workdir: pathlib.Path) -> None:
    """A one-step classifier with the detector's backbone (aa_resnet18 of TINY_BACKBONE) on 128x128
    shapes labelled by their first object: its stage-4 maps are 4x4, the detector's 2x2."""
    scenes = shapes.generate(8, seed=2, size=128)
    first = {}
    for annotation in scenes.instances["annotations"]:
        first.setdefault(annotation["image_id"], annotation["category_id"] - 1)
    labels = np.array([first[i + 1] for i in range(8)], np.int32)
    transform = functools.partial(
        transforms.normalize, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD
    )
    data = dataset.Dataset(
        dataset.ArraySource(scenes.images, labels),
        dataset.ArraySource(scenes.images, labels),
        num_classes=3,
        image_shape=(128, 128, 3),
        train_transform=functools.partial(transforms.without_augmentation, transform=transform),
        test_transform=transform,
    )
    config = helpers.tiny_config({"model": "aa_resnet18", "num_train_steps": 1})
    config.model_overrides = ml_collections.ConfigDict(TINY_BACKBONE)
    loop.train_and_evaluate(config, str(workdir), data=data)


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> str:
    return str(helpers.made_once(tmp_path_factory, "detection_classifier", train_classifier))


FIRST_START_OUTPUT = "first_start_output.txt"


@pytest.fixture(scope="session")
def trained(tmp_path_factory, classifier) -> str:
    """A workdir after 2 steps (its backbone started from ``classifier``; what that start printed in
    FIRST_START_OUTPUT) and after resuming to 4; checkpoints at steps 2 and 4. Made once per session."""

    def make(workdir: pathlib.Path) -> None:
        data = tiny_detection_data()
        with contextlib.redirect_stdout(io.StringIO()) as out:
            config = tiny_detection_config(num_train_steps=2, init_from=classifier)
            loop.train_and_evaluate(config, str(workdir), data=data)
        (workdir / FIRST_START_OUTPUT).write_text(out.getvalue())
        loop.train_and_evaluate(tiny_detection_config(num_train_steps=4), str(workdir), data=data)

    return str(helpers.made_once(tmp_path_factory, "detection_run", make))


def records(workdir: str) -> list[dict]:
    with open(f"{workdir}/metrics.jsonl") as file:
        return [json.loads(line) for line in file]


def test_detection_run_trains_resumes_and_scores_with_pycocotools(trained):
    workdir = trained
    assert checkpoint.saved_steps(workdir) == [2, 4]
    train_records = [r for r in records(workdir) if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for record in train_records:
        assert np.isfinite(record["loss"]) and record["class_loss"] > 0 and record["box_loss"] >= 0
        assert record["foreground_anchors"] > 0  # every image has objects: some anchors are theirs
        assert record["loss"] == pytest.approx(record["class_loss"] + 50 * record["box_loss"], rel=1e-4)
    final = [r for r in records(workdir) if r["split"] == "eval"][-1]
    assert final["step"] == 4
    # The scores are pycocotools' on the final checkpoint's detections, recomputed here outside the loop.
    model, variables, config = inference.load(workdir)
    test = tiny_detection_data()
    prepared = [test.test_transform(test.test[i]) for i in range(len(test.test))]
    images = np.stack([record["image"] for record in prepared])
    run = inference.detector(model, config.detection, SIZE, config.detection.score_threshold)
    (_, padded), *_ = inference.padded_batches(images, config.batch_size)
    found = jax.device_get(run(variables, padded))
    detections = coco_eval.to_coco_results(
        *(np.asarray(x)[: len(prepared)] for x in (found.boxes, found.scores, found.classes, found.valid)),
        image_ids=np.array([record["image_id"] for record in prepared]),
        scales=np.array([record["scale"] for record in prepared]),
        category_ids=coco.category_ids(test.test.instances),
    )
    expected = coco_eval.coco_metrics(test.test.instances, detections)
    assert final["ar100"] > 0  # some boxes found: the comparison below is not 0 against 0
    for name in ("ap", "ap50", "ap75", "ar100"):
        assert final[name] == pytest.approx(expected[name], abs=1e-6), name
    with open(f"{workdir}/dataset.json") as file:
        recorded = json.load(file)
    assert recorded["task"] == "detection" and recorded["class_names"] == list(shapes.CLASSES)


def test_detection_checkpoint_differs_after_training(trained):
    before, after = (flat(inference.load(trained, step)[1]["params"]) for step in (2, 4))
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[name], after[name]) for name in before)


def test_the_backbone_starts_from_the_classifier(trained, classifier):
    """Every backbone leaf comes from the classifier (relative tables learned on 4x4 maps cut to their
    centre for 2x2 maps: rows 2..4 of 7); the pyramid and heads keep their initial values."""
    output = (pathlib.Path(trained) / FIRST_START_OUTPUT).read_text()
    assert f"from aa_resnet18 in {classifier}" in output
    model = train_state.create_model(tiny_detection_config(), num_classes=3)
    fresh = initialised(model, seed=7)
    params, stats, _ = warm_start.warm_start(fresh["params"], fresh["batch_stats"], classifier)
    source = train_loading_variables(classifier)
    for name, leaf in flat(params["backbone"]).items():
        expected = flat(source["params"])[name]
        if name.endswith("['rel_h']") or name.endswith("['rel_w']"):
            assert expected.shape[0] == 7 and leaf.shape[0] == 3
            expected = expected[2:5]
        np.testing.assert_array_equal(leaf, expected)
    for name, leaf in flat(stats["backbone"]).items():
        np.testing.assert_array_equal(leaf, flat(source["batch_stats"])[name])
    for part in ("fpn", "head"):
        assert flat(params[part]).keys() == flat(fresh["params"][part]).keys()
        for name, leaf in flat(params[part]).items():
            np.testing.assert_array_equal(leaf, flat(fresh["params"][part])[name])


def test_init_from_another_architecture_names_the_leaf(classifier):
    config = tiny_detection_config()
    config.model_overrides.backbone_overrides.width = 16
    model = train_state.create_model(config, num_classes=3)
    fresh = initialised(model, seed=0)
    with pytest.raises(
        ValueError,
        match=r"params \S+ has shape \(8,\) in the source run but \(16,\) in this model: the source is",
    ):
        warm_start.warm_start(fresh["params"], fresh["batch_stats"], classifier)


def initialised(model, seed: int) -> dict:
    """``model``'s variables for SIZE x SIZE images (jitted: an eager detector init compiles op by op)."""
    init = jax.jit(functools.partial(model.init, train=False))
    return init(jax.random.key(seed), np.zeros((1, SIZE, SIZE, 3), np.float32))


def train_loading_variables(workdir: str) -> dict:
    return inference.load(workdir)[1]


def flat(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_task_must_match_the_data_set(tmp_path, tiny_data):
    with pytest.raises(ValueError, match=r"set --config\.task=detection"):
        loop.train_and_evaluate(tiny_detection_config(task="classification"), str(tmp_path), data=tiny_data)
    with pytest.raises(ValueError, match=r"set --config\.task=classification"):
        loop.train_and_evaluate(helpers.tiny_config({"task": "detection"}), str(tmp_path))


def test_detection_needs_a_detection_model(tmp_path, tiny_data):
    config = tiny_detection_config(model="resnet_cifar")
    config.model_overrides = ml_collections.ConfigDict(dict(depth=8, width=8))
    with pytest.raises(ValueError, match="needs a detection model"):
        loop.train_and_evaluate(config, str(tmp_path), data=tiny_data)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("background_iou", 0.6, "background_iou <= foreground_iou"),
        ("max_boxes", 0, "detection.max_boxes=0 must be >= 1"),
        ("max_detections", 2000, "must be <= detection.pre_nms_top_k"),
    ],
)
def test_detection_settings_are_checked_before_anything_runs(tmp_path, key, value, message):
    config = tiny_detection_config()
    config.detection[key] = value
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, str(tmp_path))


def test_predict_prints_and_draws_detections(trained, tmp_path, capsys):
    workdir = trained
    picture = tmp_path / "picture.png"
    scene = shapes.generate(1, seed=5, size=96)  # another size than the run's 64: resized like its images
    Image.fromarray(scene.images[0]).save(picture)
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    predict.main([str(picture), "--workdir", workdir, "--draw", str(drawn), "--min_score", "0"])
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith(str(picture)))
    found = re.findall(r"(\w+) ([01]\.\d\d) at \((-?\d+), (-?\d+), (-?\d+), (-?\d+)\)", line)
    assert found  # min_score 0: the (barely trained) detector's best boxes are printed
    for name, _, *box in found:
        x1, y1, x2, y2 = map(int, box)
        assert name in shapes.CLASSES and 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 96  # picture pixels
    with Image.open(drawn / "picture.png") as image:
        assert image.size == (5 * 96, 5 * 96)  # enlarged by the whole factor 512 // 96
        enlarged = scene.images[0].repeat(5, axis=0).repeat(5, axis=1)
        assert not np.array_equal(np.asarray(image.convert("RGB")), enlarged)  # boxes drawn


def test_predict_refuses_to_export_a_detector(trained, tmp_path):
    workdir = trained
    picture = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.predict",
            str(picture),
            "--workdir",
            workdir,
            "--export",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        cwd=helpers.REPO,
        env=helpers.subprocess_env(1),
        timeout=300,
    )
    assert result.returncode == 2 and "exports classifiers only" in result.stderr


def test_the_shapes_recipe_runs_from_the_command_line(tmp_path):
    """The quick form of the README's detection command: the real recipe, 2 steps."""
    flags = [
        "--config=train/configs/shapes_aa_retinanet.py",
        f"--workdir={tmp_path}",
        "--config.num_train_steps=2",
        "--config.warmup_epochs=0",
        "--config.batch_size=8",
        "--config.base_batch_size=8",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "train", *flags],
        capture_output=True,
        text=True,
        cwd=helpers.REPO,
        env=helpers.subprocess_env(4),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final test AP" in result.stdout and "on 500 shapes test images at step 2" in result.stdout
