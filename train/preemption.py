"""Stopping on request: SIGTERM (preemption) or SIGINT (Ctrl-C, Colab's interrupt button).

The training loop asks :meth:`StopRequests.requested` after every step; when it says yes, the loop
saves a checkpoint, waits for it to be written and returns, so the process exits 0 and the same
command resumes. A second SIGINT interrupts at once (Python's ``KeyboardInterrupt``).

In a multi-process run a signal reaches one process only, so the processes must agree on the step
at which they all stop: there the loop relies on JAX's preemption service instead (started by
``jax.distributed.initialize()``; it catches SIGTERM and picks a common step,
``multihost_utils.reached_preemption_sync_point``), and no Python handler is installed.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager that turns SIGTERM and SIGINT into a request to stop after the current step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None  # the signal that asked to stop, once one did
        self._previous_handlers: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name} received: saving a checkpoint after the current step, then exiting "
            "(Ctrl-C again to stop without saving).",
            flush=True,
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopRequests:
        # Handlers can only be installed from the main thread (not, e.g., from a notebook's worker).
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous_handlers = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step``. Call it after every step, on every process."""
        if jax.process_count() > 1 and self.signal_name is None:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = "preemption notice"
            except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
                pass
        return self.signal_name is not None
