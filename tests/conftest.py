"""Test session setup, before JAX starts: 4 simulated CPU devices, XLA's CPU backend unoptimised
(``tests.train_helpers.XLA_TEST_FLAGS``) and a persistent compilation cache."""

import os
import pathlib
import subprocess
import sys

from tests.train_helpers import COMPILE_CACHE_ENV, REPO, XLA_TEST_FLAGS, made_once, subprocess_env

os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS} --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # libtpu (tests/test_tpu_compile.py) locks a file per process
os.environ.update(COMPILE_CACHE_ENV)

import pytest


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """The default digits run, shortened to 100 steps and narrowed to 24 channels: a model the
    default config does not build, so whatever uses this workdir must read its recorded config.
    Trained once per test session (:func:`made_once`)."""
    return made_once(tmp_path_factory, "trained_digits", _train_digits)


def _train_digits(path: pathlib.Path) -> None:
    flags = [
        "--config.num_train_steps=100",
        "--config.eval_every_steps=1000",
        "--config.checkpoint_every_steps=50",
        "--config.model_overrides.width=24",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "train", "--workdir", str(path), *flags],
        capture_output=True,
        text=True,
        env=subprocess_env(1, optimised=True),  # 100 steps: running costs more than compiling
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training (100 steps) aa_resnet_cifar on digits" in result.stdout and str(path) in result.stdout
    print(result.stdout.splitlines()[-1])  # the run's own test accuracy, shown with pytest -s
