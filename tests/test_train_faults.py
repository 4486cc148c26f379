"""Fault injection. ``python -m train`` in a subprocess, killed (SIGKILL) while an asynchronous
checkpoint write is half done, right after a step and during start-up, and stopped by SIGTERM, the
same command restarted each time; in-process runs for what can be planted or raised: a half-written
checkpoint on disk, an old checkpoint half deleted, a save that fails, SIGINT inside a step, an
error in a grain worker. A run must end with exactly the state of an uninterrupted run, always
resume from the latest complete checkpoint (never a half-written one) and keep one metrics record
per step."""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import train_helpers as helpers
from train import checkpoint, loop, sharding
from train.data import digits

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


def kill_while_writing(run: Run, nth_save: int) -> str:
    """SIGKILL ``run`` while its ``nth_save``-th checkpoint write is incomplete. The process is frozen
    (SIGSTOP) as soon as the write's temporary directory appears and killed only if the write is still
    incomplete then; otherwise it goes on (SIGCONT) to the next save. Deterministic: no timing window."""
    target = run.resumed_from + nth_save * EVERY
    while True:
        run.wait_for(functools.partial(run.new_write, target))
        run.process.send_signal(signal.SIGSTOP)
        if run.new_write(target):  # frozen with the checkpoint half written
            run.kill()
            return f"writing step {target} (resumed from {run.resumed_from})"
        run.process.send_signal(signal.SIGCONT)
        target += EVERY


def test_sigkill_and_sigterm_at_every_kind_of_moment(tmp_path, uninterrupted):
    """One real signal per kind of moment, the same workdir restarted after each: SIGKILL with a
    checkpoint half written, right after a step's metrics were written, during start-up (compiling or
    restoring), and SIGTERM (saves the current step and exits 0)."""
    workdir, kills = tmp_path / "run", []
    run = Run(workdir)
    kills.append(kill_while_writing(run, 2))
    assert complete_steps(workdir) == [EVERY]  # the half-written second checkpoint does not count

    run = Run(workdir)
    step = run.resumed_from + EVERY + 1  # a step no earlier run logged: only this run can log it
    run.wait_for(lambda: step in logged_steps(workdir))
    run.kill()
    kills.append(f"after step {step} (resumed from {run.resumed_from})")
    assert f"Resuming from the checkpoint of step {run.resumed_from}" in run.output()

    run = Run(workdir)
    step = max(logged_steps(workdir)) + 2
    run.wait_for(lambda: step in logged_steps(workdir))
    run.kill(signal.SIGTERM)
    stopped_at = max(logged_steps(workdir))
    assert run.process.returncode == 0, run.output()[-3000:]
    assert f"Stopped by SIGTERM after step {stopped_at}" in run.output() and "Final test" not in run.output()
    assert complete_steps(workdir)[-1] == stopped_at and writes(workdir) == {}  # saved synchronously
    kills.append(f"SIGTERM at step {stopped_at}")

    run = Run(workdir)
    run.wait_for(lambda: "Resuming from" in run.output())
    run.kill()  # restored, compiling the step: before any new step
    kills.append(f"during start-up (resumed from {run.resumed_from})")
    check_restart_and_finish(workdir, uninterrupted, kills)


# In-process runs: 12 steps of the tiny model on the 4 simulated devices of the test process.
IN_PROCESS = {"num_train_steps": 12, "checkpoint_every_steps": 4, "max_checkpoints_to_keep": 2}


def run_in_process(workdir, **overrides):
    return loop.train_and_evaluate(helpers.tiny_config({**IN_PROCESS, **overrides}), str(workdir))


@pytest.fixture(scope="module")
def uninterrupted_in_process(tmp_path_factory):
    return flat(run_in_process(tmp_path_factory.mktemp("in_process") / "run"))


def flat(state) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def assert_same_state(state, expected: dict[str, np.ndarray]) -> None:
    actual = flat(state)
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_half_written_and_half_deleted_checkpoints_on_disk(tmp_path, uninterrupted_in_process, capsys):
    """What a kill leaves behind, planted: the newest checkpoint still a temporary directory (killed
    while writing) and the oldest with files missing (killed while Orbax deleted it). The restart
    resumes from the newest complete checkpoint, removes both, and ends as if never interrupted."""
    workdir = tmp_path / "run"
    run_in_process(workdir, max_checkpoints_to_keep=3)
    folder = checkpoint_dir(workdir)
    (folder / "12").rename(folder / f"12{TMP_SUFFIX}-1700000000")  # as if killed while saving step 12
    half_deleted = folder / "4"
    for path in sorted(half_deleted.rglob("*"), reverse=True)[: len(list(half_deleted.rglob("*"))) // 2]:
        path.unlink() if path.is_file() else shutil.rmtree(path)
    capsys.readouterr()
    state = run_in_process(workdir)  # keeps 2: saving step 12 deletes step 4
    assert "Resuming from the checkpoint of step 8" in capsys.readouterr().out
    assert_same_state(state, uninterrupted_in_process)
    assert writes(workdir) == {} and complete_steps(workdir) == [8, 12]


def test_a_save_that_fails_stops_the_run_and_the_restart_resumes(
    tmp_path, uninterrupted_in_process, monkeypatch
):
    workdir = tmp_path / "run"
    save = checkpoint.save

    def failing_save(manager, step, *args, **kwargs):
        if step == 8:
            raise OSError(28, "No space left on device")
        save(manager, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        run_in_process(workdir)
    assert complete_steps(workdir) == [4]
    monkeypatch.setattr(checkpoint, "save", save)
    assert_same_state(run_in_process(workdir), uninterrupted_in_process)


def test_sigint_inside_a_step_saves_that_step_and_the_restart_resumes(
    tmp_path, uninterrupted_in_process, capsys, monkeypatch
):
    """SIGINT raised while step 6 runs (as Ctrl-C would): the run saves step 6 synchronously, says so,
    skips the final evaluation, returns; run again, it ends as if never stopped."""
    workdir, calls = tmp_path / "run", []
    global_batch = sharding.global_batch

    def batch_then_interrupt(batch, mesh):
        calls.append(1)
        if len(calls) == 6:
            signal.raise_signal(signal.SIGINT)
        return global_batch(batch, mesh)

    monkeypatch.setattr(sharding, "global_batch", batch_then_interrupt)
    state = run_in_process(workdir)
    output = capsys.readouterr().out
    assert int(state.step) == 6 and "Stopped by SIGINT after step 6" in output and "Final test" not in output
    assert complete_steps(workdir)[-1] == 6 and writes(workdir) == {}
    monkeypatch.setattr(sharding, "global_batch", global_batch)
    assert_same_state(run_in_process(workdir), uninterrupted_in_process)


def test_an_error_in_a_grain_worker_stops_the_run_with_that_error(tmp_path):
    """A transform that raises inside a grain worker process: the run stops with the worker's error
    (not a hang), before any checkpoint."""
    data = digits.digits()
    broken = dataclasses.replace(
        data, train_transform=functools.partial(raise_in_worker, transform=data.train_transform)
    )
    config = helpers.tiny_config({**IN_PROCESS, "data_workers": 1})
    with pytest.raises(Exception, match="record 5 cannot be read"):
        loop.train_and_evaluate(config, str(tmp_path / "run"), data=broken)
    assert complete_steps(tmp_path / "run") == []


def raise_in_worker(record, rng, *, transform):
    """``transform``, except for the record with label 5 read by a worker process (not the check of
    the first record, which runs in the training process)."""
    if multiprocessing.parent_process() is not None and int(record["label"]) == 5:
        raise ValueError("record 5 cannot be read")
    return transform(record, rng)
