"""aacn_jax.detection's pure functions against brute-force references written from the equations.

Each reference below works one box, anchor or element at a time in float64 Python/NumPy loops (no
broadcasting tricks, no call into the library), from the detection contract and the RetinaNet paper
(Lin et al., arXiv:1708.02002). Random cases avoid IoUs within 1e-4 of a threshold and equal scores,
where float32 and float64 may legitimately disagree.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aacn_jax import detection as det

MARGIN = 1e-4


# ----------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------


def _area_ref(box):
    y1, x1, y2, x2 = (float(v) for v in box)
    return max(0.0, y2 - y1) * max(0.0, x2 - x1)


def _iou_ref(a, b):
    """One pair of boxes."""
    ih = min(float(a[2]), float(b[2])) - max(float(a[0]), float(b[0]))
    iw = min(float(a[3]), float(b[3])) - max(float(a[1]), float(b[1]))
    inter = max(0.0, ih) * max(0.0, iw)
    union = _area_ref(a) + _area_ref(b) - inter
    return inter / union if union > 0 else 0.0


def _iou_matrix_ref(a, b):
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = _iou_ref(a[i], b[j])
    return out


def _centre_size(box):
    y1, x1, y2, x2 = (float(v) for v in box)
    return (y1 + y2) / 2, (x1 + x2) / 2, y2 - y1, x2 - x1


def _encode_ref(box, anchor, weights=(1.0, 1.0, 1.0, 1.0)):
    cy, cx, h, w = _centre_size(box)
    cya, cxa, ha, wa = _centre_size(anchor)
    wy, wx, wh, ww = weights
    return [wy * (cy - cya) / ha, wx * (cx - cxa) / wa, wh * math.log(h / ha), ww * math.log(w / wa)]


def _assign_ref(anchors, boxes, classes, valid, fg, bg, low_quality, weights=(1.0, 1.0, 1.0, 1.0)):
    """The contract's rule, one anchor and one box at a time."""
    num_anchors = len(anchors)
    iou = _iou_matrix_ref(anchors, boxes)
    best_box, best_iou = [], []
    for a in range(num_anchors):
        bi, bv = -1, -1.0
        for n in range(len(boxes)):
            if valid[n] and iou[a, n] > bv:  # strict: ties keep the lowest index
                bi, bv = n, iou[a, n]
        best_box.append(bi)
        best_iou.append(bv)
    foreground = [best_iou[a] >= fg for a in range(num_anchors)]
    if low_quality:
        for n in range(len(boxes)):
            if not valid[n]:
                continue
            top = max(iou[a, n] for a in range(num_anchors))
            if top > 0:
                for a in range(num_anchors):
                    if iou[a, n] == top:
                        foreground[a] = True
    cls = np.zeros(num_anchors, np.int64)
    box_t = np.zeros((num_anchors, 4))
    for a in range(num_anchors):
        if foreground[a]:
            cls[a] = classes[best_box[a]]
            box_t[a] = _encode_ref(boxes[best_box[a]], anchors[a], weights)
        elif best_iou[a] < bg:
            cls[a] = -1
        else:
            cls[a] = -2
    return cls, box_t, np.array(best_iou), iou


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _focal_ref(x, y, alpha, gamma):
    """-alpha_t (1 - p_t)^gamma log(p_t), one element (labels 0/1)."""
    p = _sigmoid(float(x))
    p_t = p if y == 1 else 1.0 - p
    alpha_t = 1.0 if alpha < 0 else (alpha if y == 1 else 1.0 - alpha)
    return -alpha_t * (1.0 - p_t) ** gamma * math.log(p_t)


def _huber_ref(p, t, delta):
    e = abs(float(p) - float(t))
    return 0.5 * e * e if e <= delta else delta * (e - 0.5 * delta)


