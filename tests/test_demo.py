"""A shortened `make demo`: the sweep and the report, end to end on the embedded data."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from micle_jax import report

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_demo_end_to_end(tmp_path):
    root = tmp_path / "demo"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    sweep = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.sweep",
            "--sweep=configs/sweeps/demo.py:pretrain_steps=4,finetune_steps=4,fractions=0.5",
            f"--root={root}",
            "--executor=local",
            "--parallel=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert "5/5" in sweep.stdout
    # MICLe on the pool really built pairs from two images of one patient.
    log = (root / "pretrain_micle" / "log.txt").read_text()
    assert "multi_instance_fraction" in log
    results = json.loads((root / "finetune_micle_f0.5_s0" / "results.json").read_text())
    test_acc = [r for r in results["results"] if r["split"] == "test" and r["metric"] == "accuracy"]
    assert test_acc and all(
        0.0 <= r["ci_low"] <= r["value"] <= r["ci_high"] <= 1.0 for r in test_acc
    )

    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "micle_jax.report",
            f"--root={root}",
            "--show=split=test,checkpoint=best,metric=accuracy",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    for method in ("scratch", "simclr", "micle"):
        assert f"| {method} |" in shown.stdout
    assert (root / "report" / "results.md").exists()
    # One label fraction: a table but no label-efficiency curve to draw.
    assert (root / "report" / "results.csv").exists()


def test_select_rows_filters_on_every_pair():
    rows = [
        dict(split="test", metric="accuracy", mean=0.5),
        dict(split="validation", metric="accuracy", mean=0.6),
        dict(split="test", metric="auc_mean", mean=0.7),
    ]
    assert report.select_rows(rows, "split=test,metric=accuracy") == [rows[0]]
    assert report.select_rows(rows, "") == rows
    with pytest.raises(ValueError, match="expected key=value"):
        report.select_rows(rows, "split")
