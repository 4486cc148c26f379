"""Fault injection: ``python -m train`` in a subprocess, killed (SIGKILL) during steps, during
asynchronous checkpoint writes and at random moments, several times in a row, or stopped by
SIGTERM / SIGINT; the same command restarted each time. The run must end with exactly the state of
an uninterrupted run, always resume from the latest complete checkpoint (never a half-written
one) and keep one metrics record per step."""

from __future__ import annotations

import functools
import json
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import train_helpers as helpers
from train import checkpoint

# 24 steps of the tiny model, a checkpoint every 4 steps (written in ~0.2 s, steps take ~20 ms).
FLAGS = helpers.cli_flags({"num_train_steps": 24, "checkpoint_every_steps": 4, "max_checkpoints_to_keep": 2})
NUM_STEPS, EVERY = 24, 4
DEVICES = 2
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class Run:
    """One ``python -m train`` process on ``workdir``, its output in files (no pipe can fill up)."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.log = open(workdir.parent / f"{workdir.name}-{time.monotonic_ns()}.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "train", f"--workdir={workdir}", *FLAGS],
            cwd=helpers.REPO,
            env=helpers.subprocess_env(DEVICES),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.resumed_from = max(complete_steps(workdir), default=0)
        self.old_writes = writes(workdir)  # left by earlier kills, deleted when this run starts

    def new_write(self, step: int) -> bool:
        """Whether this run is writing the checkpoint of ``step`` (a temporary directory it created)."""
        new = writes(self.workdir).items() - self.old_writes.items()
        return any(name.startswith(f"{step}.") for name, _ in new)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_for(self, condition, timeout: float = 120) -> None:
        """Poll ``condition()`` every millisecond until it holds; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"exited {self.process.returncode}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out:\n{self.output()[-3000:]}"
            time.sleep(0.001)

    def kill(self, signum=signal.SIGKILL) -> None:
        self.process.send_signal(signum)
        self.process.wait(timeout=120)

    def finish(self) -> str:
        """Wait for a normal exit; its output."""
        assert self.process.wait(timeout=300) == 0, self.output()[-3000:]
        return self.output()


def checkpoint_dir(workdir):
    return workdir / "checkpoints"


def complete_steps(workdir) -> list[int]:
    return checkpoint.saved_steps(str(workdir))


def writes(workdir) -> dict[str, int]:
    """Checkpoints being written: ``{name: creation time}`` of Orbax's temporary directories."""
    found = {}
    for path in checkpoint_dir(workdir).glob(f"*{TMP_SUFFIX}*"):
        try:
            found[path.name] = path.stat().st_ctime_ns
        except FileNotFoundError:  # renamed (complete) or deleted since the listing
            pass
    return found


def logged_steps(workdir) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
    return [record["step"] for record in map(json.loads, lines) if record["split"] == "train"]


def final_state(workdir) -> dict[str, np.ndarray]:
    """Every array of the latest checkpoint, read onto this process's first device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.CheckpointManager(
        checkpoint_dir(workdir), item_handlers={"state": ocp.StandardCheckpointHandler()}
    ) as manager:
        step = manager.latest_step()
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            manager.item_metadata(step)["state"],
        )
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    Run(workdir).finish()
    assert complete_steps(workdir)[-1] == NUM_STEPS
    return final_state(workdir)


def check_restart_and_finish(workdir, uninterrupted, kills: list[str]) -> None:
    """Run to the end; every restart resumed from the latest complete checkpoint; the end state
    equals the uninterrupted run's; one metrics record per step."""
    run = Run(workdir)
    output = run.finish()
    assert f"Resuming from the checkpoint of step {run.resumed_from}" in output or run.resumed_from == 0
    assert writes(workdir) == {}  # temporary directories of killed saves are cleaned up
    assert logged_steps(workdir) == list(range(1, NUM_STEPS + 1)), kills
    state = final_state(workdir)
    assert state.keys() == uninterrupted.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(value, uninterrupted[name], err_msg=f"{name} after kills {kills}")


def test_sigkill_during_checkpoint_writes(tmp_path, uninterrupted):
    """Five SIGKILLs, each while the first or second checkpoint of a run is being written."""
    workdir = tmp_path / "run"
    kills, half_written = [], 0
    for nth_save in (1, 2, 1, 2, 2):
        run = Run(workdir)
        target = run.resumed_from + nth_save * EVERY
        run.wait_for(functools.partial(run.new_write, target))
        run.kill()
        incomplete = run.new_write(target)  # still a temporary directory: killed before it was complete
        half_written += incomplete
        kills.append(
            f"writing step {target} (resumed from {run.resumed_from}, left incomplete: {incomplete})"
        )
        if run.resumed_from:
            assert f"Resuming from the checkpoint of step {run.resumed_from}" in run.output(), kills
    assert half_written >= 2, kills  # kills did land while the checkpoint was incomplete
    check_restart_and_finish(workdir, uninterrupted, kills)


def test_sigkill_during_steps_and_at_random_moments(tmp_path, uninterrupted):
    """Six SIGKILLs: right after a random step's metrics were written, or after a random delay from
    the start (in start-up, compilation, restoring, a step or a save)."""
    workdir, rng, kills = tmp_path / "run", random.Random(0), []
    for kind in ("step", "delay", "step", "delay", "step", "step"):
        run = Run(workdir)
        if kind == "step":  # a step no earlier run logged, so only this run can log it
            step = min(max([run.resumed_from, *logged_steps(workdir)]) + rng.randint(1, 4), NUM_STEPS - 1)
            run.wait_for(lambda step=step: step in logged_steps(workdir))
            kills.append(f"after step {step} (resumed from {run.resumed_from})")
        else:
            delay = rng.uniform(1.0, 7.0)
            time.sleep(delay)
            kills.append(f"{delay:.1f} s after the start (resumed from {run.resumed_from})")
        run.kill()
    check_restart_and_finish(workdir, uninterrupted, kills)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_and_exit_0(tmp_path, uninterrupted, signum):
    workdir = tmp_path / "run"
    run = Run(workdir)
    run.wait_for(lambda: 6 in logged_steps(workdir))
    run.process.send_signal(signum)
    assert run.process.wait(timeout=120) == 0, run.output()[-3000:]
    output = run.output()
    stopped_at = max(logged_steps(workdir))
    assert f"Stopped by {signal.Signals(signum).name} after step {stopped_at}" in output
    assert "Final test" not in output
    assert complete_steps(workdir)[-1] == stopped_at and writes(workdir) == {}  # saved synchronously
    check_restart_and_finish(workdir, uninterrupted, [f"{signal.Signals(signum).name} at step {stopped_at}"])
