"""Relative self-attention speed and memory: ``python -m benchmarks.attention [--quick]``.

For each layer shape of the paper (CIFAR Wide-ResNet stages at 32/16/8, ImageNet ResNet-50
stages at 56/28/14/7; 8 heads, 20 key dims per head) it times forward+backward of:
  plain          content-only attention (no position logits), automatic path
  plain_flash    content-only attention through the fused kernels (cuDNN / Pallas flash on an
                 accelerator: the upper bound for relative attention there; blockwise on a CPU)
  dense          relative attention, every (HW)^2 logit at once, relative terms broadcast
  blockwise      relative attention, query rows in blocks, rematerialised in the backward pass
  fused          relative logits folded into the dot product, then the fused kernels
  mgpu           relative logits added inside the Mosaic GPU kernels' tile loops (Hopper; elsewhere
                 and in float32 fused's route)
  auto           relative attention as the library runs it by default (implementation=None)
  paper_port     a straightforward port of the paper's listing (tiled relative logits)
and records median seconds (the implementations of a shape timed in interleaved rounds;
``plain_flash`` and ``mgpu`` also their forward's time alone), XLA temporary bytes, optionally the
peak RSS of a fresh process, the fraction of this machine's measured matmul FLOP/s, and the
exponential floor: the time a Hopper GPU's exp2 units need for one exponential per logit forward
and one backward (``EXP2_PER_SECOND``), also as a fraction of the measured time. Every
implementation is first checked against ``dense`` (outputs and gradients). ``--quick`` runs tiny
shapes only (the agreement check, for CI) and writes nothing.
``--dtype bfloat16 --training_batch`` measures what training on an accelerator runs: bfloat16 at
batch 128 for the CIFAR shapes and 32 for the ImageNet ones. ``--mgpu_sweep`` first checks and
times ``mgpu`` at each setting of its tuning knobs (keys per block ``MGPU_KEY_BLOCKS`` x pipeline
stages ``MGPU_STAGES``) at each shape, forward+backward and the forward alone, records every timing
in the JSON (``mgpu_sweep``; a setting that fails to compile, e.g. beyond the shared memory, or
disagrees with dense gets its ``error`` or ``forward_error`` instead, and is not timed) and measures
the ``mgpu`` row at the fastest forward+backward.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from aacn_jax import functional as F
from aacn_jax.functional import relative_mgpu
from benchmarks import measure
from benchmarks.paper_port import paper_port_attention


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    height: int
    width: int
    heads: int = 8
    key_depth: int = 20  # per head
    value_depth: int = 2  # per head

    def arrays(self, seed: int = 0, dtype=jnp.float32):
        keys = jax.random.split(jax.random.key(seed), 6)
        b, h, w, n, dk, dv = (
            self.batch,
            self.height,
            self.width,
            self.heads,
            self.key_depth,
            self.value_depth,
        )
        normal = functools.partial(jax.random.normal, dtype=dtype)
        return (
            normal(keys[0], (b, h, w, n, dk)),
            normal(keys[1], (b, h, w, n, dk)),
            normal(keys[2], (b, h, w, n, dv)),
            normal(keys[3], (2 * h - 1, dk)) * jnp.asarray(dk**-0.5, dtype),
            normal(keys[4], (2 * w - 1, dk)) * jnp.asarray(dk**-0.5, dtype),
            normal(keys[5], (b, h, w, n, dv)),  # output cotangent
        )

    def logits(self) -> int:
        return self.batch * self.heads * (self.height * self.width) ** 2

    def forward_flops(self, relative: bool) -> int:
        tokens = self.height * self.width
        flops = 2 * self.batch * self.heads * tokens**2 * (self.key_depth + self.value_depth)
        if relative:
            flops += 2 * self.batch * self.heads * tokens * (self.height + self.width) * self.key_depth
        return flops


# dv per head follows AA-WRN-28-10 (dv = 16/32/64 over 8 heads) and AA-ResNet-50 (8/16/24/48).
PAPER_SHAPES = (
    Shape("wrn_32x32", 8, 32, 32, value_depth=2),
    Shape("wrn_16x16", 32, 16, 16, value_depth=4),
    Shape("wrn_8x8", 128, 8, 8, value_depth=8),
    Shape("r50_56x56", 1, 56, 56, value_depth=1),
    Shape("r50_28x28", 8, 28, 28, value_depth=2),
    Shape("r50_14x14", 32, 14, 14, value_depth=3),
    Shape("r50_7x7", 128, 7, 7, value_depth=6),
)
TRAINING_BATCH = {"wrn": 128, "r50": 32}  # per accelerator: CIFAR batch 128, ImageNet 4096 over 128 chips
QUICK_SHAPES = (
    Shape("quick_8x8", 2, 8, 8, heads=2, key_depth=4),
    Shape("quick_5x7", 2, 5, 7, heads=3, value_depth=3),
)


def training_shape(shape: Shape) -> Shape:
    """A paper shape at its network's training batch (:data:`TRAINING_BATCH`)."""
    return dataclasses.replace(shape, batch=TRAINING_BATCH[shape.name.split("_")[0]])


