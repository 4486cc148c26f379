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
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

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

    def __exit__(self, *exc_info) -> None:
        if self.active:
            self._jsonl.close()
            self._tensorboard.close()
