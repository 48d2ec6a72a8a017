"""When one process of a multi-process run stops: the others name it and exit.

Without this, a surviving process waits in a collective (forever with gloo,
NCCL or a TPU all-reduce) or in JAX's shutdown barrier until JAX's heartbeat
timeout aborts it with a C++ message (jaxlib 0.10.2 has no usable Python hook
for it: `missed_heartbeat_callback` ends in std::bad_cast). Here a thread of
every process writes a beat count under its key in JAX's coordination service
(the key-value store jax.distributed.initialize() starts in process 0) and
reads everyone's (`PeerWatchdog`). A peer silent for the timeout, a peer that
wrote FAILED, or a coordination service that does not answer for the timeout
ends this process with exit code 1 and one line naming what stopped and the
step a rerun resumes from (`start`). It watches liveness, not progress: a peer
that waits in a long collective or compiles still beats.

  watchdog = peers.start(workdir, timeout=60)  # after jax.distributed.initialize()
  ... train ...
  watchdog.stop(peers.FINISHED)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping

from absl import logging

# JAX's coordination service declares a process dead between 1/2 and 1 times
# its heartbeat timeout after its last heartbeat (measured with jax 0.10.2),
# then aborts every other process. At 3 times the watchdog's timeout, the
# watchdog always speaks first; JAX's abort stays as the backstop (for
# instance when process 0, which hosts the service, is killed: the others
# then abort at once with JAX's "leader task died" message).
JAX_HEARTBEAT_FACTOR = 3

# Key in JAX's coordination service: PEER_KEY + process index holds a beat
# count while the process runs, then FINISHED or FAILED.
PEER_KEY = "micle_jax/peer/"
FINISHED = "finished"
FAILED = "failed"


class PeerLiveness:
    """Which peer has stopped, from successive reads of every process's key.

    A peer is stopped when its value has not changed for `timeout` seconds
    (killed, crashed, hung, or cut off), or at once when it wrote FAILED. A
    FINISHED peer is left alone: processes finish at different times.
    """

    def __init__(self, process_index: int, process_count: int, timeout: float, now: float):
        self.process_count = process_count
        self.timeout = timeout
        self._seen = {k: (None, now) for k in range(process_count) if k != process_index}

    def observe(self, values: Mapping[int, str], now: float) -> str | None:
        """What stopped (a sentence naming the process), or None while every peer lives.

        Args:
          values: {process index: its key's value}; a process that has not
            written yet is missing.
          now: the time of the read in seconds (time.monotonic()).
        """
        for k, (last, since) in list(self._seen.items()):
            value = values.get(k)
            name = f"process {k} of {self.process_count}"
            if value == FINISHED:
                del self._seen[k]
            elif value == FAILED:
                return f"{name} exited with an error (its log says which)"
            elif value != last:
                self._seen[k] = (value, now)
            elif now - since > self.timeout:
                return (
                    f"{name} stopped responding: no sign of life for {now - since:.0f} s "
                    "(killed, crashed, hung, or its host is unreachable; its own log may say which)"
                )
        return None


class PeerWatchdog:
    """A thread that calls `on_stopped(sentence)` when another process of the run stops.

    Every `interval` seconds (a tenth of `timeout`, at most 1 s) it writes a
    beat under this process's key and reads every key (`PeerLiveness`). The
    RPCs run in a helper thread, so that a coordination service that hangs
    is timed out too.
    """

    def __init__(
        self,
        client,
        process_index: int,
        process_count: int,
        timeout: float,
        on_stopped: Callable[[str], None],
    ):
        """Args: client: JAX's DistributedRuntimeClient (key_value_set, key_value_dir_get)."""
        self.client = client
        self.process_index = process_index
        self.timeout = timeout
        self.interval = min(1.0, timeout / 10)
        self._liveness = PeerLiveness(process_index, process_count, timeout, time.monotonic())
        self._on_stopped = on_stopped
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="peer_watchdog", daemon=True)

    def start(self) -> PeerWatchdog:
        self._thread.start()
        return self

    def stop(self, state: str) -> None:
        """Stops watching and tells the others this process is FINISHED or FAILED."""
        with self._lock:
            self._stop.set()
        try:
            _call_with_timeout(self._write, state, timeout=self.timeout)
        except Exception as e:  # noqa: BLE001 - the others then time this process out
            logging.warning("could not tell the other processes that this one %s: %s", state, e)

    def fail(self) -> None:
        """Ends this process after an error, with exit code 1.

        The error may come from a peer that stopped (a collective fails:
        gloo's "Connection reset by peer" surfaces as a ValueError or a
        JaxRuntimeError): the watchdog is given its timeout to name that peer
        (`on_stopped` then ends the process). If none stopped, the error is
        this process's own: it tells the others (FAILED) and exits.
        """
        logging.info("waiting up to %.0f s to see whether another process stopped", self.timeout)
        self._thread.join(self.timeout + 2 * self.interval)
        self.stop(FAILED)
        self.exit(1)

    def exit(self, code: int) -> None:
        """Ends this process now, without JAX's shutdown barrier.

        That barrier would wait for every process, a stopped one too, until
        JAX's heartbeat timeout aborts it. Process 0 hosts the coordination
        service: it lingers two beats first, so that the others read its
        FAILED (and name it) before the service goes.
        """
        if self.process_index == 0:
            time.sleep(2 * self.interval)
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _write(self, value: str) -> None:
        self.client.key_value_set(f"{PEER_KEY}{self.process_index}", value, allow_overwrite=True)

    def _exchange(self, beat: int) -> dict[int, str]:
        self._write(str(beat))
        return {int(k[len(PEER_KEY) :]): v for k, v in self.client.key_value_dir_get(PEER_KEY)}

    def _run(self) -> None:
        answered, beat = time.monotonic(), 0
        while not self._stop.wait(self.interval):
            beat += 1
            try:
                left = answered + self.timeout - time.monotonic()
                values = _call_with_timeout(self._exchange, beat, timeout=max(0.0, left))
            except Exception as e:  # noqa: BLE001 - refused or timed out: retried until the timeout
                if time.monotonic() - answered < self.timeout:
                    continue
                error = "" if isinstance(e, TimeoutError) else f" ({e})"
                verdict = (
                    f"JAX's coordination service (in process 0) did not answer for "
                    f"{self.timeout:.0f} s{error}: process 0 stopped or its host is unreachable"
                )
            else:
                answered = time.monotonic()
                verdict = self._liveness.observe(values, answered)
            if verdict is not None:
                with self._lock:  # held: a `stop` now waits for the exit instead
                    if not self._stop.is_set():
                        self._on_stopped(verdict)
                return


