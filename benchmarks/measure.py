"""Timing, memory and machine facts shared by the benchmarks.

Times are medians of repeated calls after compilation (``block_until_ready`` on every call);
calls compared with each other are timed in interleaved rounds.
Memory is XLA's compiled memory analysis (temporaries the program needs besides its arguments
and outputs) and, where asked, the peak resident set size of a fresh process.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def median_seconds(fn: Callable, *args, repeats: int = 5, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` calls after one warm-up (compile) call."""
    call = functools.partial(fn, *args)
    return interleaved_median_seconds({"": call}, repeats=repeats, min_seconds=min_seconds)[""]


def interleaved_median_seconds(
    calls: dict[str, Callable[[], Any]], repeats: int = 5, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median wall time of each call, after one warm-up (compile) call each.

    The calls are timed in rounds, each round calling every one once, in an order shuffled anew
    (seeded), until there are ``repeats`` rounds and each call has run ``min_seconds`` in all; so a
    change in the machine's load during the run shifts every call alike, and no call always runs
    right after the same neighbour (a call that frees much memory slows the next one).
    """
    for call in calls.values():
        jax.block_until_ready(call())
    times = {name: [] for name in calls}
    order = random.Random(0)
    while min(len(t) for t in times.values()) < repeats or min(sum(t) for t in times.values()) < min_seconds:
        for name in order.sample(list(calls), len(calls)):
            call = calls[name]
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def compiled_temp_bytes(jitted: Callable, *args) -> int:
    """Bytes of temporaries XLA allocates for one call of ``jitted(*args)``."""
    return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def matmul_flops_per_second(size: int = 1024, dtype=jnp.float32) -> float:
    """This machine's measured matmul FLOP/s (2 * n^3 per product of two n x n matrices)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)  # not constants: zeros run faster
    seconds = median_seconds(jax.jit(jnp.matmul), a, a, repeats=10, min_seconds=1.0)
    return 2 * size**3 / seconds


def machine_info() -> dict:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def peak_rss_bytes_in_subprocess(module: str, *args: str) -> int:
    """Run ``python -m module args`` in a fresh process; return its peak RSS (Linux ``VmHWM``).

    ``VmHWM`` starts afresh at exec, unlike ``ru_maxrss``, which keeps the parent's high-water mark.
    """
    code = (
        f"import runpy, sys; sys.argv = {[module, *args]!r}; "
        f"runpy.run_module({module!r}, run_name='__main__'); "
        "print('RSS', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return 1024 * int(out.rsplit("RSS", 1)[1])


def write_results(name: str, payload: dict) -> pathlib.Path:
    """Write ``payload`` plus machine info to ``benchmarks/results/<name>-<platform>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    path = RESULTS / f"{name}-{info['platform']}.json"
    path.write_text(json.dumps({"machine": info, **payload}, indent=1) + "\n")
    return path
