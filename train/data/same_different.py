"""``same_different``: a synthetic relational image data set (numpy only, deterministic from a seed).

Each ``size x size`` RGB image (16 x 16 by default) shows two *glyphs*, 3x3 binary patterns from a
fixed set of ``K = 8`` (:data:`GLYPHS`), placed far apart, and two distractors. The label is 1
("same") when both glyphs are the same pattern and 0 ("different") otherwise. To answer, a network
must compare the shapes of two objects at least ``size // 2`` pixels apart: a relation between
distant parts of the image, where a global receptive field (attention augmentation) could help.

An image (:func:`generate`):

* background: dim noise, uniform in 0..40 per pixel and channel;
* two glyphs, each painted in its own random bright colour (every channel uniform in 100..255,
  drawn independently of the label and of the other glyph), in 3x3 boxes whose centres are at
  least ``size // 2`` pixels apart in Euclidean distance (so the boxes cannot overlap); the pair
  of top-left corners is uniform over all pairs that satisfy this;
* two distractors: 2x2 solid squares in random bright colours (same range) at random positions
  that neither overlap nor touch (not even at a corner) a glyph's box or the other distractor;
* labels exactly balanced (a random permutation of ``0, 1, 0, 1, ...``); a "same" image draws
  one glyph uniformly, a "different" one an ordered pair of distinct glyphs uniformly.

Why pooled local detectors cannot solve it. Suppose a network only sums per-location features
``f`` over the image and applies a linear classifier ``w`` with threshold ``t``. If each glyph is
seen alone (a local detector), the score is ``g(a) + g(b)`` with ``g = w . f`` (distractors and
background add the same in both classes): ``2 g(a)`` for "same" and ``g(a) + g(b)`` for
"different". ``2 g(a) > t`` and ``2 g(b) > t`` imply ``g(a) + g(b) > t``, so no threshold separates
the classes, for any ``K >= 2``. It does not follow that such a network is at chance: calling
``P`` the glyphs with ``2 g > t``, it answers "same" for same-pairs in ``P`` and can answer
"different" for every pair with a glyph outside ``P``; with ``|P| = K / 2`` that is
``0.75 - (K - 2) / (8 (K - 1))`` correct, 64.3% for ``K = 8`` (62.5% as ``K`` grows). Such a
rule breaks the symmetry between glyph types, so a logistic regression on the glyph counts,
whose optimum is symmetric, stays at 50% (see the tests); a trained network might find it, so
only accuracies clearly above ~64% show relational evidence. Every glyph has the same number of
on-pixels (5) and colours are independent of the label, so colour and intensity statistics
(histograms, means) carry no signal either.

The glyph set is closed under left-right mirroring (four symmetric glyphs and two mirror pairs),
so a horizontally flipped image is again an image of this data set with the same label: the
training pipeline's flip augmentation stays within the distribution.

As a data set (:func:`same_different`): 4000 training images (seed 0) and 2000 test images (seed 1)
of 16x16, generated in memory; training augmentation: a random horizontal flip.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections
import numpy as np

from train.data.dataset import ArraySource, Dataset, Entry, Layout
from train.data.transforms import flip_normalize, normalize, resized_picture

# K = 8 glyphs, 3x3, 5 on-pixels each, no 2x2 solid block (a distractor's shape) inside any of them.
_GLYPH_ROWS = (
    (".#.", "###", ".#."),  # 0 plus
    ("#.#", ".#.", "#.#"),  # 1 cross
    ("###", ".#.", ".#."),  # 2 T
    ("#.#", "#.#", ".#."),  # 3 V
    ("#..", "#..", "###"),  # 4 L
    ("..#", "..#", "###"),  # 5 J (4 mirrored)
    ("##.", ".#.", ".##"),  # 6 Z
    (".##", ".#.", "##."),  # 7 S (6 mirrored)
)
GLYPHS = np.array([[[char == "#" for char in row] for row in glyph] for glyph in _GLYPH_ROWS], np.uint8)
"""``[K, 3, 3]`` uint8 0/1: the glyph patterns; glyph id ``i`` is ``GLYPHS[i]``."""

NUM_GLYPHS = len(GLYPHS)
GLYPH_SIZE, DISTRACTOR_SIZE, NUM_DISTRACTORS = 3, 2, 2
BACKGROUND_MAX = 40  # background noise: uniform 0..BACKGROUND_MAX
COLOUR_MIN = 100  # glyph and distractor colours: every channel uniform in COLOUR_MIN..255
MIN_SIZE = 12


@dataclasses.dataclass(frozen=True)
class Sample:
    """Images and what they show.

    Attributes:
      images: uint8 ``[N, size, size, 3]``.
      labels: int32 ``[N]``: 1 if both glyphs are the same pattern, else 0.
      glyphs: int32 ``[N, 2]``: glyph ids (rows of :data:`GLYPHS`) of the two objects.
      corners: int32 ``[N, 2, 2]``: ``(row, col)`` of the top-left pixel of each glyph's 3x3 box.
    """

    images: np.ndarray
    labels: np.ndarray
    glyphs: np.ndarray
    corners: np.ndarray


@functools.cache
def _corner_pairs(size: int) -> np.ndarray:
    """``[P, 2, 2]``: every ordered pair of glyph corners whose box centres are >= size // 2 apart."""
    positions = np.stack(np.meshgrid(*[np.arange(size - GLYPH_SIZE + 1)] * 2, indexing="ij"), -1).reshape(
        -1, 2
    )
    first, second = np.repeat(positions, len(positions), 0), np.tile(positions, (len(positions), 1))
    far = np.sum((first - second) ** 2, axis=-1) >= (size // 2) ** 2  # centres differ as corners do
    pairs = np.stack([first[far], second[far]], axis=1)
    pairs.setflags(write=False)
    return pairs


def _place_distractor(blocked: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A uniform top-left corner for a 2x2 square that covers no ``blocked`` pixel; blocks the
    square and its 1-pixel border."""
    size, d = len(blocked), DISTRACTOR_SIZE
    windows = np.lib.stride_tricks.sliding_window_view(blocked, (d, d)).any(axis=(-1, -2))
    free = np.argwhere(~windows)
    row, col = free[rng.integers(len(free))]
    blocked[max(row - 1, 0) : min(row + d + 1, size), max(col - 1, 0) : min(col + d + 1, size)] = True
    return int(row), int(col)


def generate(num_images: int, seed: int, size: int = 16) -> Sample:
    """``num_images`` images of ``size x size`` pixels, a deterministic function of ``seed``.

    Raises:
      ValueError: ``num_images < 1`` or ``size < 12`` (too small to place two far-apart glyphs
        and two distractors).
    """
    if num_images < 1:
        raise ValueError(f"num_images={num_images} must be at least 1")
    if size < MIN_SIZE:
        raise ValueError(
            f"size={size} must be at least {MIN_SIZE} to place two 3x3 glyphs size // 2 apart and "
            f"{NUM_DISTRACTORS} 2x2 distractors"
        )
    rng = np.random.default_rng(seed)
    labels = (rng.permutation(num_images) % 2).astype(np.int32)
    first = rng.integers(NUM_GLYPHS, size=num_images)
    other = (first + rng.integers(1, NUM_GLYPHS, size=num_images)) % NUM_GLYPHS  # uniform among the rest
    glyphs = np.stack([first, np.where(labels == 1, first, other)], axis=1).astype(np.int32)
    pairs = _corner_pairs(size)
    corners = pairs[rng.integers(len(pairs), size=num_images)].astype(np.int32)

    images = rng.integers(0, BACKGROUND_MAX + 1, size=(num_images, size, size, 3), dtype=np.uint8)
    colours = rng.integers(COLOUR_MIN, 256, size=(num_images, 2 + NUM_DISTRACTORS, 3), dtype=np.uint8)
    g, d = GLYPH_SIZE, DISTRACTOR_SIZE
    for i in range(num_images):
        image, blocked = images[i], np.zeros((size, size), bool)
        for k, (row, col) in enumerate(corners[i]):
            box = image[row : row + g, col : col + g]
            box[GLYPHS[glyphs[i, k]] == 1] = colours[i, k]
            blocked[max(row - 1, 0) : row + g + 1, max(col - 1, 0) : col + g + 1] = True
        for k in range(NUM_DISTRACTORS):
            row, col = _place_distractor(blocked, rng)
            image[row : row + d, col : col + d] = colours[i, 2 + k]
    return Sample(images=images, labels=labels, glyphs=glyphs, corners=corners)


DATASET_SIZE, TRAIN_IMAGES, TEST_IMAGES = 16, 4000, 2000
LAYOUT = Layout(num_classes=2, image_shape=(DATASET_SIZE, DATASET_SIZE, 3))
# Per-channel mean and standard deviation of every pixel of the training split
# (generate(4000, seed=0), 0..255 scale), computed once with float64 numpy;
# tests/test_same_different.py recomputes them.
MEAN, STD = (31.07, 31.05, 31.08), (43.53, 43.44, 43.52)
TEST_TRANSFORM = functools.partial(normalize, mean=MEAN, std=STD)


def same_different() -> Dataset:
    """The data set of :func:`generate`'s images: label 1 ("same") when the image's two glyphs are the
    same pattern.

    Training augmentation: a random horizontal flip. Flipping the whole image mirrors both glyphs
    alike, so same stays same and different stays different, and the glyph set is closed under
    mirroring, so a flipped image is an image of the data set itself (twice the distinct training
    images at no cost). Crops are left out: they could cut a glyph in half near the border.
    """
    train = generate(TRAIN_IMAGES, seed=0, size=DATASET_SIZE)
    test = generate(TEST_IMAGES, seed=1, size=DATASET_SIZE)
    return Dataset(
        ArraySource(train.images, train.labels),
        ArraySource(test.images, test.labels),
        num_classes=LAYOUT.num_classes,
        image_shape=LAYOUT.image_shape,
        train_transform=functools.partial(flip_normalize, mean=MEAN, std=STD),
        test_transform=TEST_TRANSFORM,
        class_names=("different", "same"),
    )


def read_picture(path: str, image_size: int) -> np.ndarray:
    """Any picture as RGB resized to 16x16."""
    del image_size  # always 16x16
    pixels = resized_picture(path, mode="RGB", size=DATASET_SIZE, scale=1.0)
    return TEST_TRANSFORM({"image": pixels, "label": 0})["image"]


def create(config: ml_collections.ConfigDict) -> Dataset:
    del config  # nothing to configure
    return same_different()


ENTRY = Entry(create, lambda config: LAYOUT, read_picture)
