"""Preemption: SIGTERM, and Orbax's multi-host preemption sync point.

The train loop asks `should_stop(step)` after every step; when it says so the
loop saves a checkpoint and returns, and rerunning the same command resumes.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging


class Preemption:
    """SIGTERM handler plus Orbax's multi-host preemption sync point.

    `should_stop(step)` is True on every process at the same step: a SIGTERM
    received by any process is shared through a small all-gather (only when
    there are several processes), and on TPU pods JAX's own preemption service
    answers through `manager.reached_preemption`.
    """

    def __init__(self, manager):
        self._manager = manager
        self._event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self._event.set()

    def should_stop(self, step: int) -> bool:
        stop = self._event.is_set()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop = bool(np.any(multihost_utils.process_allgather(np.array([stop]))))
        try:
            stop = stop or bool(self._manager.reached_preemption(step))
        except Exception:  # noqa: BLE001 - no preemption service on this platform
            pass
        return stop

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