def _greedy_nms_ref(boxes, scores, iou_threshold, max_outputs, score_threshold, same_group=None):
    """Textbook greedy NMS: visit by descending score, keep a box unless a kept box overlaps it."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept = []
    for i in order:
        if not float(scores[i]) > score_threshold:
            continue
        suppressed = False
        for k in kept:
            if same_group is not None and same_group[k] != same_group[i]:
                continue
            if _iou_ref(boxes[k], boxes[i]) > iou_threshold:
                suppressed = True
        if not suppressed:
            kept.append(i)
    return kept[:max_outputs]


def _random_boxes(rng, n, size=40.0, min_side=2.0, max_side=20.0):
    y1 = rng.uniform(0, size, n)
    x1 = rng.uniform(0, size, n)
    h = rng.uniform(min_side, max_side, n)
    w = rng.uniform(min_side, max_side, n)
    return np.stack([y1, x1, y1 + h, x1 + w], axis=1).astype(np.float32)


def _clustered_boxes(rng, n, clusters=6, jitter=2.0):
    """n boxes around a few random ones, so that many pairs overlap strongly."""
    centres = _random_boxes(rng, clusters, size=40.0, min_side=6.0, max_side=20.0)
    boxes = centres[rng.integers(0, clusters, n)] + rng.normal(0, jitter, (n, 4)).astype(np.float32)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)
    return boxes


def _boxes_away_from(rng, n, thresholds):
    """Clustered random boxes whose pairwise IoUs all stay MARGIN away from every threshold."""
    for _ in range(1000):
        boxes = _clustered_boxes(rng, n)
        iou = _iou_matrix_ref(boxes, boxes)
        if all(np.min(np.abs(iou - t)) > MARGIN for t in thresholds):
            return boxes
    raise AssertionError("no random boxes away from the thresholds")


# ----------------------------------------------------------------------------
# boxes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),  # disjoint
        ((0, 0, 10, 10), (0, 10, 10, 20), 0.0),  # touching along an edge
        ((0, 0, 10, 10), (10, 10, 20, 20), 0.0),  # touching at a corner
        ((0, 0, 10, 10), (2, 3, 6, 8), 20.0 / 100.0),  # contained
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),  # identical
        ((0, 0, 10, 10), (5, 0, 15, 10), 50.0 / 150.0),  # half overlap
        ((0, 0, 10, 10), (5, 5, 5, 8), 0.0),  # zero-area inside
        ((3, 3, 3, 3), (3, 3, 3, 3), 0.0),  # two zero-area boxes: union 0
        ((0, 0, 10, 10), (8, 8, 2, 2), 0.0),  # inverted box has area 0
    ],
)
def test_box_iou_by_hand(a, b, expected):
    got = det.box_iou(jnp.array([a], jnp.float32), jnp.array([b], jnp.float32))
    assert got.shape == (1, 1)
    np.testing.assert_allclose(float(got[0, 0]), expected, rtol=1e-6, atol=0)
    assert float(det.box_iou(jnp.array([b], jnp.float32), jnp.array([a], jnp.float32))[0, 0]) == float(
        got[0, 0]
    )


def test_box_area_and_iou_match_reference_with_leading_dims():
    rng = np.random.default_rng(0)
    a = _random_boxes(rng, 14).reshape(2, 7, 4)
    b = _random_boxes(rng, 10).reshape(2, 5, 4)
    b[0, 0] = b[0, 0, [2, 3, 0, 1]]  # an inverted box
    area = det.box_area(a)
    assert area.shape == (2, 7) and area.dtype == jnp.float32
    for i in range(2):
        np.testing.assert_allclose(area[i], [_area_ref(x) for x in a[i]], rtol=1e-6)
    iou = det.box_iou(a, b)
    assert iou.shape == (2, 7, 5) and iou.dtype == jnp.float32
    for i in range(2):
        np.testing.assert_allclose(iou[i], _iou_matrix_ref(a[i], b[i]), rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(iou)[0, :, 0] == 0.0)
    inverted = jnp.array(
        [[0.0, 0.0, -5.0, 10.0], [0.0, 0.0, 5.0, -10.0], [0.0, 0.0, -5.0, -10.0], [3, 3, 3, 9]]
    )
    np.testing.assert_array_equal(det.box_area(inverted), [0.0, 0.0, 0.0, 0.0])


def test_encode_boxes_by_hand():
    anchor = jnp.array([0.0, 0.0, 10.0, 20.0])  # cy 5, cx 10, h 10, w 20
    box = jnp.array([2.0, 4.0, 8.0, 24.0])  # cy 5, cx 14, h 6, w 20
    np.testing.assert_allclose(det.encode_boxes(box, anchor), [0.0, 0.2, math.log(0.6), 0.0], atol=1e-7)
    np.testing.assert_allclose(
        det.encode_boxes(box, anchor, weights=(10.0, 10.0, 5.0, 5.0)),
        [0.0, 2.0, 5 * math.log(0.6), 0.0],
        atol=1e-6,
    )


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_matches_reference_and_decode_inverts_it(weights):
    rng = np.random.default_rng(1)
    boxes, anchors = _random_boxes(rng, 30), _random_boxes(rng, 30)
    deltas = det.encode_boxes(boxes, anchors, weights=weights)
    assert deltas.shape == (30, 4) and deltas.dtype == jnp.float32
    expected = np.array([_encode_ref(b, a, weights) for b, a in zip(boxes, anchors, strict=True)])
    np.testing.assert_allclose(deltas, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(det.decode_boxes(deltas, anchors, weights=weights), boxes, atol=1e-4)
    # broadcasting: one anchor for a [3, 30] batch of boxes
    batched = det.encode_boxes(boxes.reshape(3, 10, 4), anchors[0], weights=weights)
    np.testing.assert_allclose(
        batched.reshape(30, 4), [_encode_ref(b, anchors[0], weights) for b in boxes], rtol=1e-5, atol=1e-5
    )


def test_decode_boxes_by_hand_and_clips_the_log_scale():
    anchor = jnp.array([0.0, 0.0, 10.0, 20.0])
    got = det.decode_boxes(jnp.array([0.1, -0.5, math.log(2.0), 0.0]), anchor)
    # cy = 5 + 0.1 * 10 = 6, cx = 10 - 0.5 * 20 = 0, h = 20, w = 20
    np.testing.assert_allclose(got, [-4.0, -10.0, 16.0, 10.0], atol=1e-5)
    huge = det.decode_boxes(jnp.array([0.0, 0.0, 50.0, 1e4]), anchor, max_log_scale=math.log(4.0))
    np.testing.assert_allclose(huge, [5 - 20.0, 10 - 40.0, 5 + 20.0, 10 + 40.0], rtol=1e-6)
    assert np.all(np.isfinite(det.decode_boxes(jnp.array([0.0, 0.0, 1e4, 1e4]), anchor)))


def test_clip_boxes():
    boxes = jnp.array([[-5.0, -1.0, 50.0, 30.0], [10.0, 40.0, 20.0, 45.0], [1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_array_equal(
        det.clip_boxes(boxes, (40, 32)),
        [[0.0, 0.0, 40.0, 30.0], [10.0, 32.0, 20.0, 32.0], [1.0, 2.0, 3.0, 4.0]],
    )


# ----------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------


def _assign(anchors, boxes, classes, valid, **kwargs):
    cls, box_t = det.assign_targets(
        jnp.asarray(anchors, jnp.float32),
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(classes, jnp.int32),
        jnp.asarray(valid, bool),
        **kwargs,
    )
    assert cls.dtype == jnp.int32 and box_t.dtype == jnp.float32
    return np.asarray(cls), np.asarray(box_t)


def test_assign_targets_by_hand():
    box = (0.0, 0.0, 10.0, 10.0)
    anchors = np.array(
        [
            (0, 0, 10, 10),  # IoU 1 -> foreground
            (0, 0, 10, 12),  # IoU 100/120 = 0.833 -> foreground
            (0, 0, 10, 22),  # IoU 100/220 = 0.4545 -> ignored band
            (0, 0, 10, 25),  # IoU 0.4 exactly -> ignored (background needs < 0.4)
            (0, 0, 10, 20),  # IoU 0.5 exactly -> foreground (>= 0.5)
            (0, 0, 10, 30),  # IoU 0.333 -> background
            (50, 50, 60, 60),  # IoU 0 -> background
            (100, 100, 140, 140),  # overlaps only the small second box: its best anchor
        ],
        np.float32,
    )
    small = (100.0, 100.0, 104.0, 104.0)  # IoU 16/1600 with anchor 7: a low-quality match
    padding = (50.0, 50.0, 60.0, 60.0)  # anchor 6's perfect match, but valid False: never used
    boxes = np.array([box, small, padding], np.float32)
    classes, valid = [3, 5, 7], [True, True, False]
    cls, box_t = _assign(anchors, boxes, classes, valid)
    np.testing.assert_array_equal(cls, [3, 3, -2, -2, 3, -1, -1, 5])
    np.testing.assert_allclose(box_t[1], [0.0, -1.0 / 12, 0.0, math.log(10.0 / 12.0)], atol=1e-6)
    np.testing.assert_allclose(box_t[7], [-0.45, -0.45, math.log(0.1), math.log(0.1)], atol=1e-6)
    assert np.all(box_t[[0, 2, 3, 5, 6]] == 0.0)
    cls, box_t = _assign(anchors, boxes, classes, valid, match_low_quality=False)
    np.testing.assert_array_equal(cls, [3, 3, -2, -2, 3, -1, -1, -1])
    assert np.all(box_t[7] == 0.0)
    # no ignore band when the thresholds meet
    cls, _ = _assign(anchors, boxes, classes, valid, foreground_iou=0.45, background_iou=0.45)
    np.testing.assert_array_equal(cls, [3, 3, 3, -1, 3, -1, -1, 5])


def test_assign_targets_ties_take_the_lowest_box_index_and_all_best_anchors():
    anchors = np.array([(0, 0, 10, 10), (0, 0, 10, 10), (0, 20, 10, 30)], np.float32)
    # boxes 0 and 1 are the same box (tie for anchors 0 and 1); box 2 sits between anchor 1 and 2 weakly
    boxes = np.array([(0, 0, 10, 10), (0, 0, 10, 10), (0, 28, 10, 38)], np.float32)
    cls, _ = _assign(anchors, boxes, [1, 2, 4], [True, True, True])
    np.testing.assert_array_equal(cls, [1, 1, 4])  # anchor 2: IoU 20/180, claimed by box 2
    cls, _ = _assign(anchors, boxes, [1, 2, 4], [False, True, True])
    np.testing.assert_array_equal(cls, [2, 2, 4])
    # one box equally best for two anchors: low quality claims both
    anchors = np.array([(0, 0, 10, 10), (0, 20, 10, 30), (50, 50, 60, 60)], np.float32)
    boxes = np.array([(0, 5, 10, 25)], np.float32)  # IoU 50/250 with anchors 0 and 1
    cls, _ = _assign(anchors, boxes, [6], [True])
    np.testing.assert_array_equal(cls, [6, 6, -1])


def _unambiguous(best_iou, iou, valid, fg, bg):
    """No anchor's best IoU near a threshold, no near-tie for an anchor's best box or a box's best anchor."""
    if np.min(np.abs(best_iou[:, None] - [fg, bg])) <= MARGIN:
        return False
    scores = np.where(valid[None, :], iou, -1.0)
    for matrix in (scores, scores[:, valid].T):  # per anchor over boxes, per valid box over anchors
        for row in matrix:
            top = np.sort(row)[::-1]
            if len(top) > 1 and top[0] > 0 and top[0] - top[1] <= MARGIN:
                return False
    return True


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("low_quality", [True, False])
def test_assign_targets_match_reference(seed, low_quality):
    rng = np.random.default_rng(10 + seed)
    fg, bg = 0.5, 0.4
    for _ in range(1000):
        boxes = _random_boxes(rng, 6, size=60, min_side=4, max_side=30)
        jittered = boxes + rng.normal(0, 3, boxes.shape).astype(np.float32)  # some good, some poor overlaps
        anchors = np.concatenate([_random_boxes(rng, 30, size=60, min_side=4, max_side=30), jittered])
        anchors[:, 2:] = np.maximum(anchors[:, 2:], anchors[:, :2] + 1.0)
        valid = rng.random(6) < 0.7
        classes = rng.integers(0, 5, 6)
        ref_cls, ref_box, best_iou, iou = _assign_ref(anchors, boxes, classes, valid, fg, bg, low_quality)
        kinds = {-2, -1}.issubset(set(ref_cls)) and np.any(ref_cls >= 0)
        if kinds and _unambiguous(best_iou, iou, valid, fg, bg):
            break
    else:
        raise AssertionError("no unambiguous random case")
    cls, box_t = _assign(anchors, boxes, classes, valid, match_low_quality=low_quality)
    np.testing.assert_array_equal(cls, ref_cls)
    np.testing.assert_allclose(box_t, ref_box, rtol=1e-4, atol=1e-5)


