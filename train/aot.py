"""A run checked ahead of time for a TPU topology, on any machine with libtpu (``jax[tpu]``).

libtpu's compile-only devices (``jax.experimental.topologies``) stand for the chips: the train and
evaluation steps of ``python -m train`` (:mod:`train.program`) are compiled for them by the real TPU
compiler, Pallas kernels included, and ``memory_analysis()`` says what each device holds. Nothing runs
and no data is read (the data set's :class:`~train.data.dataset.Layout` gives the batch's shapes).
A program that does not fit fails to compile (``RESOURCE_EXHAUSTED``); the usable HBM per device is
the compiler's own figure, read from the refusal of a program far too big for any chip.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from train import data as train_data
from train import program as run_program
from train import sharding
from train.errors import InputError

GiB = 2**30
_UNITS = {"K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}
_AVAILABLE = re.compile(r"available HBM \(([\d.]+)([KMGT])\)")


class DoesNotFit(InputError):
    """The program needs more memory per device than the compiler lets it have."""


def topology_devices(topology: str) -> list[jax.Device]:
    """The compile-only devices of a TPU topology named as libtpu names them (``v5e:2x2``,
    ``v4:2x2x1``, ...; docs/training.md lists what Colab, Kaggle and Cloud give)."""
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise InputError("compiling for a TPU needs libtpu: pip install 'jax[tpu]' (any machine will do)")
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", topology):
        raise InputError(
            f"--topology {topology!r}: TPU topologies are named like v5e:1x1, v5e:2x4 or v4:2x2x1"
        )
    describe = functools.partial(topologies.get_topology_desc, topology_name=topology, platform="tpu")
    try:
        try:
            return list(describe().devices)
        except Exception as error:
            if "chips_per_host_bounds" not in str(error):
                raise
            # Older libtpu (JAX 0.10) does not infer the hosts of a topology that its default host of
            # 2x2x1 chips does not divide: then one host holds every chip.
            bounds = [int(n) for n in topology.split(":")[1].split("x")]
            return list(describe(chips_per_host_bounds=(*bounds, 1, 1)[:3]).devices)
    except Exception as error:  # libtpu's INVALID_ARGUMENT, e.g. an unknown TPU kind
        raise InputError(f"--topology {topology}: {str(error).splitlines()[0]}") from error


def usable_hbm(device: jax.Device) -> int:
    """Bytes of HBM the TPU compiler lets one program use on ``device``'s kind."""
    mesh = jax.sharding.Mesh(np.array([device]), ("data",))
    huge = jax.ShapeDtypeStruct((2**20,), jnp.float32, sharding=sharding.replicated(mesh))
    try:
        jax.jit(lambda x: jnp.outer(x, x)).lower(huge).compile()  # 4 TiB
    except Exception as error:
        found = _AVAILABLE.search(str(error))
        if found:
            return round(float(found.group(1)) * _UNITS[found.group(2)])
        raise
    raise AssertionError(f"a 4 TiB program compiled for {device.device_kind}")


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Per-device bytes of a compiled step (``memory_analysis()``) and XLA's cost estimate of one step
    on one device (``cost_analysis()``: Pallas kernels declare only their forward cost)."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    flops: float
    bytes_accessed: float

    @property
    def total(self) -> int:
        """What the step holds at its peak: arguments, outputs not donated into arguments, temporaries
        and the program."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled: Any) -> Footprint:
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list on older JAX
        return cls(
            arguments=memory.argument_size_in_bytes,
            outputs=memory.output_size_in_bytes,
            aliased=memory.alias_size_in_bytes,
            temporaries=memory.temp_size_in_bytes,
            code=memory.generated_code_size_in_bytes,
            flops=float(cost.get("flops", 0.0)),
            bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        )


@dataclasses.dataclass(frozen=True)
class Check:
    """What :func:`check` found: the steps' footprints (``eval`` None when not compiled) on
    ``devices`` devices of ``device_kind`` with ``hbm`` usable bytes each, at global ``batch_size``."""

    topology: str
    device_kind: str
    devices: int
    hbm: int
    batch_size: int
    train: Footprint
    eval: Footprint | None

    def lines(self) -> list[str]:
        """The report of ``python -m train.compile``."""
        header = (
            f"{self.topology}: {self.devices} x {self.device_kind}, {self.hbm / GiB:.2f} GiB usable HBM "
            f"each; global batch {self.batch_size} ({self.batch_size // self.devices} per device)"
        )
        steps = [("train step", self.train)] + ([("eval step", self.eval)] if self.eval else [])
        return [header] + [
            f"  {name}: {step.total / GiB:.2f} GiB per device ({step.total / self.hbm:.0%}): arguments "
            f"{step.arguments / GiB:.2f}, temporaries {step.temporaries / GiB:.2f}, other outputs "
            f"{(step.outputs - step.aliased) / GiB:.2f}, code {step.code / GiB:.2f} GiB; "
            f"{step.flops / 1e12:.3g} TFLOP, {step.bytes_accessed / 1e9:.3g} GB accessed "
            "(XLA's estimate: Pallas kernels count their forward only, loops their body once)"
            for name, step in steps
        ]


class Compiler:
    """The programs of a run of ``config`` built once for ``topology``, compiled at any global batch."""

    def __init__(self, config: ml_collections.ConfigDict, topology: str):
        self.topology = topology
        self.devices = topology_devices(topology)
        self.mesh = sharding.make_mesh(self.devices)
        self.layout = train_data.layout(config)
        # steps_per_epoch=1: the schedule's step counts are constants of the program; they change
        # neither its memory nor its cost.
        self.program = run_program.build(config, self.layout, self.mesh, steps_per_epoch=1)
        self.hbm = usable_hbm(self.devices[0])

    def compile(self, step: str, batch_size: int) -> Footprint:
        """``step`` (``"train"`` or ``"eval"``) compiled at global ``batch_size``; :class:`DoesNotFit`
        when the compiler refuses it for memory."""
        if batch_size <= 0 or batch_size % len(self.devices):
            raise InputError(
                f"batch_size={batch_size} must be a positive multiple of the {len(self.devices)} devices of "
                f"{self.topology}"
            )
        jitted = self.program.train_step if step == "train" else self.program.eval_step
        batch = run_program.batch_shapes(self.layout, batch_size, self.mesh, test=step == "eval")
        try:
            with jax.set_mesh(self.mesh):  # the Pallas kernels' shard_map over the batch
                compiled = jitted.lower(self.program.abstract_state, batch).compile()
        except Exception as error:
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            reason = str(error).split("RESOURCE_EXHAUSTED: ", 1)[-1].splitlines()[0]
            raise DoesNotFit(self._too_big(step, batch_size, reason)) from error
        footprint = Footprint.of(compiled)
        if footprint.total > self.hbm:
            raise DoesNotFit(
                self._too_big(
                    step,
                    batch_size,
                    f"it needs {footprint.total / GiB:.2f}G per device (temporaries "
                    f"{footprint.temporaries / GiB:.2f}G), the compiler allows {self.hbm / GiB:.2f}G",
                )
            )
        return footprint

    def _too_big(self, step: str, batch_size: int, reason: str) -> str:
        return (
            f"the {step} step at global batch {batch_size} does not fit a {self.devices[0].device_kind} of "
            f"{self.topology}: {reason.rstrip('.')}: lower --config.batch_size (--largest_batch finds the "
            "largest that fits)"
        )

    def check(self, batch_size: int, *, eval_step: bool = True) -> Check:
        """The train step (and the evaluation step) compiled at global ``batch_size``;
        :class:`DoesNotFit` when one needs more than a device has."""
        return Check(
            topology=self.topology,
            device_kind=self.devices[0].device_kind,
            devices=len(self.devices),
            hbm=self.hbm,
            batch_size=batch_size,
            train=self.compile("train", batch_size),
            eval=self.compile("eval", batch_size) if eval_step else None,
        )

    def largest_batch(self, start: int, step: str = "train", limit: int = 2**16) -> int:
        """The largest global batch (a multiple of the device count, at most ``limit``) at which
        ``step`` compiles.

        A step's memory is close to a line in the batch: compiles at ``start`` and half of it give the
        line, the batch where it meets the HBM is the guess, and :func:`largest_fitting` confirms it
        (two more compiles when the guess is right) or searches from it.
        """
        unit = len(self.devices)
        totals: dict[int, int] = {}  # bytes per device of the batches that fit
        refused: set[int] = set()

        def fits(batch_size: int) -> bool:
            if batch_size not in totals and batch_size not in refused:
                try:
                    totals[batch_size] = self.compile(step, batch_size).total
                except DoesNotFit:
                    refused.add(batch_size)
            return batch_size in totals

        start = max(unit, start // unit * unit)
        half, guess = max(unit, start // 2 // unit * unit), float(start)
        if fits(start) and half < start and fits(half):
            per_image = (totals[start] - totals[half]) / (start - half)
            guess = start + (self.hbm - totals[start]) / per_image if per_image > 0 else limit
        return largest_fitting(fits, guess=guess, unit=unit, limit=limit)


def largest_fitting(fits: Callable[[int], bool], *, guess: float, unit: int, limit: int) -> int:
    """The largest multiple of ``unit`` up to ``limit`` that ``fits`` (true up to some size, false
    beyond); 0 if not even ``unit`` fits. Gallops from ``guess`` (steps of 1, 2, 4, ... units) to a
    bracket, then bisects it: two calls when ``guess`` is the answer, O(log distance) otherwise."""
    cap = limit // unit  # sizes in units from here on
    low = high = min(cap, max(1, int(guess // unit)))
    stride = 1
    if fits(low * unit):
        while high < cap:
            high = min(cap, low + stride)
            if not fits(high * unit):
                break
            low, stride = high, 2 * stride
        else:
            return cap * unit
    else:
        while True:
            low = max(0, high - stride)
            if low == 0 or fits(low * unit):
                break
            high, stride = low, 2 * stride
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle * unit) else (low, middle)
    return low * unit
