"""Metric records: ``WORKDIR/metrics.jsonl`` (one JSON object per line) and TensorBoard event files.

Only process 0 writes; on other processes :class:`MetricWriter` does nothing.
"""

from __future__ import annotations

import json
import os

import jax
import tensorboardX


class MetricWriter:
    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            self._path = os.path.join(workdir, "metrics.jsonl")
            self._jsonl = open(self._path, "a")
            self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (a run resumed from ``step`` writes them again),
        and a last line cut short by a killed process. The file is replaced atomically."""
        if not self.active:
            return
        self._jsonl.close()
        with open(self._path) as f:
            lines = f.read().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            with open(f"{self._path}.tmp", "w") as f:
                f.writelines(kept)
            os.replace(f"{self._path}.tmp", self._path)
        self._jsonl = open(self._path, "a")

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        """Append ``{'step', 'split', **scalars}``; TensorBoard tags are ``<split>/<name>``."""
        if not self.active:
            return
        scalars = {name: float(value) for name, value in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        self._tensorboard.flush()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.active:
            self._jsonl.close()
            self._tensorboard.close()
