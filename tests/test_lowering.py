"""Cross-platform lowering: programs exported for TPU and CUDA from this CPU call the fused kernels
and hold no array with (HW)^2 elements per head (the dense logits), forward and backward.

``jax.export`` lowers for a platform this machine lacks; ``jax.lax.platform_dependent`` keeps only
that platform's branch, so the module text shows what the accelerator would run. cuDNN cannot be
lowered without cuDNN present: exported for CUDA here, the fused path takes the Pallas Triton
kernel; the cuDNN route runs on a GPU in ``benchmarks/device.sh``.
"""

from __future__ import annotations

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, NamedSharding, PartitionSpec

from aacn_jax import functional as F
from aacn_jax import models
from aacn_jax.functional import fused, relative_mgpu
from benchmarks.attention import PAPER_SHAPES
from train import program
from train import state as train_state
from train.tasks import classification

KERNEL_CALLS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
# The tests of the Mosaic GPU kernels themselves: on a JAX without them (0.10, see
# relative_mgpu.available) "mgpu" is the fused path, which tests/test_mgpu.py's fallback test asserts.
NEEDS_MGPU_KERNELS = pytest.mark.skipif(
    not relative_mgpu.available(),
    reason=f"JAX {jax.__version__} has no Mosaic GPU kernels (relative_mgpu.available): "
    "the fallback test covers it",
)
BATCH = 128
GPU_TARGET = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
TPU_TARGET = AbstractDevice(device_kind="TPU v5 lite", num_cores=None, platform="tpu")


def _export(fn, args, platform: str, mesh=None) -> str:
    """StableHLO text of ``jit(fn)(*args)`` lowered for ``platform`` (under ``mesh``, if given)."""
    checks = [export.DisabledSafetyCheck.custom_call(KERNEL_CALLS["cuda"])] if platform == "cuda" else []
    with _lowering_target(platform, mesh):
        exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()


def _lowering_target(platform: str, mesh):
    """The training script's ``jax.set_mesh(mesh)`` for the target: an abstract mesh of the same
    shape whose devices are the target's (under a mesh of this machine's CPUs the attention traces
    the CPU's branch only). For CUDA an abstract mesh even without ``mesh``: JAX 0.12's Triton
    lowering asks for the target GPU, which this machine lacks ("No supported GPU devices found,
    please specify an abstract GPU device")."""
    if platform != "cuda" and mesh is None:
        return contextlib.nullcontext()
    sizes, names = (tuple(mesh.shape.values()), mesh.axis_names) if mesh is not None else ((1,), ("data",))
    device = GPU_TARGET if platform == "cuda" else TPU_TARGET
    target = AbstractMesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), abstract_device=device)
    return jax.sharding.use_abstract_mesh(target)


def _data_mesh():
    """The training script's mesh over this session's 4 simulated devices."""
    return jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))


def _sharded(x, mesh, spec):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))


def _zero_constants(text: str) -> set[str]:
    return set(re.findall(r"(%cst\w*) = stablehlo.constant dense<0\.0+e\+00>", text))


