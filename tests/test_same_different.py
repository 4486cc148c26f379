"""The synthetic relational data set ``same_different``: determinism, balance, that every label is
what the image shows, that simple statistics and pooled glyph counts carry no signal, and its
registration in the training pipeline. No network is trained here."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from tests import train_helpers as helpers
from train.data import REGISTRY, create_dataset, pipeline, read_picture, same_different
from train.data import same_different as sd


@pytest.fixture(scope="module")
def registered():
    return create_dataset(helpers.tiny_config({"dataset": "same_different"}))


def test_glyph_table():
    glyphs = sd.GLYPHS
    assert glyphs.shape == (8, 3, 3) and set(np.unique(glyphs)) == {0, 1}
    assert (glyphs.sum(axis=(1, 2)) == 5).all()  # same pixel count: intensity carries no signal
    flat = {glyph.tobytes() for glyph in glyphs}
    assert len(flat) == 8  # distinct
    assert {glyph[:, ::-1].tobytes() for glyph in glyphs} == flat  # closed under left-right mirroring
    blocks = np.lib.stride_tricks.sliding_window_view(glyphs, (2, 2), axis=(1, 2)).all(axis=(-1, -2))
    assert not blocks.any()  # no 2x2 solid block: a glyph never contains a distractor's shape


def test_same_seed_same_images_other_seed_other_images():
    a, b, c = sd.generate(40, seed=3), sd.generate(40, seed=3), sd.generate(40, seed=4)
    for field in ("images", "labels", "glyphs", "corners"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.corners, c.corners)
    assert (a.images.dtype, a.labels.dtype, a.glyphs.dtype, a.corners.dtype) == (
        np.uint8,
        np.int32,
        np.int32,
        np.int32,
    )
    assert (a.images.shape, a.glyphs.shape, a.corners.shape) == ((40, 16, 16, 3), (40, 2), (40, 2, 2))


@pytest.mark.parametrize("num_images", [1, 2, 7, 100])
def test_labels_are_balanced_exactly(num_images):
    labels = sd.generate(num_images, seed=num_images, size=12).labels
    assert labels.sum() == num_images // 2 and set(labels.tolist()) <= {0, 1}


def test_registered_splits_are_balanced_and_different(registered):
    for source, count in ((registered.train, 4000), (registered.test, 2000)):
        assert len(source) == count and np.bincount(source.labels).tolist() == [count // 2, count // 2]
    # The documented splits, generate(4000, seed=0) and generate(2000, seed=1); no image in both.
    for source, (count, seed) in ((registered.train, (4000, 0)), (registered.test, (2000, 1))):
        np.testing.assert_array_equal(source.images, sd.generate(count, seed=seed).images)
    train_images = {image.tobytes() for image in registered.train.images}
    assert not any(image.tobytes() in train_images for image in registered.test.images)


@pytest.mark.parametrize("size", [12, 16, 20])
def test_every_label_is_what_the_image_shows(size):
    sample = sd.generate(300, seed=size, size=size)
    bright = sample.images.max(axis=-1) > sd.BACKGROUND_MAX  # N, size, size: not background
    assert (bright.sum(axis=(1, 2)) == 2 * 5 + 2 * 4).all()  # two glyphs, two 2x2 squares, dim noise
    for image, on, label, glyphs, corners in zip(
        sample.images, bright, sample.labels, sample.glyphs, sample.corners, strict=True
    ):
        assert label == (glyphs[0] == glyphs[1])
        centres = corners + 1
        assert np.hypot(*(centres[0] - centres[1])) >= size // 2
        assert (np.abs(corners[0] - corners[1]) >= 3).any()  # the boxes do not overlap
        around = np.zeros_like(on)  # the glyph boxes grown by one pixel
        for glyph, (row, col) in zip(glyphs, corners, strict=True):
            box = on[row : row + 3, col : col + 3]
            np.testing.assert_array_equal(box, sd.GLYPHS[glyph] == 1)  # the pattern, exactly
            colours = image[row : row + 3, col : col + 3][box]
            assert (colours == colours[0]).all() and colours.min() >= sd.COLOUR_MIN  # one bright colour
            around[max(row - 1, 0) : row + 4, max(col - 1, 0) : col + 4] = True
            around[row : row + 3, col : col + 3] = False
        assert not (on & around).any()  # nothing touches a glyph's box
        # The rest: two 2x2 squares of one colour each, not touching each other.
        outside = on.copy()
        for row, col in corners:
            outside[row : row + 3, col : col + 3] = False
        parts, count = ndimage.label(outside, structure=np.ones((3, 3)))
        assert count == 2
        for part in range(1, 3):
            rows, cols = np.nonzero(parts == part)
            assert len(rows) == 4 and np.ptp(rows) == 1 and np.ptp(cols) == 1
            assert len(np.unique(image[rows, cols], axis=0)) == 1


def test_glyph_pairs_cover_every_combination():
    sample = sd.generate(2000, seed=5)
    same = sample.glyphs[sample.labels == 1]
    different = sample.glyphs[sample.labels == 0]
    assert np.bincount(same[:, 0], minlength=8).min() > 0.7 * len(same) / 8
    pairs = {tuple(pair) for pair in different.tolist()}
    assert len(pairs) == 8 * 7 and all(a != b for a, b in pairs)


def _accuracy(features_fn, train_seed: int = 10, test_seed: int = 11) -> float:
    """Logistic regression on ``features_fn(sample)``: fit on 2000 images, score on 1000 others."""
    train, test = sd.generate(2000, seed=train_seed), sd.generate(1000, seed=test_seed)
    scaler = StandardScaler().fit(features_fn(train))
    model = LogisticRegression(max_iter=2000).fit(scaler.transform(features_fn(train)), train.labels)
    return model.score(scaler.transform(features_fn(test)), test.labels)


def _histograms(sample: sd.Sample, bins: int = 16) -> np.ndarray:
    """``[N, 3 * bins]``: each channel's intensity histogram."""
    index = sample.images.reshape(len(sample.images), -1, 3) // (256 // bins) + np.arange(3) * bins
    rows = np.arange(len(index))[:, None, None] * 3 * bins
    return np.bincount((index + rows).ravel(), minlength=len(index) * 3 * bins).reshape(len(index), -1)


