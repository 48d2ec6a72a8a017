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

from micle_jax import checkpoint, rundir

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
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:  # a timeout or a failed peer must not leave the other process running
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
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


def param_distance(a: dict, b: dict) -> float:
    """Euclidean distance between two parameter trees, all arrays flattened into one vector."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in pairs)))


def check_trained_like_one(one, two, other_seed) -> None:
    """Workdir `two` (2 processes) is a finished 4-step run like `one` (1 process).

    Its checkpoint has the 1-process tree, finite; its weights differ from the
    1-process run's (today's behaviour: other augmentation seeds and case shares;
    bit-equality is a future issue, then this becomes == 0) but by much less than
    `other_seed` (1 process, another seed) differs (measured 15.6 vs 51.6, ratio
    0.30; bound 0.5): same initialisation, same number of updates, same kind of
    batches. Does not check: equal batches or equal weights (see the module
    docstring; the sharded update itself is checked against one device in
    tests/test_sharding.py).
    """
    status = rundir.read_status(str(two))
    assert status["status"] == "finished" and status["step"] == 4, status
    a = checkpoint.load_variables(str(one))
    b = checkpoint.load_variables(str(two))  # a checkpoint of 2 processes
    c = checkpoint.load_variables(str(other_seed))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(b))
    two_vs_one = param_distance(a["params"], b["params"])
    seed_vs_seed = param_distance(a["params"], c["params"])
    assert 0 < two_vs_one < 0.5 * seed_vs_seed, (
        f"distance 2 processes vs 1: {two_vs_one:.2f}; seed 1 vs seed 0: {seed_vs_seed:.2f}"
    )


@pytest.mark.slow
def test_two_processes_train_and_checkpoint_like_one(tmp_path):
    """2 processes x 4 devices train one run, closer to 1 process than another seed is."""
    one = launch(tmp_path / "one", 8)
    other_seed = launch(tmp_path / "seed1", 8, ("--config.seed=1",))
    for run in (one, other_seed):
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-3000:]
    outs = launch_two(tmp_path / "two")
    assert "Process 1 of 2" in outs[1]
    check_trained_like_one(tmp_path / "one", tmp_path / "two", tmp_path / "seed1")
