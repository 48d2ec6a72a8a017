"""Tests for micle_jax/report.py and micle_jax/report_plots.py on hand-made results files."""

import csv
import io
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from micle_jax import report

REPO = pathlib.Path(__file__).resolve().parents[1]

# t(0.975, df) quantiles, from tables: df=1 12.7062, df=2 4.3027.
T1, T2 = 12.706204736174694, 4.302652729749462


def _run(root, name, stage, params, results=None, status="finished", raw=None):
    workdir = root / name
    workdir.mkdir(parents=True)
    run_file = {"name": name, "stage": stage, "params": params, "command": ["x"]}
    (workdir / "sweep_run.json").write_text(json.dumps(run_file))
    (workdir / "run_status.json").write_text(json.dumps({"status": status}))
    if raw is not None:
        (workdir / "results.json").write_text(raw)
    elif results is not None:
        data = {"workdir": str(workdir), "config": {}, "results": results}
        (workdir / "results.json").write_text(json.dumps(data))


def _result(value, lo, hi, dataset="derm", eval_name="test", step=100):
    return dict(
        eval=eval_name,
        metric="accuracy",
        value=value,
        ci_low=lo,
        ci_high=hi,
        split="test",
        dataset=dataset,
        step=step,
        checkpoint="final",
    )


@pytest.fixture
def sweep_root(tmp_path):
    root = tmp_path / "sweep"
    _run(root, "pre_simclr", "pretrain", {"method": "simclr"})  # no results: not a problem
    for seed, v in enumerate([0.70, 0.72, 0.74]):
        _run(
            root,
            f"ft_simclr_f0.1_s{seed}",
            "finetune",
            {"method": "simclr", "label_fraction": 0.1, "seed": seed},
            [_result(v, v - 0.1, v + 0.1)],
        )
    for seed, (v, shifted) in enumerate([(0.80, 0.60), (0.84, 0.64)]):
        _run(
            root,
            f"ft_simclr_f1.0_s{seed}",
            "finetune",
            {"method": "simclr", "label_fraction": 1.0, "seed": seed},
            [_result(v, 0, 1), _result(shifted, 0, 1, "derm_shifted", "shifted")],
        )
    _run(
        root,
        "ft_micle_f0.1_s0",
        "finetune",
        {"method": "micle", "label_fraction": 0.1, "seed": 0},
        [_result(0.75, 0.70, 0.79)],
    )
    for seed, (v, shifted) in enumerate([(0.86, 0.70), (0.88, 0.72)]):
        # An older evaluation of the same metric: the latest step must win.
        _run(
            root,
            f"ft_micle_f1.0_s{seed}",
            "finetune",
            {"method": "micle", "label_fraction": 1.0, "seed": seed},
            [
                _result(0.1, 0, 1, step=50),
                _result(v, 0, 1),
                _result(shifted, 0, 1, "derm_shifted", "shifted"),
            ],
        )
    _run(
        root,
        "ft_supervised_f0.1_s0",
        "finetune",
        {"method": "supervised", "label_fraction": 0.1, "seed": 0},
        raw="{not json",
    )
    _run(
        root,
        "ft_supervised_f0.1_s1",
        "finetune",
        {"method": "supervised", "label_fraction": 0.1, "seed": 1},
        status="running",
    )
    return root


def _find(summary, **match):
    rows = [r for r in summary if all(r.get(k) == v for k, v in match.items())]
    assert len(rows) == 1, (match, rows)
    return rows[0]


def test_seed_interval_matches_scipy_t_interval():
    values = np.random.default_rng(0).normal(0.8, 0.03, size=5)
    mean, lo, hi, std, how = report.seed_interval(values, [0] * 5, [1] * 5)
    ref = scipy.stats.t.interval(0.95, df=4, loc=values.mean(), scale=scipy.stats.sem(values))
    np.testing.assert_allclose([mean, lo, hi], [values.mean(), *ref], rtol=1e-12)
    assert std == pytest.approx(values.std(ddof=1)) and how == "t over 5 seeds"
    # One run: its own bootstrap interval, the only one there is.
    assert report.seed_interval([0.5], [0.4], [0.55])[:3] == (0.5, 0.4, 0.55)


