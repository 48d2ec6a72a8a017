"""A shortened `make demo`: the sweep and the report, end to end on the embedded data."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS

from micle_jax import report
from micle_jax.data import records

REPO = pathlib.Path(__file__).resolve().parents[1]
HAM10000 = REPO / "data" / "demo" / "ham10000"
# The demo's pre-training and frozen-feature stages and its report, shortened; its
# fine-tuning stage is left out (finetune_datasets=): the sweep's fine-tuning runs,
# their report rows and their first logged loss are tests/test_gcs.py's and
# tests/test_finetune.py's, and the three runs cost this test half its time.
SWEEP = "pretrain_steps=4,fractions=0.5,finetune_datasets=,batch=64"
STEPS, BATCH = 4, 64


def _logged(log: str, name: str) -> list[float]:
    """Every value of measurement `name` in a run's log lines ('[step] a=1, name=0.25, ...')."""
    return [float(v) for v in re.findall(rf"\b{name}=([0-9.eE+-]+)", log)]


def multi_image_case_share(dataset: pathlib.Path, split: str = "train") -> float:
    """The share of a split's cases with two or more images (dataset_info.json's counts).

    A MICLe pair is one per case drawn, from two different images whenever the
    case has several, so this is the expected multi-instance pair fraction.
    """
    counts = records.load_info(str(dataset)).splits[split]["images_per_case"]
    return 1.0 - counts.get("1", 0) / sum(counts.values())


def check_pair_fractions(micle_log: str, simclr_log: str, expected: float) -> None:
    """The multi_instance_fraction values the two pre-training runs logged, one per step.

    MICLe: every step has pairs from two images, and over the run's STEPS x BATCH
    pairs the fraction is at least the issue's 0.2 and within 4 sampling standard
    deviations above `expected` (an all-multi-image count is not MICLe's either).
    SimCLR: none.
    """
    micle = _logged(micle_log, "multi_instance_fraction")
    simclr = _logged(simclr_log, "multi_instance_fraction")
    assert len(micle) == STEPS and min(micle) > 0.0, micle
    spread = math.sqrt(expected * (1 - expected) / (STEPS * BATCH))
    fraction = float(np.mean(micle))
    assert 0.2 <= fraction <= expected + 4 * spread, (fraction, expected, micle)
    assert simclr and max(simclr) == 0.0, simclr


@pytest.mark.slow
def test_short_demo_end_to_end(tmp_path):
    root = tmp_path / "demo"
    # The demo's runs execute more than they compile: XLA's default optimisation.
    flags = os.environ["XLA_FLAGS"].replace(FAST_COMPILE_FLAGS, "")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    sweep = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.sweep",
            f"--sweep=configs/sweeps/demo.py:{SWEEP}",
            f"--root={root}",
            "--executor=local",
            "--parallel=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert "5/5" in sweep.stdout
    # MICLe on HAM10000 builds at least 20% of its pairs from two images of one
    # lesion (1,326 of the 5,139 training lesions have several: 0.258); SimCLR none.
    check_pair_fractions(
        (root / "pretrain_ham10000_micle_s0" / "log.txt").read_text(),
        (root / "pretrain_ham10000_simclr_s0" / "log.txt").read_text(),
        multi_image_case_share(HAM10000),
    )
    # The frozen-feature protocols report both splits at the label fraction.
    features = json.loads((root / "features_ham10000_micle_s0" / "results.json").read_text())
    tags = {(r["protocol"], r["label_fraction"], r["split"]) for r in features["results"]}
    assert tags == {(p, 0.5, s) for p in ("linear", "knn") for s in ("validation", "test")}

    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "micle_jax.report",
            f"--root={root}",
            "--show=split=test,checkpoint=best|frozen,metric=balanced_accuracy",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    table = [line for line in shown.stdout.splitlines() if line.startswith("| ")][1:]
    arms = {tuple(cell.strip() for cell in line.split("|")[1:3]) for line in table}
    assert arms == {
        ("random", "linear"),
        ("random", "knn"),
        ("simclr", "linear"),
        ("simclr", "knn"),
        ("micle", "linear"),
        ("micle", "knn"),
    }, shown.stdout
    with open(root / "report" / "results.csv") as f:
        header = f.readline().strip().split(",")
    for column in REQUIRED_COLUMNS:
        assert column in header, (column, header)


REQUIRED_COLUMNS = (
    "method",
    "protocol",
    "dataset",
    "label_fraction",
    "split",
    "checkpoint",
    "metric",
    "n",
    "mean",
    "ci_low",
    "ci_high",
)


def _log_lines(fractions: list[float]) -> str:
    return "".join(
        f"I1 [{step}] contrastive_acc=0.1, multi_instance_fraction={f}, loss=4.2\n"
        for step, f in enumerate(fractions, 1)
    )


def test_pair_fraction_check_reads_the_logged_values():
    """check_pair_fractions (the demo's MICLe check) on logs written here, in seconds."""
    expected = multi_image_case_share(HAM10000)
    assert 0.25 < expected < 0.27  # 1,326 of 5,139 lesions
    simclr = _log_lines([0.0] * STEPS)
    check_pair_fractions(_log_lines([0.25, 0.3125, 0.234375, 0.28125]), simclr, expected)
    # The measurement is named but MICLe built every pair from one image: a failure.
    with pytest.raises(AssertionError, match="0.0"):
        check_pair_fractions(_log_lines([0.0] * STEPS), simclr, expected)
    with pytest.raises(AssertionError):  # too few from two images on average
        check_pair_fractions(_log_lines([0.15, 0.2, 0.1875, 0.171875]), simclr, expected)
    with pytest.raises(AssertionError):  # every pair counted as multi-instance
        check_pair_fractions(_log_lines([1.0] * STEPS), simclr, expected)
    with pytest.raises(AssertionError):  # SimCLR must not pair two images
        check_pair_fractions(_log_lines([0.25] * STEPS), _log_lines([0.25] * STEPS), expected)


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