def test_assign_targets_without_boxes_is_all_background():
    anchors = _random_boxes(np.random.default_rng(2), 5)
    boxes = np.array([(0.0, 0.0, 40.0, 40.0), (0.0, 0.0, 0.0, 0.0)], np.float32)
    for valid in ([False, False],):
        cls, box_t = _assign(anchors, boxes, [1, 2], valid)
        np.testing.assert_array_equal(cls, [-1] * 5)
        np.testing.assert_array_equal(box_t, np.zeros((5, 4)))
    cls, box_t = _assign(anchors, np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,), bool))
    np.testing.assert_array_equal(cls, [-1] * 5)
    np.testing.assert_array_equal(box_t, np.zeros((5, 4)))


def test_assign_targets_vmaps_over_a_padded_batch():
    rng = np.random.default_rng(3)
    anchors = _random_boxes(rng, 30, size=60, min_side=4, max_side=30)
    boxes = _random_boxes(rng, 3 * 4, size=60, min_side=4, max_side=30).reshape(3, 4, 4)
    classes = rng.integers(0, 3, (3, 4)).astype(np.int32)
    valid = np.array([[True, True, False, False], [True, False, False, False], [False] * 4])
    batched = jax.jit(jax.vmap(det.assign_targets, in_axes=(None, 0, 0, 0)))(anchors, boxes, classes, valid)
    for i in range(3):
        cls, box_t = _assign(anchors, boxes[i], classes[i], valid[i])
        np.testing.assert_array_equal(batched[0][i], cls)
        np.testing.assert_allclose(batched[1][i], box_t, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(batched[0][2], -1)


# ----------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 1.5), (-1.0, 0.0), (0.25, 0.0), (-1.0, 2.0)])
def test_sigmoid_focal_loss_matches_reference(alpha, gamma):
    logits = np.linspace(-12.0, 12.0, 25, dtype=np.float32)
    logits = np.stack([logits, logits])  # 2, 25
    labels = np.stack([np.zeros(25), np.ones(25)]).astype(np.float32)
    got = det.sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma)
    assert got.shape == (2, 25) and got.dtype == jnp.float32
    expected = [
        [_focal_ref(x, y, alpha, gamma) for x, y in zip(lr, yr, strict=True)]
        for lr, yr in zip(logits, labels, strict=True)
    ]
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-12)