IMPLEMENTATIONS = {
    "plain": lambda q, k, v, rel_h, rel_w: F.self_attention_2d(q, k, v),
    "plain_flash": lambda q, k, v, rel_h, rel_w: F.self_attention_2d(q, k, v, implementation="fused"),
    "dense": lambda *a: F.self_attention_2d(*a, implementation="dense"),
    "blockwise": lambda *a: F.self_attention_2d(*a, implementation="blockwise"),
    "fused": lambda *a: F.self_attention_2d(*a, implementation="fused"),
    "mgpu": lambda *a: F.self_attention_2d(*a, implementation="mgpu"),
    "auto": lambda *a: F.self_attention_2d(*a),
    "paper_port": paper_port_attention,
}
RELATIVE = ("dense", "blockwise", "fused", "mgpu", "auto", "paper_port")
MGPU_KEY_BLOCKS = (64, 128, 256)  # the sweep's values of relative_mgpu.tuning(key_block=...)
MGPU_STAGES = (1, 2)  # and of relative_mgpu.tuning(stages=...)
FORWARD_TIMED = ("plain_flash", "mgpu")  # measure_shape times these forwards alone too
# One exp2 per logit forward and one recomputed backward, at 16 exp2 per clock per SM (132 SMs,
# ~1.83 GHz: H100/H200 SXM, FlashAttention-3, arXiv:2407.08608).
EXP2_PER_SECOND = 16 * 132 * 1.83e9


def _tuned(key_block: int | None, stages: int | None):
    """``relative_mgpu.tuning(key_block, stages)``, or nothing where both are None."""
    knobs = key_block is not None or stages is not None
    return relative_mgpu.tuning(key_block, stages) if knobs else contextlib.nullcontext()


@functools.cache
def forward_backward(name: str, key_block: int | None = None, stages: int | None = None):
    """Jitted ``(q, k, v, rel_h, rel_w, cotangent) -> (output, gradients)`` of one implementation;
    ``key_block``, ``stages``: traced under ``relative_mgpu.tuning(key_block=..., stages=...)``."""
    attention = IMPLEMENTATIONS[name]

    def run(q, k, v, rel_h, rel_w, cotangent):
        with _tuned(key_block, stages):
            out, vjp = jax.vjp(attention, q, k, v, rel_h, rel_w)
            return out, vjp(cotangent)

    return jax.jit(run)


@functools.cache
def forward(name: str, key_block: int | None = None, stages: int | None = None):
    """Jitted ``(q, k, v, rel_h, rel_w, cotangent) -> output``: :func:`forward_backward`'s forward
    alone (the cotangent unused), to split a time between the two passes."""
    attention = IMPLEMENTATIONS[name]

    def run(q, k, v, rel_h, rel_w, cotangent):
        with _tuned(key_block, stages):
            return attention(q, k, v, rel_h, rel_w)

    return jax.jit(run)