def _call_with_timeout(fn: Callable, arg, timeout: float):
    """fn(arg) in a daemon thread (one that hangs does not hold up the exit); TimeoutError."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn(arg)
        except Exception as e:  # noqa: BLE001 - re-raised in the caller
            outcome["error"] = e

    thread = threading.Thread(target=target, name="peer_rpc", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError("no answer")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def last_checkpoint_step(workdir: str) -> int | None:
    """The step of the workdir's last complete checkpoint (what a rerun resumes from), or None."""
    from micle_jax import checkpoint

    try:
        return int(checkpoint.resolve(workdir).parent.name)
    except Exception:  # noqa: BLE001 - only for the message: none found, or unreadable
        return None


def stopped_message(what: str, process_index: int, step: int | None) -> str:
    """The line a surviving process ends with: what stopped, and how to resume."""
    resume = (
        f"the run can be resumed from the last checkpoint at step {step} by rerunning the same "
        "command on every process"
        if step is not None
        else "no checkpoint was saved yet: rerunning the same command starts the run again"
    )
    return f"{what}. Stopping process {process_index} too; {resume}."


def start(workdir: str, timeout: float) -> PeerWatchdog:
    """Starts this process's watchdog (after jax.distributed.initialize()).

    When a peer stops, it logs `stopped_message`, writes it as the run's
    status 'failed' (process 0 writes the status) and exits with code 1.
    """
    import jax
    from jax._src import distributed  # the client, as Orbax's multihost module reads it

    from micle_jax import rundir

    def on_stopped(what: str) -> None:
        try:
            step = last_checkpoint_step(workdir)
            message = stopped_message(what, jax.process_index(), step)
            logging.error("%s", message)
            print(f"micle_jax: error: {message}", file=sys.stderr)
            rundir.write_status(workdir, "failed", step=step, error=message)
        except Exception as e:  # noqa: BLE001 - whatever happens, the process must end
            logging.warning("while stopping: %s", e)
        finally:
            watchdog.exit(1)

    watchdog = PeerWatchdog(
        distributed.global_state.client,
        jax.process_index(),
        jax.process_count(),
        timeout,
        on_stopped,
    )
    return watchdog.start()