def test_focal_loss_with_gamma_0_and_no_alpha_is_binary_cross_entropy():
    logits = jnp.array([-3.0, -0.5, 0.0, 0.7, 4.0])
    labels = jnp.array([0.0, 1.0, 1.0, 0.0, 1.0])
    bce = [
        -math.log(_sigmoid(x)) if y == 1 else -math.log(1 - _sigmoid(x))
        for x, y in zip(logits.tolist(), labels.tolist(), strict=True)
    ]
    np.testing.assert_allclose(det.sigmoid_focal_loss(logits, labels, alpha=-1.0, gamma=0.0), bce, rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_is_finite_with_finite_gradients_at_large_logits(gamma):
    logits = jnp.array([-200.0, -100.0, -80.0, -30.0, 30.0, 80.0, 100.0, 200.0])  # 1 - p_t underflows at 100
    for label in (0.0, 1.0):
        labels = jnp.full(8, label)
        loss = det.sigmoid_focal_loss(logits, labels, gamma=gamma)
        grad = jax.grad(lambda x, labels=labels: jnp.sum(det.sigmoid_focal_loss(x, labels, gamma=gamma)))(
            logits
        )
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad)), (loss, grad)
    # a confidently wrong positive costs about alpha * |logit|
    np.testing.assert_allclose(
        det.sigmoid_focal_loss(jnp.array([-30.0]), jnp.array([1.0])), [0.25 * 30.0], rtol=1e-5
    )