def mgpu_key_blocks(shape: Shape) -> list[int]:
    """The sweep's knob values the shape's map allows (at most 16 rows per key block)."""
    valid = []
    for key_block in MGPU_KEY_BLOCKS:
        try:
            relative_mgpu.plan(shape.height, shape.width, key_block)
        except ValueError:
            continue
        valid.append(key_block)
    return valid


def mgpu_knobs(shape: Shape, stages=MGPU_STAGES) -> list[tuple[int, int]]:
    """The sweep's ``(key_block, stages)`` settings at this shape: valid key blocks x ``stages``."""
    return [(key_block, n) for key_block in mgpu_key_blocks(shape) for n in stages]


def check_agreement(
    shape: Shape,
    names,
    dtype=jnp.float32,
    key_block: int | None = None,
    stages: int | None = None,
    backward: bool = True,
) -> None:
    """Outputs and gradients (``backward=False``: outputs alone, :func:`forward`) of every
    implementation equal dense's (plain ones: dense without tables); ``mgpu`` at the knobs
    ``key_block`` and ``stages``."""
    args = shape.arrays(dtype=dtype)
    tolerance = 2e-4 if dtype == jnp.float32 else 5e-2
    run = forward_backward if backward else forward
    reference = {name: "dense" if name in RELATIVE else "plain" for name in names}
    wants = {ref: run(ref)(*args) for ref in set(reference.values())}  # only the references needed
    for name in names:
        want = wants[reference[name]]
        got = run(name, *((key_block, stages) if name == "mgpu" else ()))(*args)
        for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            got_leaf, want_leaf = (np.asarray(x, np.float32) for x in (got_leaf, want_leaf))
            scale = max(1.0, float(np.abs(want_leaf).max())) if dtype != jnp.float32 else 1.0
            np.testing.assert_allclose(
                got_leaf, want_leaf, rtol=tolerance, atol=tolerance * scale, err_msg=f"{name} at {shape}"
            )


def check_mgpu_knobs(
    shape: Shape, dtype=jnp.float32, stages=MGPU_STAGES, backward: bool = True
) -> dict[tuple[int, int], str]:
    """:func:`check_agreement` of ``mgpu`` at each of the sweep's settings (``backward=False``: the
    forward alone); returns the failures, ``{(key_block, stages): "<error type>: <first line>"}`` (a
    kernel beyond the GPU's shared memory fails to compile), each printed, so that one failing
    setting costs its compile, not the run."""
    failures = {}
    for key_block, n in mgpu_knobs(shape, stages):
        try:
            check_agreement(shape, ["mgpu"], dtype, key_block, n, backward)
        except Exception as error:  # recorded in the JSON; the other settings go on
            lines = str(error).strip().splitlines() or [""]
            failures[key_block, n] = f"{type(error).__name__}: {lines[0][:300]}"
            what = "forward+backward" if backward else "forward"
            failed = f"{shape.name}: mgpu {what} at key_block={key_block} stages={n} FAILED"
            print(f"{failed}: {failures[key_block, n]}", flush=True)
    return failures


def sweep_mgpu(shape: Shape, repeats: int = 7, dtype=jnp.float32, stages=MGPU_STAGES) -> list[dict]:
    """``mgpu`` at each setting of the sweep (:func:`mgpu_knobs`), forward+backward and the forward
    alone, each checked against dense's, then timed in interleaved rounds: one row per setting with
    its ``seconds`` (or ``error`` if that check failed) and ``forward_seconds`` (or
    ``forward_error``). So a setting whose backward fails on a GPU still times its forward."""
    args = shape.arrays(dtype=dtype)
    passes = {"": forward_backward, "forward_": forward}
    failures = {prefix: check_mgpu_knobs(shape, dtype, stages, backward=prefix == "") for prefix in passes}
    calls = {
        (prefix, knob): functools.partial(run("mgpu", *knob), *args)
        for prefix, run in passes.items()
        for knob in mgpu_knobs(shape, stages)
        if knob not in failures[prefix]
    }
    seconds = measure.interleaved_median_seconds(calls, repeats=repeats, min_seconds=0.5) if calls else {}
    rows = []
    for knob in mgpu_knobs(shape, stages):
        row = {"shape": shape.name, "key_block": knob[0], "stages": knob[1]}
        for prefix in passes:
            if knob in failures[prefix]:
                row[f"{prefix}error"] = failures[prefix][knob]
            else:
                row[f"{prefix}seconds"] = seconds[prefix, knob]
        rows.append(row)
    return rows


