"""Two processes on localhost (jax.distributed with a local coordinator, gloo CPU collectives), two
CPU devices each, train one model on the 4-device global mesh and end with identical parameters."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np

from tests import train_helpers as helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_end_with_identical_parameters(tmp_path):
    port = free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, "tests/train_helpers.py", str(port), str(process_id), str(tmp_path)],
            cwd=helpers.REPO,
            env=helpers.subprocess_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process_id in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=400)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    first, second = (np.load(tmp_path / f"params_{i}.npz") for i in range(2))
    assert first.files == second.files and first.files
    for name in first.files:
        assert np.isfinite(first[name]).all()
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # Only process 0 wrote metrics: each step once; both processes wrote the checkpoints.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
    assert "Final test top-1" in outputs[0] and "Final test top-1" not in outputs[1]
