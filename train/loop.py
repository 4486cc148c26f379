"""The training loop: one jitted, data-parallel step over every device, Orbax checkpoints, metrics.

Data flows one way: config -> mesh -> data set (``train.data``) -> model and train state
(``train.state``) -> jitted step (the task's loss, ``train.tasks``) -> metrics + checkpoints. Read
:func:`train_and_evaluate` first; :func:`train_step` and the task's evaluation step are the pure
functions it jits (bound to config values with ``functools.partial``, never closing over the config).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from tqdm import tqdm

from train import checkpoint, metrics, preemption, preflight, run_record, sharding, warm_start
from train.data import create_dataset, pipeline
from train.data.dataset import Dataset
from train.errors import InputError
from train.program import build
from train.state import TrainState


def evaluate(
    state: TrainState,
    *,
    p_eval_step: Callable[..., Any],
    finish: Callable[[list[Any]], dict[str, float]],
    batches: Iterable[Any],
    mesh: Mesh,
) -> dict[str, float]:
    """The task's results (``finish``) of ``p_eval_step``'s outputs over ``batches`` (an iterable of
    per-process batches)."""
    return finish(
        jax.device_get([p_eval_step(state, sharding.global_batch(batch, mesh)) for batch in batches])
    )


def summarize(
    history: list[dict[str, jax.Array]],
    last_step: int,
    *,
    config: ml_collections.ConfigDict,
    manager: ocp.CheckpointManager,
) -> dict[str, float]:
    """Means over the finite steps of the per-step metrics of steps ``last_step - len(history) + 1 ..
    last_step``, and ``skipped_steps``, the run's total of skipped updates.

    Raises FloatingPointError naming the first non-finite step (``nonfinite_policy='stop'``) or when more
    than ``max_skipped_steps`` updates were skipped (``'skip'``). Nothing after the last good checkpoint
    has been saved then: ``manager``'s latest step is still good.
    """
    history = jax.device_get(history)
    first_step = last_step - len(history) + 1
    bad_steps = [first_step + i for i, step_metrics in enumerate(history) if not step_metrics["finite"]]
    skipped_steps = int(history[-1]["skipped_steps"])
    if bad_steps and (config.nonfinite_policy == "stop" or skipped_steps > config.max_skipped_steps):
        manager.wait_until_finished()
        bad = history[bad_steps[0] - first_step]
        reason = (
            f"training diverged at step {bad_steps[0]} (loss {bad['loss']}, gradient norm "
            f"{bad['grad_norm']}, parameter norm {bad['param_norm']})"
            if config.nonfinite_policy == "stop"
            else f"{skipped_steps} updates skipped for non-finite values (max_skipped_steps="
            f"{config.max_skipped_steps}), the last at step {bad_steps[-1]}"
        )
        raise FloatingPointError(
            f"{reason}: stopped without saving. The last good checkpoint is step {manager.latest_step()} "
            f"in {manager.directory}; training resumes from it when restarted (e.g. with a lower "
            "--config.learning_rate)."
        )
    if bad_steps and jax.process_index() == 0:
        print(
            f"Skipped the updates of steps {bad_steps}: non-finite loss, gradients or parameters", flush=True
        )
    good = [step_metrics for step_metrics in history if step_metrics["finite"]] or history
    names = [name for name in history[0] if name not in ("finite", "skipped_steps")]
    means = {name: float(np.mean([m[name] for m in good])) for name in names}
    return {**means, "skipped_steps": skipped_steps}


def train_loop(
    config: ml_collections.ConfigDict,
    state: TrainState,
    train_iter: Iterator[Any],
    p_train_step: Callable[..., Any],
    evaluate_fn: Callable[[TrainState], dict[str, float]],
    *,
    num_steps: int,
    mesh: Mesh,
    manager: ocp.CheckpointManager,
    writer: metrics.MetricWriter,
    stop: preemption.StopRequests,
) -> TrainState:
    """Steps ``state.step + 1 .. num_steps``: log, checkpoint and evaluate at the configured intervals.

    Returns early, after saving a checkpoint of the last step, when ``stop`` (a
    :class:`preemption.StopRequests`) says so.
    """
    first_step = int(state.step)
    history = []  # per-step metrics, left on the devices until the next log
    interval_start = time.perf_counter()
    with tqdm(total=num_steps, initial=first_step, unit="step", disable=not writer.active) as bar:
        for step in range(first_step + 1, num_steps + 1):
            state, step_metrics = p_train_step(state, sharding.global_batch(next(train_iter), mesh))
            history.append(step_metrics)
            bar.update()
            stop_now = stop.requested(step)
            save_now = step % config.checkpoint_every_steps == 0 or step == num_steps or stop_now
            # The final evaluation is the caller's.
            evaluate_now = step % config.eval_every_steps == 0 and step < num_steps and not stop_now
            if step % config.log_every_steps and not save_now and not evaluate_now:
                continue
            record = summarize(history, step, config=config, manager=manager)  # waits for the steps
            record["images_per_sec"] = (
                len(history) * config.batch_size / (time.perf_counter() - interval_start)
            )
            writer.write(step, "train", record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", images_per_sec=f"{record['images_per_sec']:.0f}")
            history = []
            if save_now:
                checkpoint.save(manager, step, state, train_iter, wait=stop_now)
            if stop_now:
                return state
            if evaluate_now:
                writer.write(step, "eval", evaluate_fn(state))
            interval_start = time.perf_counter()
    return state


def dataset_record(config: ml_collections.ConfigDict, data: Dataset) -> dict[str, Any]:
    """What ``dataset.json`` keeps of the data set: enough to prepare and name new images."""
    return {
        "task": data.task,
        "dataset": config.dataset,
        "image_size": config.image_size,
        "num_classes": data.num_classes,
        "image_shape": list(data.image_shape),
        "class_names": list(data.class_names),
    }


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    eval_only: bool = False,
    data: Dataset | None = None,
) -> TrainState:
    """Train as ``config`` says, resuming from the latest checkpoint in ``workdir``; evaluate at the end.

    With ``eval_only``, evaluate the latest checkpoint without training. ``data`` replaces the data set
    named by ``config.dataset`` (any :class:`train.data.dataset.Dataset`). Returns the final state, or,
    when SIGTERM or SIGINT stopped the run early, the state of the checkpoint just saved (without
    the final evaluation). Every process runs this same function; only process 0 writes metrics and
    the progress bar.
    """
    start_time = time.perf_counter()
    preflight.check_config(config)
    if config.distributed:
        jax.distributed.initialize()
    if config.batch_size % jax.device_count():
        raise InputError(
            f"batch_size={config.batch_size} must be divisible by the number of devices, "
            f"{jax.device_count()} ({jax.local_device_count()} on each of {jax.process_count()} processes)"
        )
    mesh = sharding.make_mesh()
    # Under the mesh the fused attention kernels run on each device's share of the batch.
    with jax.set_mesh(mesh):
        return _train_and_evaluate_on(mesh, config, workdir, eval_only, data, start_time)


def _train_and_evaluate_on(
    mesh: Mesh,
    config: ml_collections.ConfigDict,
    workdir: str,
    eval_only: bool,
    data: Dataset | None,
    start_time: float,
) -> TrainState:
    """:func:`train_and_evaluate` once the mesh is made."""
    data = data or create_dataset(config)
    pipeline.check_dataset(data)
    program = build(config, data, mesh, steps_per_epoch=len(data.train) // config.batch_size)
    task, num_steps, abstract_state = program.task, program.num_steps, program.abstract_state
    assert task.finish is not None  # the task of a Dataset evaluates on its test records
    evaluate_fn = functools.partial(
        evaluate,
        p_eval_step=program.eval_step,
        finish=task.finish,
        batches=pipeline.test_batches(data, batch_size=config.batch_size, workers=config.data_workers),
        mesh=mesh,
    )

    if not eval_only:
        kept = min(len(checkpoint.saved_steps(workdir)), config.max_checkpoints_to_keep)
        preflight.check_workdir(
            workdir,
            checkpoint_bytes=preflight.state_bytes(abstract_state),
            checkpoints_to_write=config.max_checkpoints_to_keep + 1 - kept,  # + 1: the one being written
        )
    if jax.process_index() == 0:
        devices = f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
        action = "Evaluating" if eval_only else f"Training ({num_steps} steps)"
        print(
            f"{action} {config.model} on {config.dataset} ({len(data.train)} train / {len(data.test)} test "
            f"images, {data.num_classes} classes) on {devices}, workdir {workdir}",
            flush=True,
        )
    record = dataset_record(config, data)
    if jax.process_index() == 0:  # checked before the manager makes its folder in another run's workdir
        run_record.write_or_check(workdir, config, record, write=False)
    manager = checkpoint.create_manager(workdir, max_to_keep=config.max_checkpoints_to_keep)
    # Closing the manager waits for the asynchronous saves, also when training stops with an error.
    with manager, metrics.MetricWriter(workdir) as writer:
        if manager.latest_step() is not None:
            checkpoint.check_compatible(manager, abstract_state)
        if jax.process_index() == 0:
            run_record.write_or_check(workdir, config, record, write=not eval_only)
        if eval_only:
            if manager.latest_step() is None:
                raise InputError(f"--eval_only: no checkpoint in {manager.directory}: train first")
            state = checkpoint.restore(manager, abstract_state)
        else:
            with preemption.StopRequests() as stop:
                train_iter = pipeline.train_iterator(
                    data, batch_size=config.batch_size, seed=config.seed, workers=config.data_workers
                )
                if manager.latest_step() is None:
                    state = program.init()
                    if config.init_from:
                        state = warm_start.start_from(
                            state,
                            config.init_from,
                            jax.tree.map(lambda x: x.sharding, abstract_state),
                            verbose=writer.active,
                        )
                else:
                    state = checkpoint.restore(manager, abstract_state, train_iter)
                    if writer.active:
                        print(
                            f"Resuming from the checkpoint of step {int(state.step)} in {manager.directory}",
                            flush=True,  # before a kill can discard the buffer
                        )
                writer.forget_after(int(state.step))  # the records of steps that are about to be redone
                state = train_loop(
                    config,
                    state,
                    train_iter,
                    program.train_step,
                    evaluate_fn,
                    num_steps=num_steps,
                    mesh=mesh,
                    manager=manager,
                    writer=writer,
                    stop=stop,
                )
            if stop.signal_name:
                if writer.active:
                    print(
                        f"Stopped by {stop.signal_name} after step {int(state.step)}, checkpoint saved in "
                        f"{manager.directory}; run the same command to resume.",
                        flush=True,
                    )
                return state
        step = int(state.step)
        results = evaluate_fn(state)
        writer.write(step, "eval", results)
    if writer.active:
        print(
            f"Final test {task.headline(results)} on {len(data.test)} {config.dataset} test images "
            f"at step {step}, "
            f"{time.perf_counter() - start_time:.0f} s",
            flush=True,
        )
    return state