def test_huber_loss_matches_reference():
    targets = np.zeros(9, np.float32)
    predictions = np.array([-1.0, -0.2, -0.1, -0.05, 0.0, 0.03, 0.1, 0.5, 2.0], np.float32)
    got = det.huber_loss(predictions, targets, delta=0.1)
    np.testing.assert_allclose(got, [_huber_ref(p, 0.0, 0.1) for p in predictions], rtol=1e-6)
    np.testing.assert_allclose(
        det.huber_loss(jnp.array([3.0]), jnp.array([1.0]), delta=1.0), [1.5], rtol=1e-6
    )


def _retinanet_loss_ref(logits, deltas, cls_t, box_t, alpha, gamma, delta, weight):
    batch, anchors, classes = logits.shape
    fg = sum(1 for b in range(batch) for a in range(anchors) if cls_t[b, a] >= 0)
    class_sum, box_sum = 0.0, 0.0
    for b in range(batch):
        for a in range(anchors):
            if cls_t[b, a] == -2:
                continue
            for c in range(classes):
                class_sum += _focal_ref(logits[b, a, c], 1 if cls_t[b, a] == c else 0, alpha, gamma)
            if cls_t[b, a] >= 0:
                for k in range(4):
                    box_sum += _huber_ref(deltas[b, a, k], box_t[b, a, k], delta)
    class_loss = class_sum / max(1, fg)
    box_loss = box_sum / max(1, 4 * fg)
    return class_loss + weight * box_loss, class_loss, box_loss, fg


@pytest.mark.parametrize("case", ["mixed", "no_foreground"])
def test_retinanet_loss_matches_reference(case):
    rng = np.random.default_rng(4)
    batch, anchors, classes = 2, 12, 3
    logits = rng.normal(0, 2, (batch, anchors, classes)).astype(np.float32)
    deltas = rng.normal(0, 0.2, (batch, anchors, 4)).astype(np.float32)
    cls_t = rng.integers(-2, classes, (batch, anchors)).astype(np.int32)
    if case == "no_foreground":
        cls_t = np.where(cls_t >= 0, -1, cls_t)
    box_t = np.where((cls_t >= 0)[..., None], rng.normal(0, 0.2, (batch, anchors, 4)), 0.0).astype(np.float32)
    kwargs = dict(alpha=0.3, gamma=1.5, huber_delta=0.15, box_loss_weight=20.0)
    loss, parts = det.retinanet_loss(logits, deltas, cls_t, box_t, **kwargs)
    ref = _retinanet_loss_ref(logits, deltas, cls_t, box_t, 0.3, 1.5, 0.15, 20.0)
    assert (ref[3] == 0) == (case == "no_foreground") and {-2, -1}.issubset(set(cls_t.ravel()))
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
    np.testing.assert_allclose(parts["class_loss"], ref[1], rtol=1e-5)
    np.testing.assert_allclose(parts["box_loss"], ref[2], rtol=1e-5, atol=1e-9)
    assert float(parts["num_foreground"]) == ref[3]
    # the defaults are the paper's / TF TPU RetinaNet's
    default = det.retinanet_loss(logits, deltas, cls_t, box_t)[0]
    np.testing.assert_allclose(
        default, _retinanet_loss_ref(logits, deltas, cls_t, box_t, 0.25, 2.0, 0.1, 50.0)[0], rtol=1e-5
    )


