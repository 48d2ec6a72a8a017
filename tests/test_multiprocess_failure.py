"""One process of a multi-process run killed: the others exit in bounded time, a rerun resumes.

micle_jax/peers.py: every process beats in JAX's coordination service; a
peer silent for --heartbeat_timeout_seconds makes the others exit with code
1 (instead of waiting in a gloo collective, or in JAX's shutdown barrier
until JAX's own heartbeat timeout aborts them). Orbax renames a checkpoint's
folder only when it is complete, so the checkpoint being written at the kill
is never the one resumed from.
"""

import time

import jax
import pytest
import tensorflow as tf
from multiprocess_util import collect, free_port, kill_all, launch_many, start_many

from micle_jax import checkpoint, main, peers, rundir

TIMEOUT = 10  # --heartbeat_timeout_seconds of the test runs
# The survivor names the silent process after TIMEOUT s (one beat later at
# most), lingers 2 beats and exits with code 1: 13.3 s measured on a loaded
# 2-core machine. Without the watchdog, JAX's heartbeat (3 x TIMEOUT) aborts
# it (SIGABRT) between 15 and 30 s after the kill; with no timeouts passed
# at all, after 100 s or never.
EXIT_BOUND = TIMEOUT + 8
# A checkpoint every 2 steps: the kill comes during the save of step 4 at the earliest,
# and the rerun trains what is left of the 10 steps.
STEPS = 10
CONFIG = f"--config=tests/fixtures/tiny_pretrain.py:steps={STEPS}"  # a checkpoint every 2 steps
EXTRA = (f"--heartbeat_timeout_seconds={TIMEOUT}", "--config.log_every_steps=1")
UNFINISHED = ".orbax-checkpoint-tmp"  # Orbax's suffix of a checkpoint folder being written


def checkpoint_folders(workdir) -> tuple[list[int], list[int]]:
    """(complete steps, steps being written) among WORKDIR/checkpoints' folders."""
    folder = workdir / rundir.CHECKPOINT_DIR
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    complete = sorted(int(n) for n in names if n.isdigit())
    unfinished = sorted(int(n.split(".")[0]) for n in names if UNFINISHED in n)
    return complete, unfinished


def logged_steps(paths) -> list[int]:
    """The steps of the 'loss' scalars in TensorBoard event files."""
    steps = set()
    for path in paths:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            if any(v.tag == "loss" for v in event.summary.value):
                steps.add(event.step)
    return sorted(steps)


def kill_during_a_save(procs, workdir, deadline_s=600) -> None:
    """SIGKILLs process 1 once a checkpoint is complete and the next is being written."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        complete, unfinished = checkpoint_folders(workdir)
        if complete and unfinished and unfinished[-1] > complete[-1]:
            procs[1].kill()
            return
        assert all(p.poll() is None for p in procs), "a process exited before the kill"
        time.sleep(0.01)
    raise AssertionError("no checkpoint was being written after a complete one")


@pytest.mark.slow
def test_killed_process_stops_the_other_and_a_rerun_resumes(tmp_path):
    workdir, port = tmp_path / "run", free_port()
    procs = start_many(workdir, 2, 1, EXTRA, CONFIG, port)
    outputs = collect(procs)
    try:
        kill_during_a_save(procs, workdir)
        killed = time.monotonic()
        out = outputs[0].result(timeout=3 * TIMEOUT + 60)
        exited = time.monotonic() - killed
    finally:
        kill_all(procs)
    assert procs[0].returncode == 1, out[-3000:]
    assert exited < EXIT_BOUND, f"the survivor exited {exited:.1f} s after the kill"

    # The checkpoint being written at the kill is not the latest one.
    complete, unfinished = checkpoint_folders(workdir)
    assert unfinished and unfinished[-1] > complete[-1], (complete, unfinished)
    manager = checkpoint.make_manager(str(workdir), keep=100, async_save=False)
    latest = manager.latest_step()
    manager.close()
    assert latest == complete[-1] == int(checkpoint.resolve(str(workdir)).parent.name)
    status = rundir.read_status(str(workdir))
    assert (status["status"], status["step"]) == ("failed", latest), status

    # The same command again: resumes after the latest complete checkpoint, finishes.
    before = set(workdir.glob("events.out.tfevents*"))
    launch_many(workdir, 2, 1, EXTRA, CONFIG, port)
    status = rundir.read_status(str(workdir))
    assert (status["status"], status["step"]) == ("finished", STEPS), status
    rerun = logged_steps(set(workdir.glob("events.out.tfevents*")) - before)
    assert rerun == list(range(latest + 1, STEPS + 1)), rerun
    assert checkpoint_folders(workdir)[0][-1] == STEPS


def test_cluster_runs_leave_the_addresses_to_jax(monkeypatch):
    """Under SLURM (or on a TPU pod) main passes no addresses: JAX reads the environment."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not main.initialize_distributed(None, None, None, 60, 300, 300)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert main.initialize_distributed(None, None, None, 60, 300, 300)
    assert calls == [
        {
            "coordinator_address": None,
            "num_processes": None,
            "process_id": None,
            "initialization_timeout": 300,
            "heartbeat_timeout_seconds": peers.JAX_HEARTBEAT_FACTOR * 60,
            "shutdown_timeout_seconds": 300,
        }
    ]
    # Explicit flags (local processes, the SLURM launcher's local executor) still win.
    monkeypatch.delenv("SLURM_NTASKS")
    assert main.initialize_distributed("127.0.0.1:1234", 2, 1, 10, 20, 30)
    assert calls[-1]["coordinator_address"] == "127.0.0.1:1234"
    assert (calls[-1]["num_processes"], calls[-1]["process_id"]) == (2, 1)
