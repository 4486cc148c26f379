"""TPU programs compiled by the real TPU compiler (libtpu's compile-only devices) on this CPU.

``jax.experimental.topologies`` gives the devices of a TPU topology without the chips; ``.compile()``
of a program sharded on them runs XLA:TPU and Mosaic (the Pallas kernels), which lowering alone
(tests/test_lowering.py) does not. ``memory_analysis()`` is per chip. libtpu comes with the
``test`` extra (``jax[tpu]``); conftest.py lets the xdist workers load it side by side.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aacn_jax import functional as F
from aacn_jax import models
from aacn_jax.functional import fused
from benchmarks.attention import PAPER_SHAPES
from train import program
from train import state as train_state
from train.tasks import classification

# Topology name -> (chips per host, what jax.devices() shows per chip). JAX 0.10 does not infer the
# host bounds of a single chip ("not divisible by the default chips_per_host_bounds 2x2x1").
TOPOLOGIES = {
    "v5e:1x1": (1, 1, 1),
    "v5e:2x2": (2, 2, 1),
    "v6e:1x1": (1, 1, 1),
    "v4:2x2x1": (2, 2, 1),
    "v5p:2x2x1": (2, 2, 1),
    "v3:2x2": (2, 2, 1),
    "v2:2x2": (2, 2, 1),
}
KINDS = {
    "v5e:1x1": "TPU v5 lite",
    "v5e:2x2": "TPU v5 lite",
    "v6e:1x1": "TPU v6 lite",
    "v4:2x2x1": "TPU v4",
    "v5p:2x2x1": "TPU v5",
    "v3:2x2": "TPU v3",
    "v2:2x2": "TPU v2",
}
BATCH = 8  # per chip: the kernels' blocks hold one image, so the batch only repeats their grid


def _devices(topology: str) -> list:
    bounds = TOPOLOGIES[topology]
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", chips_per_host_bounds=bounds)
    return list(topo.devices)


REPLICATED = PartitionSpec()


def _sharded(shape, dtype, mesh, spec=REPLICATED):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _attention_args(shape, mesh, dtype=jnp.bfloat16):
    arrays = jax.eval_shape(shape.arrays)
    return [_sharded((BATCH, *x.shape[1:]) if x.ndim == 5 else x.shape, dtype, mesh) for x in arrays]


def _forward_backward(q, k, v, rel_h, rel_w, cotangent):
    out, vjp = jax.vjp(F.self_attention_2d, q, k, v, rel_h, rel_w)
    return out, vjp(cotangent)


def _compile(fn, args, mesh):
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile()


def _kernel_calls(compiled) -> int:
    return len(re.findall(r"custom_call_target=\"tpu_custom_call\"", compiled.as_text()))


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_topologies_give_the_documented_device_kinds(topology):
    """Every kind this project compiles for is present in this libtpu, under its name."""
    assert {d.device_kind for d in _devices(topology)} == {KINDS[topology]}


# Every paper shape on the v5e, wrn_8x8 on the other generations (what differs there is the
# kernel's dtype and Mosaic's target, not the shape); v3's below, under a mesh of all its cores.
CASES = [("v5e:1x1", s) for s in PAPER_SHAPES] + [
    (topology, PAPER_SHAPES[2]) for topology in ("v6e:1x1", "v4:2x2x1", "v5p:2x2x1", "v2:2x2")
]


@pytest.mark.parametrize(("topology", "shape"), CASES, ids=lambda c: getattr(c, "name", c))
def test_default_attention_compiles_to_the_kernels(topology, shape):
    """bfloat16 forward and backward of the default attention on one chip: three Mosaic kernels
    (forward, dK/dV, dQ) in the compiled program."""
    mesh = Mesh(np.array(_devices(topology)[:1]), ("data",))
    compiled = _compile(_forward_backward, _attention_args(shape, mesh), mesh)
    assert _kernel_calls(compiled) >= 3


def test_the_bfloat16_kernel_does_not_compile_for_v3():
    """Why v2/v3 take the kernel in float32: Mosaic has no bfloat16 matmul before v4."""
    mesh = Mesh(np.array(_devices("v3:2x2")[:1]), ("data",))
    args = [_sharded((1, 128, 1, 128), jnp.bfloat16, mesh)] * 3
    with pytest.raises(Exception, match="CompileTimeMosaicUnsupportedRhsType"):
        _compile(fused.tpu_flash_attention, args, mesh)


def test_v3_takes_float32_kernels_on_each_cores_images():
    """v2/v3 run the kernel in float32 (the bfloat16 one does not compile there, above), which
    attention.py decides from the device kind of the mesh: here a data-parallel mesh of all eight v3
    cores, bfloat16 inputs split over them as ``python -m train`` splits a batch."""
    devices = _devices("v3:2x2")
    mesh = Mesh(np.array(devices), ("data",))
    batch = BATCH * len(devices)
    args = [
        _sharded((batch, *x.shape[1:]), jnp.bfloat16, mesh, PartitionSpec("data"))
        if x.ndim == 5
        else _sharded(x.shape, jnp.bfloat16, mesh)
        for x in jax.eval_shape(PAPER_SHAPES[2].arrays)
    ]
    compiled = _compile(_forward_backward, args, mesh)
    kernels = [line for line in compiled.as_text().splitlines() if '"tpu_custom_call"' in line]
    assert len(kernels) >= 3
    for line in kernels:  # the result types: float32, one core's images
        results = line.split("custom-call(")[0]
        assert "bf16" not in results and f"f32[{BATCH}," in results, results


def test_data_parallel_train_step_compiles():
    """A small AA ResNet's bfloat16 train step, batch split over the four chips of a v5e:2x2 as
    ``python -m train`` runs it: kernels per attention map size, each on one device's images."""
    devices = _devices("v5e:2x2")
    mesh = Mesh(np.array(devices), ("data",))
    model = models.create("aa_resnet_cifar", depth=8, num_classes=10, dtype=jnp.bfloat16)
    image_shape = (16, 16, 3)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    state = jax.eval_shape(
        lambda: train_state.create_state(jax.random.key(0), model=model, tx=tx, image_shape=image_shape)
    )
    state = jax.tree.map(lambda x: _sharded(x.shape, x.dtype, mesh), state)
    batch = BATCH * len(devices)
    arrays = {
        "image": _sharded((batch, *image_shape), jnp.float32, mesh, PartitionSpec("data")),
        "label": _sharded((batch,), jnp.int32, mesh, PartitionSpec("data")),
    }
    step = functools.partial(
        program.train_step,
        rng=jax.random.key(0),
        lr_fn=lambda s: 0.1,
        loss_fn=functools.partial(classification.classification_loss, label_smoothing=0.1),
    )
    compiled = _compile(step, (state, arrays), mesh)
    assert _kernel_calls(compiled) >= 3 * 3  # maps 16x16, 8x8, 4x4
    text = compiled.as_text()
    assert f"bf16[{BATCH}," in text or f"f32[{BATCH}," in text
    assert compiled.memory_analysis().temp_size_in_bytes < 2**30