def _glyph_counts(sample: sd.Sample) -> np.ndarray:
    """``[N, K]``: how many of each glyph the image holds (the ideal pooled local detector)."""
    return np.eye(sd.NUM_GLYPHS)[sample.glyphs].sum(axis=1)


def test_intensity_histograms_carry_no_signal():
    assert abs(_accuracy(_histograms) - 0.5) <= 0.06


def test_pooled_glyph_counts_do_not_solve_it_but_the_pair_does():
    assert _accuracy(_glyph_counts) < 0.6
    # The same regression on the pair (which glyph is first, which second) does: the test can see a signal.
    assert (
        _accuracy(lambda s: np.eye(sd.NUM_GLYPHS**2)[s.glyphs[:, 0] * sd.NUM_GLYPHS + s.glyphs[:, 1]]) > 0.99
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0), "num_images=0 must be at least 1"),
        ((-3, 0), "num_images=-3 must be at least 1"),
        ((5, 0, 11), "size=11 must be at least 12"),
    ],
)
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        sd.generate(*args)


def test_training_pipeline_accepts_it(registered, tmp_path):
    data = registered
    assert (data.num_classes, data.image_shape, data.class_names) == (2, (16, 16, 3), ("different", "same"))
    pipeline.check_dataset(data)
    assert "same_different" in REGISTRY
    # The normalisation constants are the training split's per-channel statistics.
    pixels = data.train.images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(same_different.MEAN, pixels.mean(0), atol=0.006)
    np.testing.assert_allclose(same_different.STD, pixels.std(0), atol=0.006)
    mean, std = np.float32(same_different.MEAN), np.float32(same_different.STD)
    image = data.test.images[0]
    record = data.test_transform(data.test[0])
    np.testing.assert_allclose(record["image"] * std + mean, image, atol=1e-4)
    # Training: the image or its mirror image, both seen over a few draws; the label is kept.
    flips = set()
    for seed in range(8):
        augmented = data.train_transform(data.test[0], np.random.default_rng(seed))
        restored = augmented["image"] * std + mean
        assert augmented["label"] == data.test[0]["label"]
        flips.add(
            next(f for f in (False, True) if np.allclose(restored, image[:, ::-1] if f else image, atol=1e-4))
        )
    assert flips == {False, True}
    batch = next(pipeline.train_iterator(data, batch_size=8, seed=0))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8,)
    # A picture of a test image, prepared for prediction, is the test transform's image.
    Image.fromarray(image).save(tmp_path / "picture.png")
    picture = read_picture("same_different", 224, str(tmp_path / "picture.png"))
    np.testing.assert_array_equal(picture, record["image"])
    np.testing.assert_array_equal(same_different.TEST_TRANSFORM(data.test[0])["image"], record["image"])
