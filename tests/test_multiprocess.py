"""Two local processes (gloo CPU collectives) run the trainer like one process.

They do not give bit-identical parameters to one process with 8 devices: each
process draws its own augmentation seeds (seed, process, element) and reads
its own share of the cases, so the batches differ. The sharded update itself
is checked against one device in tests/test_sharding.py.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from micle_jax import checkpoint
from micle_jax.trainers import harness

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "--config=tests/fixtures/tiny_pretrain.py:steps=4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, devices_per_process, extra=()):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
    }
    cmd = [sys.executable, "-m", "micle_jax.main", CONFIG, f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_two_processes_train_and_checkpoint_like_one(tmp_path):
    one = launch(tmp_path / "one", 8)
    out, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out[-3000:]

    port = free_port()
    procs = [
        launch(
            tmp_path / "two",
            4,
            (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "Process 1 of 2" in outs[1]
    assert harness.read_status(str(tmp_path / "two"))["status"] == "finished"

    assert harness.read_status(str(tmp_path / "two"))["step"] == 4
    a = checkpoint.load_variables(str(tmp_path / "one"))
    b = checkpoint.load_variables(str(tmp_path / "two"))  # a checkpoint of 2 processes
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(b))
    # Both trained from the same initialisation for the same number of steps.
    sizes = jax.tree.map(lambda x, y: float(np.linalg.norm(x - y)), a["params"], b["params"])
    assert 0 < max(jax.tree.leaves(sizes)) < 10
