"""Helpers for the training-script tests: a tiny config, CIFAR tarballs in the official format, and
the worker of the two-process tests (``python tests/train_helpers.py PORT PROCESS_ID WORKDIR [STEPS]``)."""

from __future__ import annotations

import fcntl
import importlib.metadata
import io
import os
import pathlib
import pickle
import sys
import tarfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent


def _fast_compile_flags() -> str:
    """XLA CPU flags that shorten compiles: JAX 0.10's XLA compiles a small AA model's train step in
    half the time with its older fusion emitters (aa_resnet_cifar: 2.9 s, was 5.3 s, on the 2-core
    CPU; a 200-step optimised run gains nothing). XLA of JAX 0.12 has only the new emitters and
    aborts on the flag; 0.11 was not measured, so it keeps its default."""
    major, minor = (int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])
    return "--xla_cpu_use_fusion_emitters=false" if (major, minor) < (0, 11) else ""


# XLA's CPU backend at optimisation level 0 in every test process: the tests' programs are tiny and
# compiled once, so compiling is most of their cost (a ResNet-8's init: 22 s at the default level,
# 4 s at level 0, on a 2-core CPU) and running them unoptimised costs little.
XLA_TEST_FLAGS = f"--xla_backend_optimization_level=0 {_fast_compile_flags()}".strip()
# A long run (the shared 100-step digits run): level 1 compiles faster than the default level and
# runs about as fast (25.4 -> 20.3 s on JAX 0.12, 24.1 -> 21.0 s on 0.10, same test accuracy;
# level 0 runs 5x slower there).
XLA_LONG_RUN_FLAGS = "--xla_backend_optimization_level=1"
# The persistent compilation cache of every test process (read by JAX at its start). Every compile
# is kept, the small ones too: the test processes compile the same programs again (the
# training-script tests: 116 s with a 0.5 s threshold, 99 s with none, on the 2-core CPU).
COMPILE_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": str(REPO / ".cache" / "jax"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}

# A tiny AA model on digits: global batch 8 (2 per simulated device), checkpoints at steps 2 and 4.
TINY = {
    "model_overrides.depth": 8,
    "model_overrides.width": 8,
    "batch_size": 8,
    "base_batch_size": 8,
    "num_train_steps": 4,
    "log_every_steps": 1,
    "eval_every_steps": 1000,
    "checkpoint_every_steps": 2,
    "max_checkpoints_to_keep": 10,
}


def tiny_config(overrides: dict | None = None):
    """The default config with TINY and ``overrides`` (``{dotted key: value}``) applied."""
    from train.configs import default

    config = default.get_config()
    config.update_from_flattened_dict({**TINY, **(overrides or {})})
    return config


def cli_flags(overrides: dict | None = None) -> list[str]:
    """The command-line form of :func:`tiny_config`'s settings."""
    return [f"--config.{key}={value}" for key, value in {**TINY, **(overrides or {})}.items()]


def made_once(tmp_path_factory, name: str, make) -> pathlib.Path:
    """The folder ``name`` that ``make(folder)`` fills, made once per test session.

    The first xdist worker to ask makes it under a file lock in the directory the workers share;
    the others wait and reuse it. (xdist's ``loadgroup`` does not keep a group on one worker with
    pytest 9, so grouping cannot be relied on, and a module-scoped fixture would run on each worker.)
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    path = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "done").exists():
            path.mkdir(parents=True, exist_ok=True)
            make(path)
            (path / "done").touch()
    return path


def subprocess_env(device_count: int, *, optimised: bool = False) -> dict[str, str]:
    """Environment of a child JAX process on ``device_count`` CPU devices sharing the test compile
    cache, with ``XLA_TEST_FLAGS``, or ``XLA_LONG_RUN_FLAGS`` if ``optimised`` (a long run, where
    running costs more than compiling)."""
    flags = XLA_LONG_RUN_FLAGS if optimised else XLA_TEST_FLAGS
    return {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={device_count}".strip(),
        "JAX_PLATFORMS": "cpu",
        **COMPILE_CACHE_ENV,
        "PYTHONPATH": str(REPO),
    }


def flat_params(params) -> dict[str, np.ndarray]:
    """``{path: this process's copy}`` of every (replicated) parameter."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0)) for path, leaf in leaves}


def write_cifar_tarball(data_dir: pathlib.Path, name: str, rng: np.random.Generator):
    """A small tarball in the official CIFAR python format (class names ``class <i>`` in its meta
    file); returns ``(train, test)`` as ``(images [N, 32, 32, 3], labels [N])`` with the pixels
    where the format puts them."""
    if name == "cifar10":
        archive, folder, label_key = "cifar-10-python.tar.gz", "cifar-10-batches-py", b"labels"
        members = {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3}
    else:
        archive, folder, label_key = "cifar-100-python.tar.gz", "cifar-100-python", b"fine_labels"
        members = {"train": 6, "test": 3}
    arrays = {}
    data_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(data_dir / archive, "w:gz") as tar:
        for member, count in members.items():
            data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane
            labels = rng.integers(0, 10 if name == "cifar10" else 100, size=count).tolist()
            batch = {b"batch_label": member.encode(), b"data": data, label_key: labels}
            if name == "cifar100":
                batch[b"coarse_labels"] = [label // 5 for label in labels]
            payload = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            arrays[member] = (data.reshape(count, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels))
        meta, key = ("batches.meta", b"label_names") if name == "cifar10" else ("meta", b"fine_label_names")
        names = [f"class {i}".encode() for i in range(10 if name == "cifar10" else 100)]
        payload = pickle.dumps({key: names}, protocol=2)
        info = tarfile.TarInfo(f"{folder}/{meta}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    split = [k for k in arrays if k.startswith("test")]
    train = [v for k, v in arrays.items() if k not in split]
    return (
        (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        arrays[split[0]],
    )


def two_process_worker(port: int, process_id: int, workdir: str, num_steps: int = 3) -> None:
    """One of two processes (2 CPU devices each) training TINY on a 4-device global mesh."""
    import jax

    jax.distributed.initialize(
        f"localhost:{port}", num_processes=2, process_id=process_id, initialization_timeout=120
    )
    from absl import logging

    from train import loop

    logging.set_verbosity(logging.WARNING)
    config = tiny_config({"model": "resnet_cifar", "num_train_steps": num_steps})
    state = loop.train_and_evaluate(config, workdir)
    np.savez(os.path.join(workdir, f"params_{process_id}.npz"), **flat_params(state.params))
    jax.distributed.shutdown()


if __name__ == "__main__":
    two_process_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:]))
