"""GPU memory without a GPU: ``python -m benchmarks.gpu_compile [--quick] [--table]``.

XLA's GPU compiler runs deviceless for a described target (``jax.experimental.topologies`` with a
``target_config``: here an H100 SXM, sm_90a), Mosaic GPU and Triton kernels included, and
``memory_analysis()`` says what each program needs. Rows, bfloat16 at the training batch (128 for
the CIFAR shapes, 32 for ImageNet's):

- attention: forward+backward of one attention layer at each paper shape, for ``plain_cudnn``
  (content-only, cuDNN flash attention: the reference of the memory goal), ``fused`` and ``mgpu``
  (:mod:`benchmarks.attention`), with the kernels each program calls;
- models: the SGD train step of AA-WRN-28-10 and AA-ResNet-50 (``mgpu`` and ``fused``) beside their
  plain twins (:mod:`benchmarks.models`).

Deviceless, ``fused`` takes the Triton kernel where a GPU's process would take cuDNN (the library
asks the local GPU whether cuDNN takes the depth), so its rows are fold + Triton. Results go to
``benchmarks/results/compile-gpu.json``; ``--table`` prints the docs' tables from it. Needs the CUDA
plugin of this jaxlib and cuDNN (docs/performance.md says what to install); no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling needs no GPU
os.environ.setdefault("MOSAIC_GPU_DUMP_PTXAS", "1")  # ptxas reports each Mosaic kernel's registers

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from aacn_jax import models
from aacn_jax.functional.fused import cudnn_attention
from benchmarks import attention as attention_benchmark
from benchmarks import measure
from benchmarks.attention import PAPER_SHAPES, Shape, mgpu_knobs, training_shape
from benchmarks.models import TRAINING_PAIRS, train_step_fn

RESULTS = measure.RESULTS / "compile-gpu.json"
MiB = 2**20
# What XLA's GPU compiler asks of the target (the H100 SXM's figures; cuDNN 9 and CUDA 12 for the
# libraries' version checks).
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA" dnn_version_info { major: 9 minor: 8 } runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
ATTENTION = ("plain_cudnn", "fused", "mgpu")
MODEL_IMPLEMENTATIONS = ("mgpu", "fused")
QUICK_SHAPE = Shape("quick_16x16", 2, 16, 16)
KNOB_STAGES = (1, 2, 3)


def plain_cudnn(q, k, v, rel_h, rel_w):
    """Content-only attention through cuDNN's flash kernel, ``[B, H, W, N, d]`` in and out."""
    batch, height, width, heads, _ = v.shape
    tokens = lambda x: x.reshape(batch, height * width, heads, x.shape[-1])
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    return cudnn_attention(tokens(q), tokens(k), tokens(v)).reshape(v.shape)


def h100_mesh() -> jax.sharding.Mesh:
    """A one-device mesh of a compile-only H100."""
    topology = topologies.get_topology_desc(platform="cuda", target_config=H100, topology="1x1x1")
    return topologies.make_mesh(topology, (1,), ("data",))


@contextlib.contextmanager
def process_stdout() -> Iterator[list[str]]:
    """What this process writes to file descriptor 1 inside (C++ included), as lines, after."""
    lines: list[str] = []
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile("w+") as captured:
        os.dup2(captured.fileno(), 1)
        try:
            yield lines
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            captured.seek(0)
            lines.extend(captured.read().splitlines())


def ptxas_report(lines: list[str]) -> dict[str, dict[str, int]]:
    """``{kernel: {"registers": n, "spill_bytes": stores + loads}}`` from ptxas's ``-v`` lines."""
    kernels: dict[str, dict[str, int]] = {}
    name = ""
    for line in lines:
        if found := re.search(r"Compiling entry function '(\w+)'", line):
            name = found.group(1).removesuffix("_mosaic_gpu_kernel")
        elif found := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            kernels.setdefault(name, {})["spill_bytes"] = int(found.group(1)) + int(found.group(2))
        elif found := re.search(r"Used (\d+) registers", line):
            kernels.setdefault(name, {})["registers"] = int(found.group(1))
    return kernels