def measure_shape(
    shape: Shape,
    peak_flops: float,
    repeats: int = 7,
    dtype=jnp.float32,
    mgpu_key_block: int | None = None,
    mgpu_stages: int | None = None,
    names=None,
) -> list[dict]:
    """One row per implementation (``names``, default all); their times come from interleaved rounds
    (see ``measure``), those of ``FORWARD_TIMED`` also their forward's alone (``forward_seconds``);
    ``mgpu`` at the knobs given (default: ``relative_mgpu``'s)."""
    args = shape.arrays(dtype=dtype)
    knobs = (mgpu_key_block, mgpu_stages)
    knobs_of = lambda name: knobs if name == "mgpu" else ()
    fns = {name: forward_backward(name, *knobs_of(name)) for name in names or IMPLEMENTATIONS}
    calls = {name: functools.partial(fn, *args) for name, fn in fns.items()}
    forward_only = [name for name in fns if name in FORWARD_TIMED]
    calls |= {
        f"{name} forward": functools.partial(forward(name, *knobs_of(name)), *args) for name in forward_only
    }
    seconds = measure.interleaved_median_seconds(calls, repeats=repeats, min_seconds=0.5)
    rows = []
    for name, fn in fns.items():
        flops = 3 * shape.forward_flops(relative=name in RELATIVE)  # backward ~ 2x forward
        rows.append(
            {
                "shape": dataclasses.asdict(shape),
                "implementation": name,
                "dtype": jnp.dtype(dtype).name,
                "seconds": seconds[name],
                "temp_bytes": measure.compiled_temp_bytes(fn, *args),
                "flops": flops,
                "flops_fraction": flops / seconds[name] / peak_flops,
                "exp_floor_seconds": 2 * shape.logits() / EXP2_PER_SECOND,
                "exp_floor_fraction": 2 * shape.logits() / EXP2_PER_SECOND / seconds[name],
            }
        )
        if name in forward_only:
            rows[-1]["forward_seconds"] = seconds[f"{name} forward"]
        if name == "mgpu":
            with relative_mgpu.tuning(*knobs):
                rows[-1]["key_block"] = relative_mgpu.plan(shape.height, shape.width).key_block
                rows[-1]["stages"] = mgpu_stages or relative_mgpu.DEFAULT_STAGES
    return rows


def _one_process_rss(shape: Shape, name: str) -> int:
    """Peak RSS of a fresh process that runs one forward+backward of this case."""
    return measure.peak_rss_bytes_in_subprocess(
        "benchmarks.attention", "--rss_case", json.dumps([dataclasses.asdict(shape), name])
    )


