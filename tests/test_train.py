"""The training loop on 4 simulated CPU devices: the sharded step, exact resumption, restoring on
another device count, and bad input (clear message, nothing lost)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from tests import train_helpers as helpers
from train import checkpoint, loop, program, sharding
from train import state as train_state
from train.data import digits, pipeline
from train.tasks import classification

SMOOTHED_LOSS = functools.partial(classification.classification_loss, label_smoothing=0.1)


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of the tiny AA model on all 4 devices, checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained")
    state = loop.train_and_evaluate(helpers.tiny_config(), str(workdir))
    return workdir, helpers.flat_params(state.params)


def test_sharded_step_equals_single_device_step():
    config = helpers.tiny_config()
    lr_fn = optax.constant_schedule(0.1)
    init = functools.partial(
        train_state.create_state,
        model=train_state.create_model(config, 10),
        tx=train_state.create_optimizer(config, lr_fn),
        image_shape=(8, 8, 1),
    )
    state0 = jax.jit(init)(jax.random.key(0))
    batch = next(pipeline.train_iterator(digits.digits(), batch_size=8, seed=0))
    step = jax.jit(
        functools.partial(program.train_step, rng=jax.random.key(1), lr_fn=lr_fn, loss_fn=SMOOTHED_LOSS)
    )
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        mesh = sharding.make_mesh(devices)
        state = jax.device_put(state0, sharding.replicated(mesh))
        global_batch = sharding.global_batch(batch, mesh)
        assert global_batch["image"].sharding.num_devices == len(devices)
        assert len(global_batch["image"].addressable_shards[0].data) == 8 // len(devices)
        for _ in range(2):
            state, metrics = step(state, global_batch)
        assert state.params["head"]["fc"]["kernel"].sharding.num_devices == len(devices)
        results.append(jax.device_get((state.params, state.batch_stats, metrics)))
    assert jax.device_count() == 4
    sharded, single = results
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), sharded, single)
    # The step did change the parameters and the BatchNorm statistics.
    assert not np.allclose(
        sharded[0]["head"]["fc"]["kernel"], jax.device_get(state0.params["head"]["fc"]["kernel"])
    )


def test_resumed_run_ends_with_the_parameters_of_an_uninterrupted_run(trained, tmp_path):
    workdir, final_params = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")  # as if preempted after the checkpoint of step 2
    (resumed / "metrics.jsonl").unlink()
    state = loop.train_and_evaluate(helpers.tiny_config(), str(resumed))
    assert [r["step"] for r in read_metrics(resumed) if r["split"] == "train"] == [
        3,
        4,
    ]  # resumed, not restarted
    params = helpers.flat_params(state.params)
    assert params.keys() == final_params.keys()
    for name, value in params.items():
        np.testing.assert_array_equal(value, final_params[name], err_msg=name)


def test_checkpoint_saved_on_4_devices_evaluates_on_1(trained, tmp_path):
    workdir, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    on_4_devices = [r for r in read_metrics(copy) if r["split"] == "eval"][-1]
    command = [sys.executable, "-m", "train", "--eval_only", f"--workdir={copy}", *helpers.cli_flags()]
    run = subprocess.run(
        command, cwd=helpers.REPO, env=helpers.subprocess_env(1), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Final test top-1" in run.stdout
    on_1_device = read_metrics(copy)[-1]
    assert on_1_device["split"] == "eval" and on_1_device["step"] == on_4_devices["step"] == 4
    for name in ("loss", "top1", "top5"):
        assert on_1_device[name] == pytest.approx(on_4_devices[name], rel=1e-5), name


def test_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    workdir, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    config = helpers.tiny_config({"learning_rate": 1e30, "num_train_steps": 8})
    with pytest.raises(FloatingPointError, match=r"diverged at step 5 .*last good checkpoint is step 4"):
        loop.train_and_evaluate(config, str(copy))
    with checkpoint.create_manager(str(copy), max_to_keep=10) as manager:
        assert manager.all_steps() == [2, 4]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            {"model": "aa_resnet_cifarr"},
            ValueError,
            r"unknown model name='aa_resnet_cifarr'.*aa_resnet_cifar",
        ),
        ({"model_overrides.widht": 8}, ValueError, r"unknown override\(s\) \['widht'\]"),
        ({"batch_size": 6}, ValueError, r"batch_size=6 must be divisible by the number of devices, 4"),
        (
            {"dataset": "cifar10", "download": False},
            FileNotFoundError,
            r"cifar-10-python.tar.gz not found; download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        ),
    ],
)
def test_bad_config_fails_before_touching_the_workdir(tmp_path, overrides, error, message):
    config = helpers.tiny_config({"data_dir": str(tmp_path / "data"), **overrides})
    with pytest.raises(error, match=message):
        loop.train_and_evaluate(config, str(tmp_path / "workdir"))
    assert not (tmp_path / "workdir").exists()


def test_bad_command_lines_are_one_error_line_and_exit_2(tmp_path):
    """Every kind of bad input to ``python -m train``: one ``error:`` line naming it on stderr, exit
    code 2, no traceback, nothing trained (the processes run side by side)."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    other_run = tmp_path / "other_run"
    other_run.mkdir()
    recorded = json.loads(helpers.tiny_config({"model": "resnet_cifar"}).to_json_best_effort())
    (other_run / "config.json").write_text(json.dumps(recorded))
    cases = {
        "unknown key": (
            ["--config.batch_sise=8"],
            r"unknown config key 'batch_sise'.*Did you mean \"batch_size\"",
        ),
        "unknown key, --config given": (
            ["--config", "train/configs/default.py", "--config.batch_sise=8"],
            r"unknown config key 'batch_sise'",
        ),
        "wrong type": (["--config.batch_size=eight"], r"flag --config.batch_size=eight: .*'eight'"),
        "unknown model": (["--config.model=aa_resnet_cifarr"], r"unknown model name='aa_resnet_cifarr'"),
        "unknown data set": (["--config.dataset=mnist"], r"dataset='mnist' must be one of \('digits'"),
        "no config file": (
            ["--config=train/configs/nothing.py"],
            r"--config train/configs/nothing.py does not load",
        ),
        "unwritable workdir": (
            [f"--workdir={not_a_folder}/run"],
            rf"the workdir {not_a_folder}/run is not writable",
        ),
        "another run's workdir": (
            [f"--workdir={other_run}", *helpers.cli_flags()],
            rf"workdir {other_run} holds another run \(model: 'resnet_cifar' -> 'aa_resnet_cifar'",
        ),
        "eval_only without a run": (
            ["--eval_only", f"--workdir={tmp_path / 'nothing'}"],
            r"--eval_only: no config.json in",
        ),
        "stray argument": (["cifar10"], r"unexpected arguments \['cifar10'\]"),
    }
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "train", f"--workdir={tmp_path / 'unused'}", *flags],
            cwd=helpers.REPO,
            env=helpers.subprocess_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (flags, _) in cases.items()
    }
    for name, run in runs.items():
        _, stderr = run.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
            name,
            stderr[-2000:],
        )
        assert re.search(cases[name][1], lines[0]), (name, lines[0])
    assert not (tmp_path / "unused").exists() and not (other_run / "checkpoints").exists()