# ----------------------------------------------------------------------------
# NMS and detect
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("iou_threshold", "score_threshold"), [(0.5, float("-inf")), (0.3, 0.4)])
def test_non_max_suppression_matches_greedy_loop(seed, iou_threshold, score_threshold):
    rng = np.random.default_rng(20 + seed)
    boxes = _boxes_away_from(rng, 40, [iou_threshold])
    scores = rng.permutation(40).astype(np.float32) / 40 + 0.01  # distinct
    expected = _greedy_nms_ref(boxes, scores, iou_threshold, 30, score_threshold)
    assert 1 < len(expected) < 30  # some suppressed, padding present
    indices, valid = det.non_max_suppression(
        boxes, scores, iou_threshold=iou_threshold, max_outputs=30, score_threshold=score_threshold
    )
    assert indices.shape == (30,) and indices.dtype == jnp.int32 and valid.dtype == jnp.bool_
    np.testing.assert_array_equal(valid, np.arange(30) < len(expected))
    np.testing.assert_array_equal(indices[: len(expected)], expected)
    np.testing.assert_array_equal(indices[len(expected) :], 0)
    few, few_valid = det.non_max_suppression(
        boxes, scores, iou_threshold=iou_threshold, max_outputs=3, score_threshold=score_threshold
    )
    np.testing.assert_array_equal(few, expected[:3])
    assert bool(np.all(few_valid))


def test_non_max_suppression_by_hand():
    boxes = jnp.array([[0, 0, 10, 10], [0, 1, 10, 11], [0, 2, 10, 12], [0, 30, 10, 40]], jnp.float32)
    scores = jnp.array([0.9, 0.8, 0.7, 0.6])
    # 1 overlaps 0 by 9/11 -> removed; 2 overlaps 0 by 8/12 -> removed (not rescued by 1 being gone)
    indices, valid = det.non_max_suppression(boxes, scores, max_outputs=4)
    np.testing.assert_array_equal(indices, [0, 3, 0, 0])
    np.testing.assert_array_equal(valid, [True, True, False, False])
    # at threshold 0.7, 2 (IoU 0.667 with 0) survives even though 1 (0.818 with 2) was removed
    indices, valid = det.non_max_suppression(boxes, scores, iou_threshold=0.7, max_outputs=4)
    np.testing.assert_array_equal(indices[: int(valid.sum())], [0, 2, 3])
    indices, valid = det.non_max_suppression(boxes, scores, max_outputs=4, score_threshold=0.6)
    np.testing.assert_array_equal(valid, [True, False, False, False])
    indices, valid = det.non_max_suppression(boxes[jnp.array([3, 2, 1, 0])], scores, max_outputs=4)
    np.testing.assert_array_equal(indices[: int(valid.sum())], [0, 1])  # old box 2 now removes old box 0


def _detect_ref(logits, deltas, anchors, image_size, top_k, score_threshold, iou_threshold, max_det):
    """Per image: sigmoid, top-k (anchor, class) pairs, decode + clip, per-class greedy NMS, merge."""
    height, width = image_size
    out = []
    for b in range(logits.shape[0]):
        pairs = []
        for a in range(logits.shape[1]):
            for c in range(logits.shape[2]):
                pairs.append((_sigmoid(float(logits[b, a, c])), a, c))
        pairs.sort(key=lambda p: -p[0])
        pairs = pairs[:top_k]
        boxes, scores, classes = [], [], []
        for score, a, c in pairs:
            cya, cxa, ha, wa = _centre_size(anchors[a])
            ty, tx, th, tw = (float(v) for v in deltas[b, a])
            cy, cx = cya + ty * ha, cxa + tx * wa
            h, w = ha * math.exp(min(th, math.log(1000 / 16))), wa * math.exp(min(tw, math.log(1000 / 16)))
            box = [cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2]
            box = [min(max(v, 0.0), lim) for v, lim in zip(box, [height, width, height, width], strict=True)]
            boxes.append(box)
            scores.append(score)
            classes.append(c)
        for i in range(len(boxes)):
            for j in range(len(boxes)):
                if classes[i] == classes[j]:
                    assert abs(_iou_ref(boxes[i], boxes[j]) - iou_threshold) > MARGIN, (
                        "ambiguous case: change seed"
                    )
        kept = _greedy_nms_ref(boxes, scores, iou_threshold, max_det, score_threshold, same_group=classes)
        out.append([(boxes[i], scores[i], classes[i]) for i in kept])
    return out


