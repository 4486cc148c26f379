"""Classify pictures, or find objects in them: ``python -m train.predict --workdir DIR IMAGE...``.

Detection runs (``config.task = "detection"``): each picture is resized and padded as the run's
test images are, the detections (score above ``--min_score``) are printed as class, score and
box ``(x1, y1, x2, y2)`` in the picture's pixels, and ``--draw DIR`` also writes each picture with
its boxes drawn on it to ``DIR`` (PNG). The rest of this text is about classification runs.

Each PNG or JPEG (any size) is prepared as the run's test transform prepares its images
(``train.inference.prepare``), the model of the workdir's latest checkpoint (or
``--step``) classifies them in jitted batches, and the top classes are printed with their
probabilities and, where the data set has them, names. ``--export PATH`` also writes the inference
function with its weights as a ``jax.export`` artifact (StableHLO for ``--export_platform``: cpu,
tpu or cuda; one platform per artifact, as the Pallas kernels of the TPU and GPU attention lower
for their own platform only) for batches of ``--batch_size`` images, which runs with JAX alone::

    exported = jax.export.deserialize(open(PATH, "rb").read())
    logits = exported.call(images)  # float32 [batch_size, H, W, C], prepared as above

(The batch is fixed because the attention path is chosen by the size of its logits.)

Bad input (a workdir without a run or checkpoint, a picture that does not decode, an export path
that cannot be written) is one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from train import checkpoint, cli, run_record
from train.data.coco import picture_box
from train.inference import (
    classify,
    detector,
    export_inference,
    load,
    padded_batches,
    prepare,
    prepare_detection,
)

EXPORT_PLATFORMS = ("cpu", "tpu", "cuda")
DRAW_SIZE = 512  # --draw enlarges pictures smaller than this by a whole factor


def class_name(class_id: int, class_names: Sequence[str]) -> str:
    return class_names[class_id] if class_names else str(class_id)


def draw(
    path: str,
    found: Sequence[tuple[int, float, tuple[float, ...]]],
    out_path: str,
    class_names: Sequence[str],
) -> None:
    """Write the picture at ``path`` with each ``(class id, score, (x1, y1, x2, y2))`` drawn in its
    class's colour, as PNG (enlarged by a whole factor when smaller than DRAW_SIZE)."""
    with Image.open(path) as picture:
        canvas = picture.convert("RGB")
    zoom = max(1, DRAW_SIZE // max(canvas.size))  # small pictures are enlarged so the labels can be read
    canvas = canvas.resize((canvas.width * zoom, canvas.height * zoom), Image.Resampling.NEAREST)
    pen = ImageDraw.Draw(canvas)
    font_size = max(12, canvas.height // 24)
    font = ImageFont.load_default(size=font_size)
    palette = ((255, 80, 80), (80, 220, 80), (90, 160, 255), (255, 200, 40), (220, 90, 255), (40, 220, 220))
    for class_id, score, box in found:
        colour = palette[class_id % len(palette)]
        x1, y1, x2, y2 = (v * zoom for v in box)
        pen.rectangle((x1, y1, x2, y2), outline=colour, width=3)
        label = f"{class_name(class_id, class_names)} {score:.2f}"
        corner = (min(x1, canvas.width - pen.textlength(label, font=font) - 2), max(y1, font_size + 2))
        left, top, right, bottom = pen.textbbox(corner, label, font=font, anchor="lb")
        pen.rectangle((left - 2, top - 2, right + 2, bottom), fill=colour)
        pen.text(corner, label, fill=(0, 0, 0), font=font, anchor="lb")
    canvas.save(out_path)


def predict_detection(
    args: argparse.Namespace, model: nn.Module, variables: Any, config: Any, dataset: dict[str, Any]
) -> None:
    """Print (and with ``--draw``, draw) the detections of every picture of ``args.images``;
    ``dataset``: the run's ``dataset.json``."""
    size, names = dataset["image_shape"][0], dataset["class_names"]
    images, scales = prepare_detection(args.images, size)
    run = detector(model, config.detection, size, args.min_score)
    for start, padded in padded_batches(images, args.batch_size):
        found = jax.device_get(run(variables, padded))
        for i, path in enumerate(args.images[start : start + args.batch_size]):
            items = [
                (
                    int(found.classes[i, d]),
                    float(found.scores[i, d]),
                    picture_box(found.boxes[i, d], scales[start + i]),
                )
                for d in np.flatnonzero(found.valid[i])
            ]
            text = ", ".join(
                f"{class_name(c, names)} {p:.2f} at ({b[0]:.0f}, {b[1]:.0f}, {b[2]:.0f}, {b[3]:.0f})"
                for c, p, b in items
            )
            print(f"{path}: {text or 'nothing found'}")
            if args.draw:
                out = os.path.join(args.draw, os.path.splitext(os.path.basename(path))[0] + ".png")
                draw(path, items, out, names)
    if args.draw:
        print(f"wrote {len(args.images)} picture(s) with their boxes to {args.draw}")


def top_classes(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[str]:
    """``"name (p%)"`` of the ``k`` most probable classes of each row."""
    rows = []
    for row in probabilities:
        best = np.argsort(row)[::-1][:k]
        rows.append(", ".join(f"{class_names[i] if class_names else i} ({row[i]:.1%})" for i in best))
    return rows


def _check_inputs(args: argparse.Namespace) -> None:
    """Every bad input named in one line, before any work."""
    for name in (run_record.CONFIG_FILE, run_record.DATASET_FILE):
        if not os.path.exists(os.path.join(args.workdir, name)):
            cli.fail(f"--workdir {args.workdir} has no {name}: give the workdir of a python -m train run")
    steps = checkpoint.saved_steps(args.workdir)
    if not steps:
        cli.fail(
            f"--workdir {args.workdir} has no checkpoint yet: train first (python -m train --workdir ...)"
        )
    if args.step is not None and args.step not in steps:
        cli.fail(f"--step {args.step}: no such checkpoint in {args.workdir}: give one of {steps}")
    for name in ("top", "batch_size"):
        if getattr(args, name) < 1:
            cli.fail(f"--{name} {getattr(args, name)}: give a positive number")
    for path in args.images:
        try:
            with Image.open(path) as picture:
                picture.verify()
        except (OSError, SyntaxError) as error:
            cli.fail(f"image {path} cannot be decoded ({error}): give PNG or JPEG files")
    if args.draw and (not os.path.isdir(args.draw) or not os.access(args.draw, os.W_OK)):
        cli.fail(f"--draw {args.draw}: not a writable folder: create it or give another")
    if run_record.read_dataset(args.workdir).get("task") == "detection" and args.export:
        cli.fail("--export: exports classifiers only; a detection run's outputs need its post-processing")
    if args.export:
        folder = os.path.dirname(os.path.abspath(args.export))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            cli.fail(f"--export {args.export}: cannot write in {folder}: give a path in a writable folder")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="PNG or JPEG files")
    parser.add_argument("--workdir", required=True, help="workdir of a python -m train run")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--top", type=int, default=5, help="classes printed per image")
    parser.add_argument("--batch_size", type=int, default=64, help="images per jitted call (and export)")
    parser.add_argument("--export", help="also write the inference function as a jax.export artifact here")
    parser.add_argument(
        "--export_platform", default="cpu", choices=EXPORT_PLATFORMS, help="the artifact's platform"
    )
    parser.add_argument(
        "--min_score", type=float, default=0.3, help="detection runs: the lowest score printed"
    )
    parser.add_argument("--draw", help="detection runs: write the pictures with their boxes to this folder")
    args = parser.parse_args(argv)
    _check_inputs(args)
    dataset = run_record.read_dataset(args.workdir)
    step = args.step if args.step is not None else checkpoint.saved_steps(args.workdir)[-1]
    config = run_record.read_config(args.workdir)
    if dataset.get("task") == "detection":
        print(
            f"Finding objects in {len(args.images)} image(s) with {config.model} ({dataset['dataset']}, "
            f"{dataset['num_classes']} classes) from the checkpoint of step {step} in {args.workdir}",
            flush=True,
        )
        model, variables, _ = load(args.workdir, args.step)
        predict_detection(args, model, variables, config, dataset)
        return
    print(
        f"Classifying {len(args.images)} image(s) with {config.model} ({dataset['dataset']}, "
        f"{dataset['num_classes']} classes) from the checkpoint of step {step} in {args.workdir} "
        f"on {jax.local_device_count()} {jax.devices()[0].platform} device(s)",
        flush=True,
    )
    images = prepare(args.workdir, args.images)
    model, variables, _ = load(args.workdir, args.step)
    batch = args.batch_size
    if args.export:  # first: a platform that cannot be lowered here fails before any answer
        try:
            exported = export_inference(model, variables, dataset["image_shape"], batch, args.export_platform)
        except RuntimeError as error:  # JAX 0.12 lowers the GPU Triton kernel only on a GPU machine
            cli.fail(f"--export_platform {args.export_platform}: {error}: export on a machine with one")
        artifact = exported.serialize()
    rows = classify(model, variables, images, batch)
    for path, text in zip(args.images, top_classes(rows, dataset["class_names"], args.top), strict=True):
        print(f"{path}: {text}")
    if args.export:
        with open(args.export, "wb") as file:
            file.write(artifact)
        print(f"wrote {args.export}: logits of {batch} images at a time, for {args.export_platform}")


if __name__ == "__main__":
    main()