def compiled_facts(mesh: jax.sharding.Mesh, fn, *args) -> dict:
    """``fn`` compiled for the mesh's GPU: temporary bytes, the custom calls it makes and what ptxas
    said of each Mosaic GPU kernel, or the compiler's ``error`` (e.g. a kernel beyond the shared
    memory)."""
    try:
        with process_stdout() as lines, jax.set_mesh(mesh):
            compiled = jax.jit(fn).lower(*args).compile()
    except (jax.errors.JaxRuntimeError, ValueError) as error:  # XLA's refusal, Mosaic's at lowering
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    return {"temp_bytes": temp, "custom_calls": calls, "kernels": ptxas_report(lines)}


def layer_args(mesh: jax.sharding.Mesh, shape: Shape) -> list[jax.ShapeDtypeStruct]:
    """``q, k, v, rel_h, rel_w, cotangent`` of one layer at ``shape``, bfloat16, on the mesh."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    arrays = jax.eval_shape(functools.partial(shape.arrays, dtype=jnp.bfloat16))
    return [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in arrays]


def forward_backward(name: str):
    """:func:`benchmarks.attention.forward_backward`, ``plain_cudnn``'s too."""
    if name != "plain_cudnn":
        return attention_benchmark.forward_backward(name)

    def run(q, k, v, rel_h, rel_w, cotangent):
        out, vjp = jax.vjp(plain_cudnn, q, k, v, rel_h, rel_w)
        return out, vjp(cotangent)

    return run


def attention_rows(mesh: jax.sharding.Mesh, shape: Shape) -> list[dict]:
    """One row per :data:`ATTENTION` implementation: forward+backward of one layer in bfloat16."""
    args = layer_args(mesh, shape)
    rows = []
    for name in ATTENTION:
        facts = compiled_facts(mesh, forward_backward(name), *args)
        facts.pop(
            "kernels", None
        )  # ptxas's are in knob_rows, run first: a kernel compiled again is not reported
        rows.append({"shape": dataclasses.asdict(shape), "implementation": name} | facts)
    reference = rows[0]["temp_bytes"]
    return [
        row | {"memory_ratio": row["temp_bytes"] / reference} if "temp_bytes" in row else row for row in rows
    ]


def knob_rows(mesh: jax.sharding.Mesh, shape: Shape) -> list[dict]:
    """``mgpu`` at every ``(key_block, stages)`` of the device sweep's grid, stages up to 3
    (:func:`benchmarks.attention.mgpu_knobs`): what ptxas says of each kernel, or why it fails."""
    args = layer_args(mesh, shape)
    return [
        {"shape": shape.name, "key_block": key_block, "stages": stages}
        | compiled_facts(mesh, attention_benchmark.forward_backward("mgpu", key_block, stages), *args)
        for key_block, stages in mgpu_knobs(shape, stages=KNOB_STAGES)
    ]


def model_row(
    mesh: jax.sharding.Mesh, name: str, size: int, classes: int, batch: int, implementation
) -> dict:
    """The train step of ``name`` (bfloat16) at ``batch``; ``implementation`` its attention's or None."""
    extra = {} if implementation is None else {"attention_implementation": implementation}
    model = models.create(name, num_classes=classes, dtype=jnp.bfloat16, **extra)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=replicated)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated)
    init = lambda: model.init(jax.random.key(0), jnp.zeros(images.shape), train=False)
    variables = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(init)
    )
    with process_stdout(), jax.set_mesh(mesh):  # the kernels' ptxas reports: left out of these rows
        compiled = train_step_fn(model).lower(variables, images, labels).compile()
    memory = compiled.memory_analysis()
    return {
        "model": name,
        "attention_implementation": implementation,
        "batch": batch,
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
    }


