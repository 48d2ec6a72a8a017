"""Local processes of `python -m micle_jax.main` for tests (gloo CPU collectives).

Each process gets `devices` fake CPU devices (XLA_FLAGS); several processes
share one coordinator on a free local port.
"""

import concurrent.futures
import os
import pathlib
import socket
import subprocess
import sys

from conftest import FAST_COMPILE_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "--config=tests/fixtures/tiny_pretrain.py:steps=4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, devices_per_process, extra=(), config=CONFIG, persistent_cache=True):
    """One process; `persistent_cache=False` turns the tests' persistent XLA cache off.

    Only process 0 of a multi-process run writes that cache, and a rerun's
    process 0 then loads its step in seconds while the others compile for a
    minute on a loaded machine, past gloo's fixed 30 s connection deadline; so
    every process of a multi-process run compiles.
    """
    # The tiny test network's steps run in milliseconds; compiling them takes each
    # process most of its time: the suite's fast-compile flags (tests/conftest.py).
    # Every process of a comparison runs with the same flags.
    flags = f"--xla_force_host_platform_device_count={devices_per_process} {FAST_COMPILE_FLAGS}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    if not persistent_cache:
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    cmd = [sys.executable, "-m", "micle_jax.main", config, f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def start_many(workdir, num_processes, devices, extra=(), config=CONFIG, port=None):
    """Starts `num_processes` processes of `devices` devices on one coordinator; the Popens."""
    port = port or free_port()
    return [
        launch(
            workdir,
            devices,
            (
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={num_processes}",
                f"--process_id={i}",
                *extra,
            ),
            config,
            persistent_cache=False,
        )
        for i in range(num_processes)
    ]


def collect(procs, timeout=600) -> list[concurrent.futures.Future]:
    """Reads the processes' outputs concurrently; futures of their whole outputs.

    Read one after the other, a process whose pipe is full (64 KiB of logs)
    blocks, and its peers with it in the next collective.
    """
    pool = concurrent.futures.ThreadPoolExecutor(len(procs))
    futures = [pool.submit(lambda p: p.communicate(timeout=timeout)[0], p) for p in procs]
    pool.shutdown(wait=False)
    return futures


def kill_all(procs) -> None:
    """Kills the processes still running (a timeout or a failed peer must not leave them)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def launch_many(workdir, num_processes, devices, extra=(), config=CONFIG, port=None):
    """`num_processes` processes of `devices` devices on one coordinator; their outputs.

    Asserts that every process exits with code 0.
    """
    procs = start_many(workdir, num_processes, devices, extra, config, port)
    try:
        outs = [f.result() for f in collect(procs)]
    finally:
        kill_all(procs)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def run_one(workdir, devices, extra=(), config=CONFIG) -> str:
    """One process of `devices` devices; its output."""
    proc = launch(workdir, devices, extra, config)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out
