"""Two local processes (gloo CPU collectives) run the trainer like one process.

Training: they do not give bit-identical parameters to one process with 8
devices: each process draws its own augmentation seeds (seed, process,
element) and reads its own share of the cases, so the batches differ. The
sharded update itself is checked against one device in tests/test_sharding.py.
Evaluation has no randomness: two processes, each evaluating its share and
gathering the predictions, must write the results of one.
"""

import json
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
FINETUNE = "--config=tests/fixtures/tiny_finetune.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, devices_per_process, extra=(), config=CONFIG):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
    }
    cmd = [sys.executable, "-m", "micle_jax.main", config, f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def launch_two(workdir, extra=(), config=CONFIG):
    """Two processes of 4 devices each on one coordinator; returns their outputs."""
    port = free_port()
    procs = [
        launch(
            workdir,
            4,
            (
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *extra,
            ),
            config,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
    run = launch(tmp_path / "run", 8, config=FINETUNE)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-3000:]
    evaluate = ("--mode=eval", f"--checkpoint={tmp_path / 'run'}")
    one = launch(tmp_path / "eval_one", 8, evaluate, FINETUNE)
    out, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out[-3000:]
    launch_two(tmp_path / "eval_two", evaluate, FINETUNE)

    def rows(name):
        with open(tmp_path / name / "results.json") as f:
            return sorted(json.load(f)["results"], key=lambda r: (r["split"], r["metric"]))

    a, b = rows("eval_one"), rows("eval_two")
    assert {r["split"] for r in a} == {"validation", "test"}
    assert [(r["split"], r["metric"]) for r in a] == [(r["split"], r["metric"]) for r in b]
    for x, y in zip(a, b, strict=True):
        # Same predictions for the same images, gathered in the same case order:
        # the same value and the same (seeded) bootstrap interval.
        np.testing.assert_allclose(x["value"], y["value"], atol=1e-6)
        np.testing.assert_allclose(
            [x["ci_low"], x["ci_high"]], [y["ci_low"], y["ci_high"]], atol=1e-6
        )


@pytest.mark.slow
def test_two_processes_train_and_checkpoint_like_one(tmp_path):
    one = launch(tmp_path / "one", 8)
    out, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out[-3000:]

    outs = launch_two(tmp_path / "two")
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