def table(results: dict) -> str:
    """The docs' Markdown tables: attention temporaries per shape, then the train steps'."""
    by_shape: dict[str, dict[str, dict]] = {}
    for row in results["attention"]:
        by_shape.setdefault(row["shape"]["name"], {})[row["implementation"]] = row
    lines = ["| shape | " + " | ".join(f"{n} MiB" for n in ATTENTION) + " | mgpu / plain_cudnn |"]
    lines.append("|---" * (len(ATTENTION) + 2) + "|")
    for name, rows in by_shape.items():
        cells = " | ".join(
            f"{rows[n]['temp_bytes'] / MiB:.0f}" if "temp_bytes" in rows[n] else "does not compile"
            for n in ATTENTION
        )
        lines.append(f"| {name} | {cells} | {rows['mgpu']['memory_ratio']:.1f}x |")
    lines += ["", *knob_table(results["mgpu_knobs"])]
    lines += ["", "| model | attention | batch | temporaries GiB | x plain twin |", "|---|---|---|---|---|"]
    plain = {r["model"]: r for r in results["models"] if r["attention_implementation"] is None}
    for r in results["models"]:
        twin = plain.get(r["model"].removeprefix("aa_"))
        ratio = f"{r['temp_bytes'] / twin['temp_bytes']:.2f}" if twin and twin is not r else ""
        lines.append(
            f"| {r['model']} | {r['attention_implementation'] or ''} | {r['batch']} | "
            f"{r['temp_bytes'] / 2**30:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def knob_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per shape and ``(key_block, stages)``, the registers of the forward / dQ / dK
    kernels (of 255 a thread), the bytes they spill, or why it does not compile."""
    settings = sorted({(r["key_block"], r["stages"]) for r in rows})
    cells: dict[str, dict[tuple[int, int], str]] = {}
    for r in rows:
        if "error" in r:
            cell = "over shared memory" if "shared memory" in r["error"] else r["error"][:40]
        else:
            kernels = [r["kernels"].get(f"relative_attention_{k}", {}) for k in ("fwd", "dq", "dkv")]
            cell = "/".join(str(k.get("registers", "?")) for k in kernels)
            spilled = sum(k.get("spill_bytes", 0) for k in kernels)
            cell += f", spills {spilled} B" if spilled else ""
        cells.setdefault(r["shape"], {})[r["key_block"], r["stages"]] = cell
    header = "| shape | " + " | ".join(f"{k} keys x {n}" for k, n in settings) + " |"
    lines = [header, "|---" * (len(settings) + 1) + "|"]
    for shape, by_setting in cells.items():
        lines.append(f"| {shape} | " + " | ".join(by_setting.get(s, "") for s in settings) + " |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one small attention shape; writes nothing")
    parser.add_argument("--table", action="store_true", help=f"print the Markdown tables of {RESULTS.name}")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(RESULTS.read_text())))
        return
    mesh = h100_mesh()
    if args.quick:
        for row in knob_rows(mesh, QUICK_SHAPE)[:1] + attention_rows(mesh, QUICK_SHAPE):
            print({key: value for key, value in row.items() if key != "shape"})
        return
    start = time.perf_counter()
    results: dict = {"machine": measure.machine_info(), "target": "NVIDIA H100 80GB HBM3 (deviceless)"}
    results["attention"], results["mgpu_knobs"] = [], []
    for shape in PAPER_SHAPES:
        shape = training_shape(shape)
        for row in knob_rows(mesh, shape):
            found = row.get("error") or row["kernels"]
            print(
                f"{shape.name:<11}mgpu {row['key_block']:>3} keys x {row['stages']} stages: {found}",
                flush=True,
            )
            results["mgpu_knobs"].append(row)
        for row in attention_rows(mesh, shape):
            found = f"{row['temp_bytes'] / MiB:8.0f} MiB" if "temp_bytes" in row else row["error"]
            print(f"{shape.name:<11}{row['implementation']:<12}{found}", flush=True)
            results["attention"].append(row)
    results["models"] = []
    for (plain_name, aa_name), size, classes, batch in TRAINING_PAIRS:
        for name, implementation in [(plain_name, None)] + [(aa_name, i) for i in MODEL_IMPLEMENTATIONS]:
            row = model_row(mesh, name, size, classes, batch, implementation)
            print(f"{name:<12}{implementation or '':<7}{row['temp_bytes'] / 2**30:6.2f} GiB", flush=True)
            results["models"].append(row)
    results["compile_seconds"] = round(time.perf_counter() - start)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main(sys.argv[1:])