def test_detect_keeps_overlapping_boxes_of_different_classes():
    anchors = jnp.array([[0, 0, 10, 10], [0, 1, 10, 11], [20, 20, 30, 30]], jnp.float32)
    logits = jnp.array([[[3.0, -9.0], [-9.0, 2.0], [1.0, -9.0]]])  # anchor 0 class 0, anchor 1 class 1
    deltas = jnp.zeros((1, 3, 4))
    out = det.detect(logits, deltas, anchors, image_size=(32, 32), max_detections=5)
    assert out.boxes.shape == (1, 5, 4) and out.scores.shape == (1, 5) and out.classes.dtype == jnp.int32
    np.testing.assert_array_equal(out.valid[0], [True, True, True, False, False])
    np.testing.assert_array_equal(out.classes[0], [0, 1, 0, -1, -1])
    np.testing.assert_allclose(out.scores[0, :3], [_sigmoid(3.0), _sigmoid(2.0), _sigmoid(1.0)], rtol=1e-6)
    np.testing.assert_array_equal(out.boxes[0, :3], anchors)
    assert np.all(np.asarray(out.boxes[0, 3:]) == 0) and np.all(np.asarray(out.scores[0, 3:]) == 0)
    # the same two overlapping anchors as one class: the weaker is suppressed
    same = logits.at[0, 1].set(jnp.array([2.0, -9.0]))
    out = det.detect(same, deltas, anchors, image_size=(32, 32), max_detections=5)
    np.testing.assert_array_equal(out.valid[0], [True, True, False, False, False])
    np.testing.assert_allclose(out.scores[0, :2], [_sigmoid(3.0), _sigmoid(1.0)], rtol=1e-6)
    # score threshold: sigmoid(1) = 0.73 is dropped at 0.8; max_detections=1 keeps the best only
    out = det.detect(logits, deltas, anchors, image_size=(32, 32), score_threshold=0.8, max_detections=5)
    np.testing.assert_array_equal(out.valid[0], [True, True, False, False, False])
    out = det.detect(logits, deltas, anchors, image_size=(32, 32), max_detections=1)
    np.testing.assert_array_equal(out.classes, [[0]])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("top_k", [20, 60])  # of 72 (anchor, class) pairs; at 60 the score threshold bites
def test_detect_matches_reference_under_jit(seed, top_k):
    rng = np.random.default_rng(30 + seed)
    batch, num_anchors, num_classes, image_size = 2, 24, 3, (48, 40)
    anchors = _clustered_boxes(rng, num_anchors, clusters=3, jitter=1.0)
    logits = rng.normal(-1.0, 1.5, (batch, num_anchors, num_classes)).astype(np.float32)
    deltas = rng.normal(0, 0.05, (batch, num_anchors, 4)).astype(np.float32)
    kwargs = dict(image_size=image_size, pre_nms_top_k=top_k, score_threshold=0.1, max_detections=25)
    out = jax.jit(lambda lg, dl: det.detect(lg, dl, anchors, **kwargs))(logits, deltas)
    ref = _detect_ref(logits, deltas, anchors, image_size, top_k, 0.1, 0.5, 25)
    for b in range(batch):
        n = len(ref[b])
        assert 0 < n < 25
        np.testing.assert_array_equal(out.valid[b], np.arange(25) < n)
        np.testing.assert_array_equal(out.classes[b, :n], [r[2] for r in ref[b]])
        np.testing.assert_allclose(out.scores[b, :n], [r[1] for r in ref[b]], rtol=1e-5)
        np.testing.assert_allclose(out.boxes[b, :n], [r[0] for r in ref[b]], rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(out.classes)[~np.asarray(out.valid)] == -1)


def test_non_max_suppression_vmaps():
    rng = np.random.default_rng(5)
    boxes = np.stack([_boxes_away_from(rng, 20, [0.5]) for _ in range(3)])
    scores = np.stack([rng.permutation(20) for _ in range(3)]).astype(np.float32)
    nms = jax.jit(jax.vmap(lambda b, s: det.non_max_suppression(b, s, max_outputs=20)))
    indices, valid = nms(boxes, scores)
    for i in range(3):
        expected = _greedy_nms_ref(boxes[i], scores[i], 0.5, 20, float("-inf"))
        np.testing.assert_array_equal(indices[i, : len(expected)], expected)
        assert int(valid[i].sum()) == len(expected)