def test_report_means_and_intervals_by_hand(sweep_root, tmp_path):
    out = tmp_path / "out"
    result = report.write_report(str(sweep_root), str(out))
    summary = result["summary"]
    assert len(summary) == 6  # simclr x {0.1, 1.0} + micle x {0.1, 1.0} on derm, 2 shifted

    r = _find(summary, method="simclr", label_fraction=0.1, dataset="derm")
    # mean 0.72, std 0.02 over 3 seeds: 0.72 +- T2 * 0.02 / sqrt(3).
    half = T2 * 0.02 / math.sqrt(3)
    assert (r["n"], r["mean"]) == (3, pytest.approx(0.72))
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(0.72 - half), pytest.approx(0.72 + half))
    # Not the mean of the runs' bootstrap CIs, which would be (0.62, 0.82).
    assert r["ci_low"] == pytest.approx(0.67031725, abs=1e-8)

    r = _find(summary, method="simclr", label_fraction=1.0, dataset="derm")
    assert r["mean"] == pytest.approx(0.82)
    assert r["ci_high"] - r["mean"] == pytest.approx(T1 * 0.02)  # std/sqrt(2) = 0.02
    r = _find(summary, method="micle", label_fraction=1.0, dataset="derm")
    assert r["mean"] == pytest.approx(0.87) and r["values"] == "0.86 0.88"  # step 50 dropped
    r = _find(summary, method="micle", label_fraction=0.1)
    assert (r["n"], r["ci_low"], r["ci_high"]) == (1, 0.70, 0.79)
    assert r["ci_method"] == "bootstrap of the 1 run"
    r = _find(summary, method="micle", dataset="derm_shifted")
    assert (r["mean"], r["eval"]) == (pytest.approx(0.71), "shifted")

    problems = "\n".join(result["problems"])
    assert str(sweep_root / "ft_supervised_f0.1_s0" / "results.json") + ": unreadable" in problems
    assert (
        str(sweep_root / "ft_supervised_f0.1_s1" / "results.json") + ": missing (run running)"
        in problems
    )
    assert "pre_simclr" not in problems and len(result["problems"]) == 2


def test_report_writes_table_csv_and_plots(sweep_root, tmp_path):
    out = tmp_path / "out"
    result = report.write_report(str(sweep_root), str(out))
    names = sorted(pathlib.Path(p).name for p in result["paths"])
    assert names == [
        "distribution_shift_accuracy.png",
        "label_efficiency_derm_accuracy.png",
        "results.csv",
        "results.md",
    ]
    table = (out / "results.md").read_text()
    assert "Every row: split=test, checkpoint=final" in table
    assert "| micle | 0.1 | derm | test | accuracy | 1 | 0.7500 | [0.7000, 0.7900]* |" in table
    assert "| simclr | 1 | derm_shifted | shifted | accuracy | 2 | 0.6200 |" in table

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    row = next(r for r in rows if r["method"] == "simclr" and r["label_fraction"] == "0.1")
    assert (row["n"], row["seeds"], row["values"]) == ("3", "0 1 2", "0.7 0.72 0.74")
    assert float(row["ci_high"]) == pytest.approx(0.72 + T2 * 0.02 / math.sqrt(3))

    for path in result["paths"]:
        if path.endswith(".png"):
            image = np.asarray(Image.open(path).convert("L"))
            assert image.shape[0] > 100 and image.std() > 5  # a drawn figure, not blank


def test_no_results_is_an_error_naming_the_root(tmp_path):
    _run(tmp_path, "ft_a", "finetune", {"method": "a"}, raw="[]")
    with pytest.raises(ValueError, match=f"(?s)no results found under {tmp_path}.*ft_a"):
        report.write_report(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        report.write_report(str(tmp_path / "missing"))


def test_report_cli_prints_table_and_paths(sweep_root, tmp_path):
    cmd = [sys.executable, "-m", "micle_jax.report", f"--root={sweep_root}", f"--out={tmp_path}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert "| method | label_fraction |" in result.stdout
    assert f"wrote {tmp_path / 'results.csv'}" in result.stdout
    assert "problem: " in result.stdout


def test_report_of_a_local_sweep_with_the_fake_trainer(tmp_path):
    from launch import sweep, sweep_spec

    fixtures = REPO / "tests" / "fixtures"
    runs = sweep_spec.expand(sweep_spec.load_sweep(str(fixtures / "tiny_sweep.py")), str(tmp_path))
    fake = [sys.executable, str(fixtures / "fake_trainer.py")]
    assert sweep.run_local(runs, fake, parallel=2, poll_s=0.02, out=io.StringIO()) == 0
    result = report.write_report(str(tmp_path))
    assert result["problems"] == []
    assert len(result["summary"]) == 3 * 2  # methods x fractions; seeds averaged
    for r in result["summary"]:
        # The fake trainer scores 0.5 + 0.3 * fraction + 0.01 * seed; seeds 0 and 1.
        assert r["mean"] == pytest.approx(0.5 + 0.3 * r["label_fraction"] + 0.005)
        assert r["ci_high"] - r["mean"] == pytest.approx(T1 * 0.005)
