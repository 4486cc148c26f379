"""The Mosaic GPU kernels compiled for an H100 by XLA's GPU compiler without a GPU, ptxas included
(:mod:`benchmarks.gpu_compile`): what the interpreter cannot say (registers, spills, shared memory,
lowering to sm_90a code) for the programs the device sweep times.

Needs the CUDA plugin of the installed jaxlib and ptxas (``pip install -e ".[gpu-compile]"``), so the
tests are marked ``gpu_compile``, which pyproject's ``addopts`` deselect. CI runs them with the GPU
machine's JAX (``.ci/run``, last job); without the plugin they fail, they do not skip.
"""

from __future__ import annotations

import pytest

from aacn_jax.functional import relative_mgpu
from benchmarks import attention, gpu_compile
from benchmarks.attention import PAPER_SHAPES, training_shape

pytestmark = pytest.mark.gpu_compile

KERNELS = {"relative_attention_fwd", "relative_attention_dq", "relative_attention_dkv"}


@pytest.fixture(scope="module")
def mesh():
    return gpu_compile.h100_mesh()


def compiled(mesh, shape, key_block=None, stages=None):
    args = gpu_compile.layer_args(mesh, training_shape(shape))
    return gpu_compile.compiled_facts(mesh, attention.forward_backward("mgpu", key_block, stages), *args)


def assert_three_kernels_without_spills(facts):
    assert "error" not in facts, facts
    assert set(facts["kernels"]) == KERNELS
    for name, kernel in facts["kernels"].items():
        assert kernel["spill_bytes"] == 0, (name, kernel)


@pytest.mark.parametrize("shape", PAPER_SHAPES, ids=lambda shape: shape.name)
def test_default_kernels_compile_for_an_h100_without_spilling(mesh, shape):
    """Forward+backward of one layer at the training batch, the default knobs: only the Mosaic GPU
    kernels (no cuDNN, no Triton fallback), all three through ptxas, no register spilled."""
    facts = compiled(mesh, shape)
    assert_three_kernels_without_spills(facts)
    assert facts["custom_calls"] == ["mosaic_gpu_v2"]


@pytest.mark.parametrize("shape", [PAPER_SHAPES[0], PAPER_SHAPES[3]], ids=lambda shape: shape.name)
def test_pipelined_kernels_fit_the_shared_memory_of_an_h100(mesh, shape):
    """The device sweep's pipelined setting at the two largest maps (32x32, 56x56): its extra slots
    fit the 227 KiB of shared memory a block may have, and nothing spills."""
    assert_three_kernels_without_spills(compiled(mesh, shape, stages=2))


def test_a_kernel_beyond_the_shared_memory_is_refused_at_compile_time(mesh):
    """256 keys through 3 slots at 32x32 needs more than 227 KiB: the compiler says so (the device
    sweep records such a setting as an error instead of timing it)."""
    assert relative_mgpu.plan(32, 32, 256).key_block == 256
    facts = compiled(mesh, PAPER_SHAPES[0], key_block=256, stages=3)
    assert "exceeds available shared memory" in facts["error"]
