"""A shortened `make demo`: the sweep and the report, end to end on the embedded data."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from micle_jax import report

REPO = pathlib.Path(__file__).resolve().parents[1]


def _logged(log: str, name: str) -> list[float]:
    """Every value of measurement `name` in a run's log lines ('[step] a=1, name=0.25, ...')."""
    return [float(v) for v in re.findall(rf"\b{name}=([0-9.eE+-]+)", log)]


@pytest.mark.slow
def test_short_demo_end_to_end(tmp_path):
    root = tmp_path / "demo"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    sweep = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.sweep",
            "--sweep=configs/sweeps/demo.py:pretrain_steps=4,finetune_steps=4,fractions=0.5,"
            "finetune_fractions=0.5,lrs=0.4,batch=64",
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
    assert "8/8" in sweep.stdout
    # MICLe on HAM10000 builds at least 20% of its pairs from two images of one
    # lesion (1,326 of the 5,139 training lesions have several); SimCLR none.
    micle = _logged(
        (root / "pretrain_ham10000_micle_s0" / "log.txt").read_text(), "multi_instance_fraction"
    )
    simclr = _logged(
        (root / "pretrain_ham10000_simclr_s0" / "log.txt").read_text(), "multi_instance_fraction"
    )
    assert len(micle) == 4 and min(micle) >= 0.2, micle
    assert simclr and max(simclr) == 0.0, simclr
    # The frozen-feature protocols report both splits at the label fraction.
    features = json.loads((root / "features_ham10000_micle_s0" / "results.json").read_text())
    tags = {(r["protocol"], r["label_fraction"], r["split"]) for r in features["results"]}
    assert tags == {(p, 0.5, s) for p in ("linear", "knn") for s in ("validation", "test")}
    # Fine-tuning from MICLe reports its first logged loss and its protocol.
    finetune = json.loads(
        (root / "finetune_ham10000_micle_f0.5_lr0.4_s0" / "results.json").read_text()
    )
    assert {r["protocol"] for r in finetune["results"]} == {"finetune"}
    assert [r["metric"] for r in finetune["results"] if r["eval"] == "train"] == [
        "first_logged_loss"
    ]

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
        ("scratch", "finetune"),
        ("simclr", "finetune"),
        ("micle", "finetune"),
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
