"""Bad input stops a run before training with a message that names the problem: config typos,
records that do not fit the data set, a checkpoint of another model, a read-only or full disk;
and non-finite values stop the run or skip the update, as configured."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess

import chex
import jax
import numpy as np
import pytest

from tests import train_helpers as helpers
from train import checkpoint, loop, preflight
from train.data import dataset, digits, pipeline


def run(tmp_path, overrides=None, **kwargs):
    return loop.train_and_evaluate(helpers.tiny_config(overrides), str(tmp_path / "workdir"), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_sise": 8}, r"unknown config key\(s\) 'batch_sise' \(did you mean 'batch_size'\?\)"),
        ({"zzz": 1}, r"unknown config key\(s\) 'zzz'; train/configs/default.py defines every key"),
        ({"nonfinite_policy": "ignore"}, r"nonfinite_policy='ignore' must be one of \('stop', 'skip'\)"),
        ({"checkpoint_every_steps": 0}, r"checkpoint_every_steps=0 must be positive"),
        ({"dtype": "int8"}, r"dtype='int8' must be a floating-point type"),
    ],
)
def test_config_typos_and_bad_values_are_errors(tmp_path, overrides, message):
    config = helpers.tiny_config()
    with config.unlocked():
        for key, value in overrides.items():
            config[key] = value  # as a notebook would, bypassing the command line's own check
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, str(tmp_path / "workdir"))
    assert not (tmp_path / "workdir").exists()


def test_config_missing_a_key_is_an_error(tmp_path):
    config = helpers.tiny_config()
    del config["max_skipped_steps"]
    with pytest.raises(ValueError, match=r"config lacks key\(s\) \['max_skipped_steps'\]"):
        loop.train_and_evaluate(config, str(tmp_path / "workdir"))


def digits_with(**changes) -> dataset.Dataset:
    """scikit-learn's digits with some fields of the data set or of its training source replaced."""
    data = digits.digits()
    source = {name: changes.pop(name) for name in ("images", "labels") if name in changes}
    return dataclasses.replace(data, train=dataclasses.replace(data.train, **source), **changes)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            lambda: digits_with(image_shape=(8, 8, 3)),
            r"a training record's image has shape \(8, 8, 1\), but the data set's image_shape is \(8, 8, 3\)",
        ),
        (
            lambda: digits_with(num_classes=5),
            r"a (training|test) record has label \d+; labels must be integers in \[0, 5\) "
            r"\(the data set's num_classes is 5\)",
        ),
    ],
)
def test_custom_data_set_that_does_not_fit_fails_before_training(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, data=data())
    assert not (tmp_path / "workdir").exists()


def test_a_bad_record_deep_in_the_data_is_named_when_read(tmp_path):
    data = digits.digits()
    labels = data.train.labels.copy()
    labels[1:] = 10  # record 0 (checked up front) is fine, every other label is out of range
    with pytest.raises(
        ValueError, match=r"a training record has label 10; labels must be integers in \[0, 10\)"
    ):
        run(tmp_path, data=digits_with(labels=labels))


