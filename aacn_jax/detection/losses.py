"""RetinaNet losses: sigmoid focal loss for classification, Huber loss for box regression.

Lin, Goyal, Girshick, He, Dollar. "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002:
``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``alpha = 0.25, gamma = 2`` (the best pair in
its Table 1b), summed over all anchors and normalised by the number of anchors assigned to a box.
The box loss and its weight follow the TF TPU RetinaNet (tensorflow/tpu,
models/official/retinanet/retinanet_model.py, ``default_hparams``): Huber loss with ``delta = 0.1``
(about the mean regression target), normalised by 4 x the foreground count, total
``class_loss + 50 * box_loss``. That code normalises by (foreground count + 1) and later versions
lowered gamma to 1.5; here the paper's gamma 2 and ``max(1, foreground count)`` are used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aacn_jax.detection.targets import IGNORED

__all__ = ["huber_loss", "retinanet_loss", "sigmoid_focal_loss"]


def sigmoid_focal_loss(
    logits: jax.Array, labels: jax.Array, *, alpha: float = 0.25, gamma: float = 2.0
) -> jax.Array:
    """Elementwise focal loss of ``logits`` against 0/1 ``labels`` of the same shape (float32).

    ``p = sigmoid(logits)``, ``p_t = p`` where the label is 1 and ``1 - p`` where it is 0,
    ``alpha_t = alpha`` resp. ``1 - alpha``; ``loss = -alpha_t (1 - p_t)^gamma log(p_t)``.
    ``alpha < 0`` switches the alpha weighting off (``alpha_t = 1``); ``gamma = 0`` with ``alpha < 0``
    is plain binary cross-entropy. ``-log(p_t)`` and ``1 - p_t`` are computed from the logits
    (softplus, ``sigmoid(-logits)``), so large logits neither overflow nor lose ``1 - p_t`` to rounding;
    value and gradient stay finite for any logits and any ``gamma >= 0``.
    """
    if gamma < 0:
        raise ValueError(f"gamma={gamma} must be >= 0")
    if alpha > 1:
        raise ValueError(f"alpha={alpha} must be <= 1 (or negative to switch the weighting off)")
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    if logits.shape != labels.shape:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} must have the same shape")
    # -log(p_t) = label * softplus(-x) + (1 - label) * softplus(x): binary cross-entropy with logits.
    cross_entropy = labels * jax.nn.softplus(-logits) + (1.0 - labels) * jax.nn.softplus(logits)
    one_minus_p_t = labels * jax.nn.sigmoid(-logits) + (1.0 - labels) * jax.nn.sigmoid(logits)
    # (1 - p_t)^gamma, 0 where 1 - p_t underflows to 0 (|logits| > ~88): the inner where keeps the
    # gradient of the power finite there for every gamma (0 ** (gamma - 1) is inf for gamma < 1).
    nonzero = one_minus_p_t > 0
    modulator = jnp.where(nonzero, jnp.where(nonzero, one_minus_p_t, 1.0) ** gamma, 0.0)
    loss = modulator * cross_entropy
    if alpha >= 0:
        loss = (alpha * labels + (1.0 - alpha) * (1.0 - labels)) * loss
    return loss


def huber_loss(predictions: jax.Array, targets: jax.Array, *, delta: float = 0.1) -> jax.Array:
    """Elementwise Huber loss: ``e = predictions - targets``; ``e^2 / 2`` where ``|e| <= delta``,
    ``delta (|e| - delta / 2)`` beyond (TF's ``huber_loss``, not divided by delta)."""
    if delta <= 0:
        raise ValueError(f"delta={delta} must be > 0")
    error = jnp.abs(jnp.asarray(predictions, jnp.float32) - jnp.asarray(targets, jnp.float32))
    quadratic = jnp.minimum(error, delta)
    return 0.5 * quadratic**2 + delta * (error - quadratic)


def retinanet_loss(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    class_targets: jax.Array,
    box_targets: jax.Array,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    huber_delta: float = 0.1,
    box_loss_weight: float = 50.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RetinaNet training loss of a batch.

    ``class_logits [B, A, C]``, ``box_deltas [B, A, 4]``; ``class_targets [B, A]`` int (class id
    foreground, -1 background, -2 ignored) and ``box_targets [B, A, 4]`` from
    :func:`~aacn_jax.detection.assign_targets`. With F = foreground anchors in the whole batch:

    - ``class_loss``: :func:`sigmoid_focal_loss` against one-hot targets (all zeros for background),
      summed over every class of every non-ignored anchor, divided by ``max(1, F)``;
    - ``box_loss``: :func:`huber_loss` summed over the 4 deltas of the foreground anchors, divided by
      ``max(1, 4 F)``;
    - ``loss = class_loss + box_loss_weight * box_loss`` (TF TPU RetinaNet's weighting, see module).

    Returns ``(loss, {"class_loss", "box_loss", "num_foreground"})``, all float32 scalars.
    """
    class_logits = jnp.asarray(class_logits, jnp.float32)
    box_deltas = jnp.asarray(box_deltas, jnp.float32)
    class_targets = jnp.asarray(class_targets, jnp.int32)
    box_targets = jnp.asarray(box_targets, jnp.float32)
    if class_logits.ndim != 3:
        raise ValueError(f"class_logits has shape {class_logits.shape}: must be [B, A, C]")
    batch, num_anchors, num_classes = class_logits.shape
    expected = {
        "box_deltas": (box_deltas.shape, (batch, num_anchors, 4)),
        "class_targets": (class_targets.shape, (batch, num_anchors)),
        "box_targets": (box_targets.shape, (batch, num_anchors, 4)),
    }
    for name, (shape, want) in expected.items():
        if shape != want:
            raise ValueError(f"{name} has shape {shape}: must be {want} to match class_logits")

    foreground = class_targets >= 0  # B, A
    num_foreground = jnp.sum(foreground).astype(jnp.float32)
    labels = jax.nn.one_hot(class_targets, num_classes, dtype=jnp.float32)  # B, A, C; -1/-2 -> zeros
    focal = sigmoid_focal_loss(class_logits, labels, alpha=alpha, gamma=gamma)  # B, A, C
    focal = jnp.where((class_targets != IGNORED)[..., None], focal, 0.0)
    class_loss = jnp.sum(focal) / jnp.maximum(1.0, num_foreground)
    huber = huber_loss(box_deltas, box_targets, delta=huber_delta)  # B, A, 4
    box_loss = jnp.sum(jnp.where(foreground[..., None], huber, 0.0)) / jnp.maximum(1.0, 4.0 * num_foreground)
    loss = class_loss + box_loss_weight * box_loss
    return loss, {"class_loss": class_loss, "box_loss": box_loss, "num_foreground": num_foreground}
