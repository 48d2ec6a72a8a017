"""Local processes (gloo CPU collectives) run the trainer like one process.

Training: with an in-memory source the data stream is global (every process
holds the split and takes its slice of each global batch, augmentation keyed
on the global example index: micle_jax/data/stream/batches.py), so 1 process
x 4 devices, 2 x 2 and 2 x 1 train the same run: the same losses and
parameters up to float32 reduction order, and a checkpoint of one topology
resumes on another. Evaluation has no randomness: two processes, each
evaluating its share and gathering the predictions, write the results of one.
"""

import json
import re
import shutil

import jax
import numpy as np
import pytest
from multiprocess_util import launch_many, run_one

from micle_jax import checkpoint, rundir

FINETUNE = "--config=tests/fixtures/tiny_finetune.py"


def logged_losses(out: str) -> dict[int, float]:
    """{step: loss} of the metric lines ('[2] ... loss=8.50033, ...') in a run's output."""
    found = {}
    for step, loss in re.findall(r"\[(\d+)\] .*?\bloss=([0-9.eE+-]+)", out):
        found[int(step)] = float(loss)
    return found


def assert_same_losses(a: dict[int, float], b: dict[int, float]) -> None:
    assert a and a.keys() == b.keys(), (a, b)
    for step in a:
        np.testing.assert_allclose(b[step], a[step], rtol=1e-4, err_msg=f"loss at step {step}")


# Relative distance over all parameters below which two runs are the same run.
# Measured for 2 x 2 vs 1 x 4 from scratch after 4 LARS steps: 2.8e-5; a 1 x 4
# checkpoint of step 2 continued on another topology: 4.5e-3 (this tiny net
# amplifies float32 reduction-order differences strongly along some
# directions: one step from two step-2 states 1.4e-7 apart ended 1.4e-4 apart).
# Runs that are not the same: batches augmented per process 0.31, another
# seed 1.04 (|params| 49.7).
SAME_RUN_TOLERANCE = 1e-4
RESUME_TOLERANCE = 0.02


def assert_same_run(
    a, b, out_a: str | None = None, out_b: str | None = None, tolerance=SAME_RUN_TOLERANCE
) -> None:
    """Workdirs a and b hold the same finished run: every parameter (and the losses logged
    in out_a and out_b, when given).

    Tolerance: float32 reduction order (a sum over 4 devices or over 2 x 2
    differs in its last bits, and 4 updates carry that along): a relative
    distance of `tolerance` over all parameters, 1e-4 on each logged loss.
    """
    for workdir in (a, b):
        status = rundir.read_status(str(workdir))
        assert status["status"] == "finished", status
    if out_a is not None:
        assert_same_losses(logged_losses(out_a), logged_losses(out_b))
    va, vb = checkpoint.load_variables(str(a)), checkpoint.load_variables(str(b))
    assert jax.tree.structure(va) == jax.tree.structure(vb)
    for collection in ("params", "batch_stats"):
        distance = relative_distance(va[collection], vb[collection])
        assert distance < tolerance, f"{collection}: relative distance {distance:.2e}"


def relative_distance(a: dict, b: dict) -> float:
    """|a - b| / |a| over all arrays of two trees flattened into one vector each."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    diff = sum(float(np.sum((np.float64(x) - y) ** 2)) for x, y in pairs)
    norm = sum(float(np.sum(np.float64(x) ** 2)) for x, _ in pairs)
    return float(np.sqrt(diff / norm))


@pytest.mark.slow
def test_topologies_train_the_same_run_and_resume_each_other(tmp_path):
    """1 x 4 devices and 2 processes x 2 pre-train the same 4 steps; 2 x 1 resumes them.

    The step-2 checkpoint of the 1-process run resumes on 2 processes of 1
    device, half the devices it was written on, and ends where the
    uninterrupted run did (the third topology; that every topology reads the
    same global batches is tests/test_pipeline.py's
    test_in_memory_streams_are_the_same_on_any_process_count).
    """
    one = run_one(tmp_path / "one", 4)
    two = launch_many(tmp_path / "two", 2, 2)
    assert "Process 1 of 2" in two[1]
    # On one CPU machine (session 7) these two ended 4.5e-3 apart, deterministically,
    # where the previous one measured 2.8e-5: the reduction order is the CPU's.
    # RESUME_TOLERANCE still fails per-process augmentation (0.31) and another seed (1.04).
    assert_same_run(tmp_path / "one", tmp_path / "two", one, two[0], RESUME_TOLERANCE)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "one", resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    outs = launch_many(resumed, 2, 1)
    assert "Resumed from" in outs[0]
    after_resume = {k: v for k, v in logged_losses(one).items() if k > 2}
    assert_same_losses(after_resume, logged_losses(outs[0]))
    assert_same_run(tmp_path / "one", resumed, tolerance=RESUME_TOLERANCE)


@pytest.mark.slow
def test_topologies_fine_tune_and_evaluate_the_same(tmp_path):
    """Fine-tuning (supervised stream, evaluations) on 1 x 4 and 2 x 2: the same run.

    Evaluating its final checkpoint on 2 processes (each its share, predictions
    gathered) writes the results that 1 process wrote for it at the end of
    training: the same values and the same (seeded) bootstrap intervals.
    """
    one = run_one(tmp_path / "one", 4, config=FINETUNE)
    two = launch_many(tmp_path / "two", 2, 2, config=FINETUNE)
    assert_same_run(tmp_path / "one", tmp_path / "two", one, two[0])
    evaluate = ("--mode=eval", f"--checkpoint={tmp_path / 'one'}")
    launch_many(tmp_path / "eval_two", 2, 2, evaluate, FINETUNE)

    def rows(name, evals=("validation", "test")):
        with open(tmp_path / name / "results.json") as f:
            found = json.load(f)["results"]
        found = [r for r in found if r["checkpoint"] == "final" and r["eval"] in evals]
        return sorted(found, key=lambda r: (r["split"], r["metric"]))

    a, b = rows("one"), rows("eval_two")
    assert {r["split"] for r in a} == {"validation", "test"}
    assert [(r["split"], r["metric"]) for r in a] == [(r["split"], r["metric"]) for r in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x["value"], y["value"], atol=1e-6)
        np.testing.assert_allclose(
            [x["ci_low"], x["ci_high"]], [y["ci_low"], y["ci_high"]], atol=1e-6
        )
