"""Using a trained model: the workdir's run record, ``train.load``, ``python -m train.predict`` and
its exported artifact run by JAX alone, and their answers to bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import train
from tests.train_helpers import REPO, subprocess_env
from train import inference, run_record
from train.configs import default
from train.data import digits

HELD_OUT = 50
# Runs the artifact with the repository's packages made unimportable: JAX alone must do.
ARTIFACT_RUNNER = """
import sys
sys.modules["aacn_jax"] = sys.modules["train"] = None  # any import of them now fails
try:
    import aacn_jax
except ImportError:
    pass
else:
    raise SystemExit("aacn_jax is importable")
import numpy as np
from jax import export

exported = export.deserialize(open(sys.argv[1], "rb").read())
np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]))))
"""


def _run(args, **kwargs):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=subprocess_env(1), cwd=REPO, **kwargs
    )


@pytest.fixture(scope="module")
def workdir(trained_digits):
    return trained_digits


@pytest.fixture(scope="module")
def held_out_pictures(tmp_path_factory):
    """The first test digits as PNG files (0..16 scaled to 0..255) and their labels."""
    folder = tmp_path_factory.mktemp("pictures")
    test = digits.digits().test
    paths, labels = [], []
    for index in range(HELD_OUT):
        record = test[index]
        path = folder / f"digit{index}.png"
        pixels = record["image"][..., 0].astype(np.float32) * 255 / 16
        Image.fromarray(np.round(pixels).astype(np.uint8)).save(path)
        paths.append(str(path))
        labels.append(int(record["label"]))
    return paths, labels


def test_predict_classifies_held_out_digits_and_exports_what_jax_alone_runs(
    workdir, held_out_pictures, tmp_path
):
    paths, labels = held_out_pictures
    artifact = tmp_path / "model.jax"
    batch = 16
    command = ["-m", "train.predict", "--workdir", str(workdir), "--batch_size", str(batch)]
    result = _run([*command, "--export", str(artifact), *paths])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Classifying {HELD_OUT} image(s) with aa_resnet_cifar (digits, 10 classes)")
    answers = {line.split(": ")[0]: line.split(": ")[1] for line in lines if line.startswith(tuple(paths))}
    assert list(answers) == paths and all(text.count("%") == 5 for text in answers.values())
    predicted = [int(answers[path].split(" ")[0]) for path in paths]
    accuracy = np.mean(np.array(predicted) == np.array(labels))
    assert accuracy >= 0.95, accuracy

    images = inference.prepare(str(workdir), paths[:batch])
    np.save(tmp_path / "images.npy", images)
    outside = subprocess.run(
        [sys.executable, "-I", "-c", ARTIFACT_RUNNER, str(artifact), "images.npy", "logits.npy"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**subprocess_env(1), "PYTHONPATH": ""},
    )
    assert outside.returncode == 0, outside.stderr[-3000:]
    model, variables, config = train.load(str(workdir))
    assert config.model == "aa_resnet_cifar"
    want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, rtol=1e-5, atol=1e-5)


def test_load_reads_the_checkpoints_model_variables_only(workdir):
    _, variables, _ = train.load(str(workdir), step=50)
    assert set(variables) == {"params", "batch_stats"}
    saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "50" / "state")
    assert "opt_state" in saved  # the checkpoint has it; load leaves it out
    chex.assert_trees_all_equal(variables, {key: saved[key] for key in ("params", "batch_stats")})
    latest = train.load(str(workdir))[1]
    assert not np.array_equal(jax.tree.leaves(latest["params"])[0], jax.tree.leaves(variables["params"])[0])


def test_eval_only_needs_only_the_workdir(workdir):
    result = _run(["-m", "train", "--workdir", str(workdir), "--eval_only"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Evaluating aa_resnet_cifar on digits" in result.stdout
    assert "Final test top-1" in result.stdout and "at step 100" in result.stdout


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(workdir, held_out_pictures, tmp_path):
    picture = held_out_pictures[0][0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    empty = tmp_path / "empty"
    empty.mkdir()
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    for name in (run_record.CONFIG_FILE, run_record.DATASET_FILE):
        (untrained / name).write_text((workdir / name).read_text())
    cases = [
        ([str(broken)], workdir, f"image {broken} cannot be decoded"),
        ([picture], empty, f"--workdir {empty} has no config.json"),
        ([picture], untrained, f"--workdir {untrained} has no checkpoint yet"),
        ([picture, "--export", str(tmp_path / "missing" / "model.jax")], workdir, "--export"),
        ([picture, "--step", "7"], workdir, "--step 7: no such checkpoint"),
    ]
    for args, folder, message in cases:
        result = _run(["-m", "train.predict", "--workdir", str(folder), *args], timeout=60)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr
        assert result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["broken.png", "empty", "untrained"]
    assert sorted(os.listdir(empty)) == [] and sorted(os.listdir(untrained)) == sorted(run_record_files())


def run_record_files():
    return [run_record.CONFIG_FILE, run_record.DATASET_FILE]


def test_run_record_is_written_once_and_guards_the_workdir(tmp_path):
    config = default.get_config()
    facts = {"dataset": "digits", "num_classes": 10, "image_shape": [8, 8, 1], "class_names": []}
    run_record.write_or_check(str(tmp_path), config, facts, write=False)
    assert os.listdir(tmp_path) == []
    run_record.write_or_check(str(tmp_path), config, facts)
    assert sorted(os.listdir(tmp_path)) == sorted(run_record_files())
    assert json.loads((tmp_path / "config.json").read_text())["model"] == config.model
    assert run_record.read_config(str(tmp_path)).model_overrides.to_dict() == config.model_overrides.to_dict()
    same = default.get_config()
    same.num_train_steps = 5  # training length, schedule, ... may change between starts
    same.model_overrides.attention_implementation = "fused"  # the same function on another platform
    run_record.write_or_check(str(tmp_path), same, facts)
    for key, value in (("model", "resnet_cifar"), ("dataset", "cifar10"), ("model_overrides.width", 48)):
        other = default.get_config()
        other.update_from_flattened_dict({key: value})
        top = key.split(".")[0]
        with pytest.raises(ValueError, match=rf"workdir {tmp_path} holds another run \({top}: "):
            run_record.write_or_check(str(tmp_path), other, facts)
