"""The peer watchdog names a process that stopped, and only then (micle_jax/peers.py).

Against an in-memory stand-in for JAX's coordination service key-value
store; tests/test_multiprocess_failure.py kills a real process.
"""

import threading
import time

import pytest

from micle_jax import peers

TIMEOUT = 0.5  # seconds; the watchdog beats every 0.05 s


class FakeStore:
    """The two key-value calls the watchdog makes, shared by the 'processes' of a test."""

    def __init__(self):
        self.values = {}
        self.hang = threading.Event()  # set: every call blocks, as a stopped coordinator

    def key_value_set(self, key, value, allow_overwrite=False):
        while self.hang.is_set():
            time.sleep(0.01)
        assert allow_overwrite
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        while self.hang.is_set():
            time.sleep(0.01)
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def start(store, index, count, verdicts):
    return peers.PeerWatchdog(store, index, count, TIMEOUT, verdicts.append).start()


def wait_for(verdicts, seconds):
    deadline = time.monotonic() + seconds
    while not verdicts and time.monotonic() < deadline:
        time.sleep(0.01)
    return verdicts


def test_liveness_names_a_silent_peer_after_the_timeout_only():
    live = peers.PeerLiveness(process_index=0, process_count=3, timeout=10, now=0)
    assert live.observe({0: "1", 1: "1", 2: "1"}, now=1) is None
    assert live.observe({0: "9", 1: "2", 2: "1"}, now=10.5) is None  # 2: silent 9.5 s
    assert live.observe({0: "9", 1: "3", 2: "1"}, now=11.5).startswith("process 2 of 3 stopped")


def test_liveness_a_peer_that_never_wrote_is_timed_from_the_start():
    live = peers.PeerLiveness(process_index=1, process_count=2, timeout=10, now=0)
    assert live.observe({1: "1"}, now=9) is None
    assert live.observe({1: "2"}, now=10.5).startswith("process 0 of 2 stopped")


def test_liveness_finished_peers_are_left_alone_and_failed_ones_named_at_once():
    live = peers.PeerLiveness(process_index=0, process_count=3, timeout=10, now=0)
    assert live.observe({1: peers.FINISHED, 2: "1"}, now=1) is None
    assert live.observe({1: peers.FINISHED, 2: "2"}, now=100) is None
    failed = live.observe({2: peers.FAILED}, now=101)
    assert failed.startswith("process 2 of 3 exited with an error")


def test_watchdog_names_the_process_that_stopped_beating():
    store, verdicts = FakeStore(), []
    start(store, 0, 2, verdicts)
    stopped = start(store, 1, 2, [])
    time.sleep(3 * TIMEOUT)
    assert not verdicts  # both beat
    stopped._stop.set()  # as kill -9: no more beats, nothing written
    began = time.monotonic()
    assert wait_for(verdicts, 4 * TIMEOUT), "the silent process was not named"
    # The silence began at the last beat the watchdog saw, up to one beat
    # (0.05 s) before `began`.
    assert TIMEOUT - 0.05 <= time.monotonic() - began < TIMEOUT + 0.5
    assert verdicts[0].startswith("process 1 of 2 stopped responding")


def test_watchdog_lets_a_finished_process_go_and_names_a_failed_one_at_once():
    store, verdicts = FakeStore(), []
    start(store, 0, 3, verdicts)
    finished, failed = start(store, 1, 3, []), start(store, 2, 3, [])
    time.sleep(2 * TIMEOUT)
    finished.stop(peers.FINISHED)
    time.sleep(3 * TIMEOUT)
    assert not verdicts
    began = time.monotonic()
    failed.stop(peers.FAILED)
    assert wait_for(verdicts, TIMEOUT)
    assert time.monotonic() - began < TIMEOUT
    assert verdicts[0].startswith("process 2 of 3 exited with an error")


def test_watchdog_times_out_a_coordination_service_that_hangs():
    store, verdicts = FakeStore(), []
    start(store, 1, 2, verdicts)
    start(store, 0, 2, [])
    time.sleep(2 * TIMEOUT)
    store.hang.set()
    try:
        assert wait_for(verdicts, 4 * TIMEOUT), "a hanging coordination service was not noticed"
    finally:
        store.hang.clear()
    assert "coordination service (in process 0) did not answer" in verdicts[0]


def test_a_stopped_watchdog_says_nothing():
    store, verdicts = FakeStore(), []
    watchdog = start(store, 0, 2, verdicts)
    watchdog.stop(peers.FINISHED)
    time.sleep(3 * TIMEOUT)  # process 1 never beat
    assert not verdicts
    assert store.values[peers.PEER_KEY + "0"] == peers.FINISHED


@pytest.mark.parametrize(
    "step, resume", [(6, "resumed from the last checkpoint at step 6"), (None, "starts the run")]
)
def test_stopped_message_names_the_resume_step(tmp_path, step, resume):
    message = peers.stopped_message("process 1 of 2 stopped responding", 0, step)
    assert message.startswith("process 1 of 2 stopped responding. Stopping process 0 too;")
    assert resume in message


def test_last_checkpoint_step_skips_unfinished_checkpoints(tmp_path):
    assert peers.last_checkpoint_step(str(tmp_path)) is None
    for name in ("2/state", "4/state", "6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert peers.last_checkpoint_step(str(tmp_path)) == 4