def test_checkpoint_of_another_model_names_the_arrays_that_differ(tmp_path):
    """A checkpoint that does not fit the model even where config.json does not say so (deleted here;
    or the model's code changed since): every differing array is named and nothing is written."""
    run(tmp_path, {"num_train_steps": 2})
    (tmp_path / "workdir" / "config.json").unlink()
    with pytest.raises(ValueError) as error:
        run(tmp_path, {"num_train_steps": 4, "model_overrides.width": 12})
    message = str(error.value)
    assert "the checkpoint of step 2 in" in message and "is not of this model and config" in message
    first = message.splitlines()[1].strip()  # parameters come first
    assert first.startswith("params/") and "checkpoint float32[" in first and "this model float32[" in first
    assert "params/head/fc/kernel: checkpoint float32[32, 10], this model float32[48, 10]" in message
    with pytest.raises(
        ValueError, match=r"head/fc/kernel: missing from the checkpoint|in the checkpoint but not"
    ):
        run(tmp_path, {"num_train_steps": 4, "model": "resnet_cifar"})
    with checkpoint.create_manager(str(tmp_path / "workdir"), max_to_keep=10) as manager:
        assert manager.all_steps() == [2]  # nothing was overwritten
    assert not (tmp_path / "workdir" / "config.json").exists()  # nor recorded as this run's


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A fresh tmpfs mounted at ``path`` (a real read-only or small file system); None where this
    process may not mount."""
    path.mkdir()
    mounted = (
        shutil.which("mount")
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_read_only_workdir_fails_before_training(tmp_path, monkeypatch):
    with tmpfs(tmp_path / "disk", "ro,size=1m") as disk:
        if disk is None:  # no real read-only file system here: the error it would raise
            monkeypatch.setattr(preflight.os, "makedirs", fake_os_error(30, "Read-only file system"))
            disk = tmp_path / "disk"
        workdir = disk / "run"
        with pytest.raises(
            OSError, match=rf"the workdir {workdir} is not writable \(Read-only file system\)"
        ):
            loop.train_and_evaluate(helpers.tiny_config(), str(workdir))


def fake_os_error(code: int, text: str):
    def fail(*args, **kwargs):
        raise OSError(code, text)

    return fail


def test_workdir_without_room_for_the_checkpoints_fails_before_training(tmp_path, monkeypatch):
    config = helpers.tiny_config({"max_checkpoints_to_keep": 3})
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        if disk is None:  # no real small file system here: pretend 256 KiB are free
            monkeypatch.setattr(
                preflight.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, 2**18)
            )
            disk = tmp_path / "disk"
        with pytest.raises(
            OSError, match=r"has 0.2 MiB free, but this run writes up to 4 more checkpoints of "
        ):
            loop.train_and_evaluate(config, str(disk / "run"))


def poisoned_digits(step: int) -> tuple[dataset.Dataset, list[int]]:
    """Digits with a NaN image in the first batch of training step ``step``; also every step of the
    first 4 whose batch holds a NaN (the record may recur)."""
    data = digits.digits()
    batches = pipeline.train_iterator(data, batch_size=8, seed=0)
    target = [next(batches) for _ in range(step)][-1]["image"][0]
    images = data.train.images.astype(np.float32)
    normalized = data.train_transform({"image": images, "label": 0}, None)["image"]
    images[np.all(normalized == target, axis=(1, 2, 3))] = np.nan
    poisoned = digits_with(images=images)
    batches = pipeline.train_iterator(poisoned, batch_size=8, seed=0)
    bad_steps = [s for s in range(1, 5) if np.isnan(next(batches)["image"]).any()]
    assert step in bad_steps
    return poisoned, bad_steps


def test_nonfinite_policy_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    data, _ = poisoned_digits(2)
    with pytest.raises(
        FloatingPointError, match=r"diverged at step 2 \(loss nan.*last good checkpoint is step 1"
    ):
        run(tmp_path, {"checkpoint_every_steps": 1}, data=data)
    with checkpoint.create_manager(str(tmp_path / "workdir"), max_to_keep=10) as manager:
        assert manager.all_steps() == [1]


def test_nonfinite_policy_skip_keeps_the_state_and_counts(tmp_path, capsys):
    data, bad_steps = poisoned_digits(2)
    config = {"checkpoint_every_steps": 1, "nonfinite_policy": "skip"}
    state = run(tmp_path, config, data=data)
    assert int(state.step) == 4 and int(state.skipped_steps) == len(bad_steps)
    assert f"Skipped the updates of steps [{bad_steps[0]}]" in capsys.readouterr().out
    chex.assert_tree_all_finite(helpers.flat_params(state.params))
    saved = {}
    with checkpoint.create_manager(str(tmp_path / "workdir"), max_to_keep=10) as manager:
        for step in (1, 2):
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
            )
            saved[step] = checkpoint.restore(manager, abstract, step=step)
    before, after = saved[1], saved[2]
    assert int(after.step) == 2 and int(after.skipped_steps) == 1  # step 2 advanced past its batch ...
    for name in ("params", "opt_state", "batch_stats"):  # ... but changed nothing else
        chex.assert_trees_all_equal(getattr(before, name), getattr(after, name))
    with pytest.raises(
        FloatingPointError, match=r"1 updates skipped .*max_skipped_steps=0\), the last at step 2"
    ):
        run(tmp_path / "strict", {**config, "max_skipped_steps": 0}, data=data)
