"""``python -m train.compile`` and ``train.aot``: a run compiled for a TPU topology by the real TPU
compiler (libtpu's compile-only devices), from the data set's layout alone: no data, no chips.

The fitting case is the docs' own example (docs/training.md: ``python -m train``'s default run on
``v5e:1x1``)."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_train_detection import tiny_detection_config, tiny_detection_data
from tests.train_helpers import REPO, subprocess_env, tiny_config
from train import aot
from train import data as train_data
from train import program as run_program
from train.data import pipeline
from train.errors import InputError

GiB = 2**30


@pytest.mark.parametrize("dataset", ["digits", "same_different", "shapes"])
def test_a_registered_layout_is_what_its_data_set_makes(dataset):
    """Each entry's layout, read without data, equals that of the data set it creates (the data sets
    that need files, CIFAR, ImageNet and COCO, state theirs from the same constants)."""
    config = tiny_config(
        {"dataset": dataset, "task": "detection" if dataset == "shapes" else "classification"}
    )
    data = train_data.create_dataset(config)
    layout = train_data.layout(config)
    assert (layout.num_classes, layout.image_shape, layout.task, layout.max_boxes) == (
        data.num_classes,
        data.image_shape,
        data.task,
        data.max_boxes,
    )


def _shapes(batch) -> dict:
    return {name: (np.shape(x), np.asarray(x).dtype) for name, x in batch.items()}


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_batch_shapes_are_those_of_the_pipelines(task):
    data = train_data.create_dataset(tiny_config()) if task == "classification" else tiny_detection_data()
    train_batch = next(pipeline.train_iterator(data, batch_size=4, seed=0))
    test_batch = next(iter(pipeline.test_batches(data, batch_size=4)))
    expected = {name: (x.shape, np.dtype(x.dtype)) for name, x in data.batch_shapes(4).items()}
    assert _shapes(train_batch) == expected
    assert _shapes(test_batch) == {
        name: (x.shape, np.dtype(x.dtype)) for name, x in data.batch_shapes(4, test=True).items()
    }


@pytest.mark.parametrize("guess", [1, 8, 100, 5000])
@pytest.mark.parametrize("unit", [1, 4])
@pytest.mark.parametrize("threshold", [0, 3, 8, 9, 100, 1000, 5000])
def test_largest_fitting_finds_the_largest_size_that_fits(threshold, unit, guess):
    tried = []

    def fits(batch_size):
        assert batch_size % unit == 0 and 0 < batch_size <= 1024
        tried.append(batch_size)
        return batch_size <= threshold

    found = aot.largest_fitting(fits, guess=guess, unit=unit, limit=1024)
    assert found == min(threshold, 1024) // unit * unit
    assert len(tried) <= 4 * 10 + 2  # galloping, then bisection: logarithmic in the distance
    if guess // unit * unit == found > 0 and found < 1024 // unit * unit:
        assert len(tried) == 2  # a right guess costs two calls


class LinearFootprint(aot.Compiler):
    """A compiler whose steps need ``fixed + per_image * batch`` bytes (no TPU compiles)."""

    def __init__(self, fixed: int, per_image: int, hbm: int, devices: int):
        self.devices, self.hbm, self.compiled = [None] * devices, hbm, []
        self.fixed, self.per_image = fixed, per_image

    def compile(self, step, batch_size):
        self.compiled.append(batch_size)
        total = self.fixed + self.per_image * batch_size
        if total > self.hbm:
            raise aot.DoesNotFit(f"{total} bytes")
        return aot.Footprint(total, 0, 0, 0, 0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("fixed", "per_image", "start"), [(10**8, 10**7, 128), (10**9, 3 * 10**7, 512), (0, 10**6, 8)]
)
def test_largest_batch_follows_the_line_of_two_compiles(fixed, per_image, start):
    compiler = LinearFootprint(fixed, per_image, hbm=16 * GiB, devices=4)
    expected = (16 * GiB - fixed) // per_image // 4 * 4
    assert compiler.largest_batch(start, limit=2**20) == expected
    assert len(compiler.compiled) <= 4, compiler.compiled  # the line, then the guess and one more


def test_the_usable_hbm_is_the_compilers_figure_per_device():
    """Below each chip's HBM (16 GiB on v5e; a v2 chip's 16 GiB is split between its two cores),
    by what the compiler keeps for itself."""
    v5e, v2 = aot.topology_devices("v5e:1x1")[0], aot.topology_devices("v2:2x2")[0]
    assert 15 * GiB < aot.usable_hbm(v5e) <= 16 * GiB
    assert 7 * GiB < aot.usable_hbm(v2) <= 8 * GiB


@pytest.mark.parametrize(
    ("topology", "message"),
    [("v9x:1x1", "Invalid TPU external name"), ("tpu-v5e-8", "named like v5e:1x1")],
)
def test_a_bad_topology_is_an_input_error(topology, message):
    with pytest.raises(InputError, match=message):
        aot.topology_devices(topology)


def test_a_batch_the_devices_do_not_divide_is_an_input_error():
    compiler = aot.Compiler(tiny_config(), "v5e:2x2")
    with pytest.raises(InputError, match="multiple of the 4 devices of v5e:2x2"):
        compiler.compile("train", 6)


def test_a_detection_run_is_built_from_its_layout():
    """The task of a layout without records: the train step's shapes follow through a RetinaNet's loss."""
    config = tiny_detection_config()
    devices = aot.topology_devices("v5e:1x1")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    layout = train_data.layout(config)
    program = run_program.build(config, layout, mesh, steps_per_epoch=1)
    assert program.task.finish is None
    _, metrics = jax.eval_shape(program.train_step, program.abstract_state, layout.batch_shapes(8))
    assert {"loss", "class_loss", "box_loss", "foreground_anchors"} <= metrics.keys()


def test_a_run_too_big_for_the_chip_is_one_line_and_exit_2():
    """The default digits model at a batch no v5e holds: the compiler's refusal, in one line."""
    command = [sys.executable, "-m", "train.compile", "--topology", "v5e:1x1", "--config.batch_size=1048576"]
    result = subprocess.run(
        [*command, "--noeval"], capture_output=True, text=True, env=subprocess_env(1), cwd=REPO
    )
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "the train step at global batch 1048576 does not fit a TPU v5 lite of v5e:1x1" in error[0]
    assert "exceeds available HBM" in error[0] and "lower --config.batch_size" in error[0]
