"""Two processes on localhost (jax.distributed with a local coordinator, gloo CPU collectives), two
CPU devices each, train one model on the 4-device global mesh and end with identical parameters;
a SIGTERM to one of them stops both at the same step, with a checkpoint."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests import train_helpers as helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_workers(tmp_path, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, "tests/train_helpers.py", str(port), str(process_id), str(tmp_path), *extra],
            cwd=helpers.REPO,
            env=helpers.subprocess_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process_id in range(2)
    ]


def outputs_of(workers: list[subprocess.Popen]) -> list[str]:
    try:
        return [worker.communicate(timeout=400)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()


def train_steps(workdir) -> list[int]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["split"] == "train"]


def test_two_processes_end_with_identical_parameters(tmp_path):
    workers = start_workers(tmp_path)
    outputs = outputs_of(workers)
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    first, second = (np.load(tmp_path / f"params_{i}.npz") for i in range(2))
    assert first.files == second.files and first.files
    for name in first.files:
        assert np.isfinite(first[name]).all()
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # Only process 0 wrote metrics: each step once; both processes wrote the checkpoints.
    assert train_steps(tmp_path) == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
    assert "Final test top-1" in outputs[0] and "Final test top-1" not in outputs[1]


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    """JAX's preemption service relays the notice: both processes save the same step and exit 0."""
    workers = start_workers(tmp_path, "1000")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(train_steps(tmp_path)) >= 3):
        assert all(worker.poll() is None for worker in workers) and time.monotonic() < deadline
        time.sleep(0.01)
    workers[1].send_signal(signal.SIGTERM)
    outputs = outputs_of(workers)
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    stopped_at = train_steps(tmp_path)[-1]
    assert 3 <= stopped_at < 1000
    assert f"Stopped by preemption notice after step {stopped_at}" in outputs[0]
    assert str(stopped_at) in [p.name for p in (tmp_path / "checkpoints").iterdir()]
    first, second = (np.load(tmp_path / f"params_{i}.npz") for i in range(2))
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