# ----------------------------------------------------------------------------
# jit, errors
# ----------------------------------------------------------------------------


def test_every_function_jits_and_agrees_with_eager():
    rng = np.random.default_rng(6)
    a, b = _random_boxes(rng, 6), _random_boxes(rng, 4)
    logits = rng.normal(size=(1, 6, 2)).astype(np.float32)
    deltas = rng.normal(0, 0.1, (1, 6, 4)).astype(np.float32)
    cls_t = np.array([[0, -1, -2, 1, -1, -1]], np.int32)
    labels = (rng.random((6, 2)) < 0.5).astype(np.float32)
    cases = [
        (det.box_area, (a,)),
        (det.box_iou, (a, b)),
        (det.encode_boxes, (a, b[0])),
        (det.decode_boxes, (deltas[0], a)),
        (lambda x: det.clip_boxes(x, (20, 30)), (a,)),
        (det.assign_targets, (a, b, np.arange(4, dtype=np.int32), np.array([True, True, False, True]))),
        (det.sigmoid_focal_loss, (logits[0], labels)),
        (det.huber_loss, (deltas[0], deltas[0] * 2)),
        (det.retinanet_loss, (logits, deltas, cls_t, deltas * 0.5)),
        (lambda x, s: det.non_max_suppression(x, s, max_outputs=3), (a, logits[0, :, 0])),
        (lambda lg, dl: det.detect(lg, dl, a, image_size=(40, 40), max_detections=4), (logits, deltas)),
    ]
    for fn, args in cases:
        eager = fn(*args)
        jitted = jax.jit(fn)(*args)
        for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: det.box_iou(jnp.zeros((2, 3)), jnp.zeros((2, 4))), r"last dimension must be 4"),
        (lambda: det.box_area(jnp.zeros((5,))), r"last dimension must be 4"),
        (
            lambda: det.encode_boxes(jnp.zeros((2, 4)), jnp.ones((2, 4)), weights=(1, 1, 0, 1)),
            r"weights=\(1, 1, 0, 1\)",
        ),
        (lambda: det.clip_boxes(jnp.zeros((1, 4)), (0, 4)), r"image_size=\(0, 4\)"),
        (
            lambda: det.assign_targets(
                jnp.zeros((3, 4)),
                jnp.zeros((2, 4)),
                jnp.zeros(2),
                jnp.ones(2, bool),
                foreground_iou=0.4,
                background_iou=0.5,
            ),
            r"background_iou=0.5, foreground_iou=0.4",
        ),
        (
            lambda: det.assign_targets(jnp.zeros((3, 4)), jnp.zeros((2, 4)), jnp.zeros(3), jnp.ones(2, bool)),
            r"classes \(3,\)",
        ),
        (lambda: det.sigmoid_focal_loss(jnp.zeros(3), jnp.zeros(3), gamma=-1.0), r"gamma=-1.0"),
        (lambda: det.sigmoid_focal_loss(jnp.zeros(3), jnp.zeros(4)), r"same shape"),
        (lambda: det.huber_loss(jnp.zeros(3), jnp.zeros(3), delta=0.0), r"delta=0.0"),
        (
            lambda: det.retinanet_loss(
                jnp.zeros((1, 5, 2)), jnp.zeros((1, 5, 4)), jnp.zeros((1, 4)), jnp.zeros((1, 5, 4))
            ),
            r"class_targets has shape \(1, 4\)",
        ),
        (lambda: det.non_max_suppression(jnp.zeros((3, 4)), jnp.zeros(3), max_outputs=0), r"max_outputs=0"),
        (
            lambda: det.non_max_suppression(jnp.zeros((3, 4)), jnp.zeros(3), iou_threshold=1.5),
            r"iou_threshold=1.5",
        ),
        (lambda: det.non_max_suppression(jnp.zeros((3, 5)), jnp.zeros(3)), r"\(3, 5\)"),
        (
            lambda: det.detect(
                jnp.zeros((1, 5, 2)), jnp.zeros((1, 5, 4)), jnp.zeros((4, 4)), image_size=(8, 8)
            ),
            r"anchors \(4, 4\)",
        ),
        (
            lambda: det.detect(
                jnp.zeros((1, 5, 2)),
                jnp.zeros((1, 5, 4)),
                jnp.zeros((5, 4)),
                image_size=(8, 8),
                max_detections=0,
            ),
            r"max_detections=0",
        ),
        (
            lambda: det.detect(
                jnp.zeros((1, 5, 2)),
                jnp.zeros((1, 5, 4)),
                jnp.zeros((5, 4)),
                image_size=(8, 8),
                pre_nms_top_k=0,
            ),
            r"pre_nms_top_k=0",
        ),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