def _token_counts(height: int, width: int) -> set[int]:
    """HW and the padded token counts of the kernels (TPU: multiples of 128; Triton: powers of two
    up to 128, multiples of 128 beyond). 128 itself is left out: the TPU kernel keeps its per-query
    statistics and segment ids broadcast over 128 lanes (``[B, N, T, 128]``, O(HW)), which at 128
    tokens look like a 128x128 array, so at maps of up to 128 tokens only an unpadded ``HW x HW``
    array is caught."""
    tokens = height * width
    round_up = lambda n, m: -(-n // m) * m
    triton = 1 << max(4, (tokens - 1).bit_length()) if tokens <= 128 else round_up(tokens, 128)
    return {tokens, round_up(tokens, 128), triton} - {128} | {tokens}


def quadratic_lines(text: str, batch: int, height: int, width: int) -> list[str]:
    """Lines of a module that compute an array of ``batch`` images with (HW)^2 elements per head.

    Such an array has the batch first and ends in ``T x T`` for T the number of tokens, padded or
    not (the logits ``[B, N, T, T]``, a tiled bias), or is ``[B, N, H, W, H, W]``. Allowed: zero
    fills of the slots that ``platform_dependent``'s ``switch`` keeps for the CPU branch's
    residuals (JAX joins the residuals of all branches; XLA deletes the unused fill), and the
    lines that only pass them on (returns, function signatures and calls).
    """
    squares = "|".join(f"{t}x{t}" for t in sorted(_token_counts(height, width)))
    quadratic = re.compile(
        rf"tensor<{batch}x(\d+x)*({squares})x[a-z]|tensor<{batch}x\d+x{height}x{width}x{height}x{width}x[a-z]"
    )
    zeros = _zero_constants(text)
    placeholder = re.compile(r"stablehlo.broadcast_in_dim (%cst\w*), dims = \[\] : \(tensor<\w+>\)")
    offending = []
    for line in text.splitlines():
        if not quadratic.search(line):
            continue
        fill = placeholder.search(line)
        if fill and fill.group(1) in zeros:
            continue
        if line.strip().startswith(("stablehlo.return", "return ", "func.func ", "}) : (tensor<i32>) ->")):
            continue
        if re.match(r"%[\w:#]+ = call @", line.strip()):  # a jitted function's residuals, passed on
            continue
        offending.append(line.strip()[:300])
    return offending


def _attention_vjp(implementation):
    def run(q, k, v, rel_h, rel_w, cotangent):
        attention = functools.partial(F.self_attention_2d, implementation=implementation)
        out, vjp = jax.vjp(attention, q, k, v, rel_h, rel_w)
        return out, vjp(cotangent)

    return run


def _images_per_call(platform: str, share: int, sides) -> set[int]:
    """The images a kernel call sees from one device's ``share``: all of them, or on a TPU the
    chunk that ``tpu_relative_attention`` attends to at once at each map size (8 heads)."""
    if platform != "tpu":
        return {share}
    return {fused.tpu_images_per_chunk(share, side, side, 8) for side in sides}


def _shape_args(shape, dtype=jnp.bfloat16):
    q, k, v, rel_h, rel_w, cotangent = jax.eval_shape(shape.arrays)
    return tuple(
        jax.ShapeDtypeStruct((BATCH, *x.shape[1:]) if x.ndim == 5 else x.shape, dtype)
        for x in (q, k, v, rel_h, rel_w, cotangent)
    )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("implementation", ["fused", None])
@pytest.mark.parametrize("shape", PAPER_SHAPES, ids=lambda s: s.name)
def test_attention_forward_backward_lowers_to_the_fused_kernel(shape, implementation, platform):
    """Every paper layer shape, batch 128, bfloat16: forward and backward are kernel calls
    (TPU: forward, dK/dV and dQ kernels; Triton: forward, backward preprocessing and backward)."""
    text = _export(_attention_vjp(implementation), _shape_args(shape), platform)
    assert text.count(KERNEL_CALLS[platform]) >= 3, f"{platform} kernel calls missing"
    assert quadratic_lines(text, BATCH, shape.height, shape.width) == []


def test_the_check_catches_dense_logits_and_a_tiled_bias():
    """The dense path (and the paper's tiled bias) in an exported program are reported."""
    shape = PAPER_SHAPES[2]  # 8x8
    text = _export(_attention_vjp("dense"), _shape_args(shape), "tpu")
    assert "tpu_custom_call" not in text
    assert quadratic_lines(text, BATCH, shape.height, shape.width)

    def with_tiled_bias(q, k, v, rel_h, rel_w, cotangent):
        bias = F.relative_logits(q, rel_h, rel_w)  # B, N, H, W, H, W
        out, grads = _attention_vjp("fused")(q, k, v, rel_h, rel_w, cotangent)
        return out, grads, bias.sum()

    text = _export(with_tiled_bias, _shape_args(shape), "tpu")
    assert quadratic_lines(text, BATCH, shape.height, shape.width)


def test_default_keeps_the_xla_paths_where_fused_has_no_kernel():
    """Exported for ROCm (no fused kernel there) the default is the CPU's choice by memory, not the
    folded inputs (depth 20 + 32 + 32 = 84 at 32x32) on the blockwise path."""
    shape = PAPER_SHAPES[0]
    text = _export(lambda *a: F.self_attention_2d(*a[:5]), _shape_args(shape), "rocm")
    assert "x84x" not in text and "custom_call" not in text
    assert "x84x" in _export(_attention_vjp("fused"), _shape_args(shape), "rocm")  # the check sees folding


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_run_on_each_devices_share_of_a_sharded_batch(platform):
    """Batch 128 split over a 4-device mesh: XLA cannot partition a Pallas kernel, so each device
    must call it on its 32 images (``shard_map`` under ``jax.set_mesh``; on a TPU a chunk of them
    at a time); without that the export fails ("Mosaic kernels cannot be automatically partitioned")."""
    shape, mesh = PAPER_SHAPES[0], _data_mesh()
    specs = [PartitionSpec("data")] * 3 + [PartitionSpec()] * 2 + [PartitionSpec("data")]
    args = [_sharded(x, mesh, spec) for x, spec in zip(_shape_args(shape), specs, strict=True)]
    text = _export(_attention_vjp(None), args, platform, mesh)
    calls = [line for line in text.splitlines() if KERNEL_CALLS[platform] in line and "custom_call" in line]
    assert len(calls) >= 3
    images = _images_per_call(platform, BATCH // 4, [shape.height])
    assert all(any(f"tensor<{n}x" in line for n in images) for line in calls)
    assert not any(f"tensor<{BATCH}x" in line for line in calls)
    for batch in (BATCH, BATCH // 4, *images):
        assert quadratic_lines(text, batch, shape.height, shape.width) == []


def test_under_a_mesh_only_the_branches_of_its_platform_are_traced():
    """Under ``jax.set_mesh`` of this machine's CPUs the default traces the CPU's XLA path alone
    (the other platforms' kernels would never run there and cost tracing time), so that program
    cannot be exported for a TPU; without a mesh it holds every platform's kernels."""
    args = _shape_args(PAPER_SHAPES[2])[:5]
    attention = jax.jit(lambda *a: F.self_attention_2d(*a))
    assert str(jax.make_jaxpr(attention)(*args)).count("pallas_call") >= 2  # the TPU and GPU kernels
    with jax.set_mesh(_data_mesh()):
        assert "pallas_call" not in str(jax.make_jaxpr(attention)(*args))
        with pytest.raises(NotImplementedError, match="platform_index"):
            export.export(attention, platforms=["tpu"])(*args)
    assert _export(attention, args, "tpu", _data_mesh()).count("tpu_custom_call") >= 1  # abstract TPUs


TRAIN_STEPS = [("aa_wrn28_10", 128, 32, (32, 16, 8)), ("aa_resnet50", 32, 224, (14, 7))]


@pytest.mark.parametrize(
    ("platform", "implementation", "kernel_call"),
    [
        ("tpu", None, KERNEL_CALLS["tpu"]),
        ("cuda", None, KERNEL_CALLS["cuda"]),
        pytest.param("cuda", "mgpu", "mosaic_gpu", marks=NEEDS_MGPU_KERNELS),
    ],
)
@pytest.mark.parametrize(("name", "batch", "size", "attention_sizes"), TRAIN_STEPS)
def test_train_step_lowers_to_the_fused_kernel(
    name, batch, size, attention_sizes, platform, implementation, kernel_call
):
    """A whole bfloat16 train step (loss, gradients, SGD update) at the model's training resolution
    with its default attention (and, on CUDA, the Mosaic GPU kernels of ``"mgpu"``), as
    ``train/loop.py`` runs it on 4 devices (batch split over a ``data`` mesh set with
    ``jax.set_mesh``, state replicated): kernels forward and backward at every attention map size,
    each on one device's share of the batch, and no (HW)^2 array."""
    model = models.create(name, num_classes=100, dtype=jnp.bfloat16, attention_implementation=implementation)
    tx = optax.sgd(0.1, momentum=0.9)
    image_shape = (size, size, 3)
    mesh = _data_mesh()
    state = jax.eval_shape(
        lambda: train_state.create_state(jax.random.key(0), model=model, tx=tx, image_shape=image_shape)
    )
    state = jax.tree.map(lambda x: _sharded(x, mesh, PartitionSpec()), state)
    batch_arrays = {
        "image": jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }
    batch_arrays = jax.tree.map(lambda x: _sharded(x, mesh, PartitionSpec("data")), batch_arrays)
    step = functools.partial(
        program.train_step,
        rng=jax.random.key(0),
        lr_fn=lambda s: 0.1,
        loss_fn=functools.partial(classification.classification_loss, label_smoothing=0.1),
    )
    text = _export(step, (state, batch_arrays), platform, mesh)
    # Layers of one shape share their kernels' lowering: three calls (forward and backward) per map size.
    calls = [line for line in text.splitlines() if kernel_call in line and "custom_call" in line]
    assert len(calls) >= 3 * len(attention_sizes)
    # One device's share: its images (the Mosaic GPU kernels take them times the 8 heads, [B*N, T, d]).
    share = batch // 4 * (8 if implementation == "mgpu" else 1)
    images = _images_per_call(platform, share, attention_sizes)
    assert all(any(f"tensor<{n}x" in line for n in images) for line in calls)
    if implementation == "mgpu":  # the kernels add the relative factors: no Triton, no folded depth
        assert KERNEL_CALLS["cuda"] not in text
    for side in attention_sizes:
        for count in (batch, batch // 4, *images):
            assert quadratic_lines(text, count, side, side) == [], f"{side}x{side}"