def _format(rows) -> str:
    lines = [
        f"{'shape':<12}{'impl':<12}{'ms':>10}{'temp MiB':>11}{'RSS MiB':>10}{'FLOP frac':>11}{'exp frac':>10}"
    ]
    for r in rows:
        rss = f"{r['rss_bytes'] / 2**20:10.0f}" if "rss_bytes" in r else f"{'-':>10}"
        lines.append(
            f"{r['shape']['name']:<12}{r['implementation']:<12}{1e3 * r['seconds']:10.2f}"
            f"{r['temp_bytes'] / 2**20:11.1f}{rss}{r['flops_fraction']:11.3f}{r['exp_floor_fraction']:10.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, agreement check only, writes nothing"
    )
    parser.add_argument(
        "--no_rss", action="store_true", help="skip the per-case fresh-process RSS measurement"
    )
    parser.add_argument("--shapes", nargs="*", help="names of paper shapes to run (default: all)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="input dtype")
    parser.add_argument(
        "--training_batch", action="store_true", help="batch 128 (CIFAR shapes) and 32 (ImageNet shapes)"
    )
    parser.add_argument(
        "--mgpu_sweep", action="store_true", help="time mgpu at each knob value first; measure at the best"
    )
    parser.add_argument(
        "--mgpu_stages",
        nargs="+",
        type=int,
        choices=range(1, relative_mgpu.MAX_STAGES + 1),
        default=list(MGPU_STAGES),
        help="the sweep's values of the mgpu pipeline stages (default: %(default)s)",
    )
    parser.add_argument("--rss_case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.rss_case:  # child process of _one_process_rss
        shape, name = json.loads(args.rss_case)
        jax.block_until_ready(forward_backward(name)(*Shape(**shape).arrays()))
        return
    shapes = (
        QUICK_SHAPES if args.quick else [s for s in PAPER_SHAPES if not args.shapes or s.name in args.shapes]
    )
    if args.training_batch:
        shapes = [training_shape(s) for s in shapes]
    dtype = jnp.dtype(args.dtype)
    stages = tuple(dict.fromkeys(args.mgpu_stages))
    # A full run's sweep checks each of mgpu's settings before timing it, shape by shape, and goes on
    # past a failing one; --quick checks them all here, and fails on any.
    swept_later = args.mgpu_sweep and not args.quick
    for shape in shapes:
        check_agreement(shape, [name for name in IMPLEMENTATIONS if name != "mgpu" or not swept_later], dtype)
        for key_block, n in mgpu_knobs(shape, stages) if args.mgpu_sweep and args.quick else ():
            check_agreement(shape, ["mgpu"], dtype, key_block, n)
    if not args.mgpu_sweep:
        note = ""
    elif args.quick:
        note = f", mgpu also at each of its sweep's settings (stages {list(stages)})"
    else:
        note = " (mgpu: the sweep checks each of its settings before timing it)"
    print(
        f"agreement: all {len(IMPLEMENTATIONS)} implementations match dense on {len(shapes)} shapes{note}",
        flush=True,
    )
    if args.quick:
        return
    # The FLOP fraction's denominator: a matmul in the benchmark's dtype, large enough to fill an
    # accelerator (1024 x 1024 on a CPU, where that already runs at full rate).
    size = 1024 if jax.default_backend() == "cpu" else 8192
    peak = measure.matmul_flops_per_second(size, dtype)
    print(f"matmul peak ({size}x{size}, {dtype.name}): {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows, sweep = [], []
    for shape in shapes:
        best, names = (None, None), list(IMPLEMENTATIONS)
        if args.mgpu_sweep:
            timed = sweep_mgpu(shape, dtype=dtype, stages=stages)
            sweep += timed
            ok = [r for r in timed if "seconds" in r]
            if ok:
                fastest = min(ok, key=lambda r: r["seconds"])
                best = (fastest["key_block"], fastest["stages"])
            else:  # every setting failed (the sweep's rows say why): measure the others
                names.remove("mgpu")
            times = {
                (r["key_block"], r["stages"]): (
                    r.get("seconds", "failed"),
                    r.get("forward_seconds", "failed"),
                )
                for r in timed
            }
            print(
                f"{shape.name}: mgpu (forward+backward, forward) seconds by (key_block, stages) {times}",
                flush=True,
            )
        measured = measure_shape(
            shape, peak, dtype=dtype, mgpu_key_block=best[0], mgpu_stages=best[1], names=names
        )
        for row in measured:
            if not args.no_rss:
                row["rss_bytes"] = _one_process_rss(shape, row["implementation"])
            rows.append(row)
            print(_format([row]).splitlines()[1], flush=True)
        # after every shape, so a run stopped at its time limit keeps what it measured
        payload = {"matmul_flops_per_second": peak, "exp2_per_second": EXP2_PER_SECOND, "rows": rows}
        path = measure.write_results("attention", {**payload, "mgpu_sweep": sweep})
    print(_format(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
