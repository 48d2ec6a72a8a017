"""Tests for micle_jax/report.py, report_summary.py and report_plots.py on hand-made results."""

import csv
import io
import json
import math
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from launch import sweep, sweep_spec
from micle_jax import report, report_plots, report_summary, rundir

REPO = pathlib.Path(__file__).resolve().parents[1]

# t(0.975, df) quantiles, from tables: df=1 12.7062, df=2 4.3027.
T1, T2 = 12.706204736174694, 4.302652729749462


def _run(root, name, stage, params, results=None, status="finished", raw=None, tune=None):
    workdir = root / name
    workdir.mkdir(parents=True)
    run_file = {"name": name, "stage": stage, "params": params, "command": ["x"]}
    if tune is not None:
        run_file["tune"] = tune
    (workdir / rundir.RUN_FILE).write_text(json.dumps(run_file))
    (workdir / rundir.STATUS_FILE).write_text(json.dumps({"status": status}))
    if raw is not None:
        (workdir / rundir.RESULTS_FILE).write_text(raw)
    elif results is not None:
        data = {"workdir": str(workdir), "config": {}, "results": results}
        (workdir / rundir.RESULTS_FILE).write_text(json.dumps(data))


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
    mean, lo, hi, std, how = report_summary.seed_interval(values, [0] * 5, [1] * 5)
    ref = scipy.stats.t.interval(0.95, df=4, loc=values.mean(), scale=scipy.stats.sem(values))
    np.testing.assert_allclose([mean, lo, hi], [values.mean(), *ref], rtol=1e-12)
    assert std == pytest.approx(values.std(ddof=1)) and how == "t over 5 seeds"
    # One run: its own bootstrap interval, the only one there is.
    assert report_summary.seed_interval([0.5], [0.4], [0.55])[:3] == (0.5, 0.4, 0.55)
    # An infinite value (a subgroup's unbounded ratio) gives a NaN interval, silently:
    # the report's --show output is read by people.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, lo, hi, std, _ = report_summary.seed_interval([1.0, np.inf], [0, 0], [1, 1])
    assert mean == np.inf and np.isnan([lo, hi, std]).all()


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
    assert (
        str(sweep_root / "ft_supervised_f0.1_s0" / rundir.RESULTS_FILE) + ": unreadable" in problems
    )
    assert (
        str(sweep_root / "ft_supervised_f0.1_s1" / rundir.RESULTS_FILE) + ": missing (run running)"
        in problems
    )
    assert "pre_simclr" not in problems and len(result["problems"]) == 2


def test_report_writes_table_csv_and_plots(sweep_root, tmp_path):
    out = tmp_path / "out"
    result = report.write_report(str(sweep_root), str(out))
    names = sorted(pathlib.Path(p).name for p in result["paths"])
    assert names == sorted(
        [
            "distribution_shift_accuracy.png",
            "label_efficiency_derm_accuracy.png",
            report.CSV_FILE,
            report.TABLE_FILE,
        ]
    )
    table = (out / report.TABLE_FILE).read_text()
    assert "Every row: split=test, checkpoint=final" in table
    assert "| micle | 0.1 | derm | test | accuracy | 1 | 0.7500 | [0.7000, 0.7900]* |" in table
    assert "| simclr | 1 | derm_shifted | shifted | accuracy | 2 | 0.6200 |" in table

    with open(out / report.CSV_FILE) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    row = next(r for r in rows if r["method"] == "simclr" and r["label_fraction"] == "0.1")
    assert (row["n"], row["seeds"], row["values"]) == ("3", "0 1 2", "0.7 0.72 0.74")
    assert float(row["ci_high"]) == pytest.approx(0.72 + T2 * 0.02 / math.sqrt(3))

    for path in result["paths"]:
        if path.endswith(".png"):
            image = np.asarray(Image.open(path).convert("L"))
            assert image.shape[0] > 100 and image.std() > 5  # a drawn figure, not blank


def test_long_figure_titles_stay_inside_the_figure(tmp_path, monkeypatch):
    # The study's panels are keyed by five columns; their one-line titles ran
    # off both sides of the 6-inch figure.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figures = []
    save = report_plots._save
    monkeypatch.setattr(
        report_plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path))
    )
    summary = [
        {
            "method": method,
            "label_fraction": fraction,
            "protocol": protocol,
            "dataset": "ham10000",
            "split": split,
            "eval": f"{protocol}_{split}",
            "checkpoint": "frozen",
            "metric": "balanced_accuracy",
            "calibration": None,
            "mean": 0.3,
            "ci_low": 0.25,
            "ci_high": 0.35,
        }
        for method in ("simclr", "random")
        for fraction in (0.01, 0.1, 1.0)
        for protocol in ("linear", "knn")
        for split in ("test", "validation")
    ]
    # A calibrated metric beside them: 'calibration' varies between panels.
    summary += [
        {**row, "metric": "ece", "calibration": "after_temperature"}
        for row in summary
        if row["protocol"] == "linear" and row["split"] == "test"
    ]
    params = ["method", "label_fraction", "protocol"]
    paths = report_plots.plot_label_efficiency(summary, params, str(tmp_path))
    assert len(paths) == len(figures) == 5
    for fig in figures:
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        title = fig.axes[0].title
        assert "protocol=" in title.get_text() and "metric=" in title.get_text()
        assert ("calibration=after_temperature" in title.get_text()) == (
            "metric=ece" in title.get_text()
        )
        assert "None" not in title.get_text()
        box = title.get_window_extent(canvas.get_renderer())
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (title.get_text(), box, fig.bbox)


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
    assert f"wrote {tmp_path / report.CSV_FILE}" in result.stdout
    assert "problem: " in result.stdout


def test_report_of_a_local_sweep_with_the_fake_trainer(tmp_path):
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


# ---------------------------------------------------------------- tuned stages, entry tags

TUNE = {"params": ["lr"], "select": "validation/balanced_accuracy"}


def _metric(metric, value, split, checkpoint, dataset="derm", **tags):
    eval_name = "validation" if split == "validation" else "test"
    return dict(
        eval=eval_name,
        metric=metric,
        value=value,
        ci_low=value - 0.05,
        ci_high=value + 0.05,
        split=split,
        dataset=dataset,
        step=100,
        checkpoint=checkpoint,
        **tags,
    )


def _tuned_runs(root, method, fraction, by_lr, checkpoints=("best", "final")):
    """One tuned arm: by_lr = {lr: [(validation best, validation final, test), per seed]}.

    With checkpoints=('final',) the runs have no 'best' checkpoint.
    """
    for lr, seeds in by_lr.items():
        for seed, (val_best, val_final, test) in enumerate(seeds):
            results = [_metric("balanced_accuracy", val_final, "validation", "final")]
            if "best" in checkpoints:
                results.append(_metric("balanced_accuracy", val_best, "validation", "best"))
            for checkpoint in checkpoints:
                results += [
                    _metric("balanced_accuracy", test, "test", checkpoint),
                    _metric("accuracy", test + 0.1, "test", checkpoint),
                    _metric("auc_mean", test + 0.2, "test", checkpoint),
                ]
            _run(
                root,
                f"ft_{method}_f{fraction}_lr{lr}_s{seed}",
                "finetune",
                {"method": method, "label_fraction": fraction, "lr": lr, "seed": seed},
                results,
                tune=TUNE,
            )


@pytest.fixture
def tuned_root(tmp_path):
    root = tmp_path / "tuned"
    # simclr at 10%: validation ('best') favours lr=0.1 (0.71 vs 0.67) while the test
    # split favours lr=0.4 (0.91 vs 0.62) and so does validation's 'final' checkpoint.
    _tuned_runs(
        root,
        "simclr",
        0.1,
        {
            0.1: [(0.70, 0.50, 0.60), (0.72, 0.52, 0.64)],
            0.4: [(0.66, 0.80, 0.90), (0.68, 0.82, 0.92)],
        },
    )
    # micle at 10%: validation favours lr=0.4, test lr=0.1: each arm chooses on its own.
    _tuned_runs(
        root,
        "micle",
        0.1,
        {0.1: [(0.60, 0.6, 0.95), (0.62, 0.6, 0.97)], 0.4: [(0.75, 0.7, 0.55), (0.77, 0.7, 0.57)]},
    )
    # simclr at 100%, no 'best' checkpoint: 'final' chooses (lr=0.4).
    _tuned_runs(
        root,
        "simclr",
        1.0,
        {0.1: [(0, 0.60, 0.80), (0, 0.62, 0.82)], 0.4: [(0, 0.70, 0.40), (0, 0.72, 0.42)]},
        checkpoints=("final",),
    )
    return root


def test_tuned_value_is_chosen_on_validation_and_only_its_test_rows_are_reported(tuned_root):
    result = report.write_report(str(tuned_root))
    summary = result["summary"]
    assert "lr" not in result["params"] and "tuned" in result["params"]

    def test_rows(method, fraction):
        return [
            r
            for r in summary
            if (r["method"], r["label_fraction"], r["split"]) == (method, fraction, "test")
        ]

    # simclr 10%: lr=0.1 (validation 'best' mean 0.71 > 0.67), although its test
    # numbers (0.60, 0.64) are worse than lr=0.4's (0.90, 0.92).
    rows = test_rows("simclr", 0.1)
    assert {r["tuned"] for r in rows} == {"lr=0.1"}
    r = _find(rows, metric="balanced_accuracy", checkpoint="best")
    assert (r["n"], r["seeds"], r["values"]) == (2, "0 1", "0.6 0.64")
    assert r["mean"] == pytest.approx(0.62)
    assert (r["ci_low"], r["ci_high"]) == (
        pytest.approx(0.62 - T1 * 0.02),
        pytest.approx(0.62 + T1 * 0.02),
    )
    # Nothing of lr=0.4 is left in the arm, on any split, metric or checkpoint:
    # every row holds exactly lr=0.1's two seeds.
    arm = {
        (r["split"], r["checkpoint"], r["metric"]): r["values"]
        for r in summary
        if (r["method"], r["label_fraction"]) == ("simclr", 0.1)
    }
    test_values = {"balanced_accuracy": "0.6 0.64", "accuracy": "0.7 0.74", "auc_mean": "0.8 0.84"}
    assert arm == {
        ("validation", "best", "balanced_accuracy"): "0.7 0.72",
        ("validation", "final", "balanced_accuracy"): "0.5 0.52",
        **{("test", c, m): v for c in ("best", "final") for m, v in test_values.items()},
    }

    # micle 10%: its own choice, lr=0.4 (0.76 > 0.61), whatever the test split says.
    rows = test_rows("micle", 0.1)
    assert {r["tuned"] for r in rows} == {"lr=0.4"}
    assert _find(rows, metric="balanced_accuracy", checkpoint="best")["mean"] == pytest.approx(0.56)

    # simclr 100%: no 'best' checkpoint, the 'final' validation value chooses lr=0.4.
    rows = test_rows("simclr", 1.0)
    assert {r["tuned"] for r in rows} == {"lr=0.4"}
    assert _find(rows, metric="balanced_accuracy")["mean"] == pytest.approx(0.41)

    # Secondary: the choice is listed in the table file.
    md = (tuned_root / report.DEFAULT_OUT / report.TABLE_FILE).read_text()
    chosen = md.split("Hyper-parameters chosen on validation:")[1]
    line = next(x for x in chosen.splitlines() if "label_fraction=0.1, method=simclr" in x)
    assert "lr=0.1 by mean validation/balanced_accuracy" in line


def test_a_tuned_arm_is_chosen_per_dataset_parameter(tmp_path):
    """A stage that sweeps a 'dataset' parameter: each dataset chooses its own lr.

    The entry's 'dataset' field takes the place of the parameter in the rows, so
    the arm must come from the run's parameters, not from the rows' columns.
    """
    root = tmp_path / "two_datasets"
    # derm: validation favours lr=0.1 by a little; cxr favours lr=0.4 by a lot, so
    # pooling the datasets would choose lr=0.4 for both.
    for dataset, by_lr in (
        ("derm", {0.1: 0.60, 0.4: 0.58}),
        ("cxr", {0.1: 0.50, 0.4: 0.90}),
    ):
        for lr, val in by_lr.items():
            results = [
                _metric("balanced_accuracy", val, "validation", "final", dataset=dataset),
                _metric("balanced_accuracy", val - 0.1, "test", "final", dataset=dataset),
            ]
            _run(
                root,
                f"ft_{dataset}_lr{lr}_s0",
                "finetune",
                {"dataset": dataset, "method": "simclr", "lr": lr, "seed": 0},
                results,
                tune=TUNE,
            )
    summary = report.write_report(str(root))["summary"]
    chosen = {r["dataset"]: r["tuned"] for r in summary if r["split"] == "test"}
    assert chosen == {"derm": "lr=0.1", "cxr": "lr=0.4"}
    test = {r["dataset"]: r["mean"] for r in summary if r["split"] == "test"}
    assert test == {"derm": pytest.approx(0.5), "cxr": pytest.approx(0.8)}


@pytest.fixture
def feature_root(tmp_path):
    """A frozen-feature run per seed, each with two protocols x two label fractions."""
    root = tmp_path / "features"
    for seed in range(2):
        results = []
        for protocol in ("linear", "knn"):
            for fraction in (0.1, 1.0):
                for split in ("validation", "test"):
                    value = (0.5 if protocol == "linear" else 0.3) + 0.2 * fraction + 0.01 * seed
                    tags = dict(protocol=protocol, label_fraction=fraction)
                    tags["l2" if protocol == "linear" else "k"] = 5.0
                    results += [
                        _metric("balanced_accuracy", value, split, "frozen", **tags),
                        _metric("accuracy", value + 0.05, split, "frozen", **tags),
                        _metric("auc_mean", value + 0.1, split, "frozen", **tags),
                    ]
        _run(
            root,
            f"features_simclr_s{seed}",
            "features",
            {"dataset": "derm", "method": "simclr", "seed": seed},
            results,
        )
    return root


def test_entry_tags_give_separate_summary_rows_and_csv_columns(feature_root):
    result = report.write_report(str(feature_root))
    summary = result["summary"]
    # 2 protocols x 2 fractions x 2 splits x 3 metrics, each averaged over the 2 seeds.
    assert len(summary) == 24
    for protocol, base in (("linear", 0.5), ("knn", 0.3)):
        for fraction in (0.1, 1.0):
            r = _find(
                summary,
                protocol=protocol,
                label_fraction=fraction,
                split="test",
                metric="balanced_accuracy",
            )
            assert (r["n"], r["checkpoint"]) == (2, "frozen")
            assert r["mean"] == pytest.approx(base + 0.2 * fraction + 0.005)
    with open(feature_root / report.DEFAULT_OUT / report.CSV_FILE) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    columns = set(reader.fieldnames)
    assert {
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
    } <= columns
    assert len(rows) == 24
    knn = [r for r in rows if r["protocol"] == "knn" and r["label_fraction"] == "0.1"]
    assert len(knn) == 6 and {r["split"] for r in knn} == {"validation", "test"}


def test_show_accepts_alternatives(feature_root):
    summary = report.write_report(str(feature_root))["summary"]
    shown = report.select_rows(summary, "split=test,metric=accuracy|balanced_accuracy")
    assert len(shown) == 8  # 2 protocols x 2 fractions x 2 metrics
    assert {r["metric"] for r in shown} == {"accuracy", "balanced_accuracy"}
    assert {r["split"] for r in shown} == {"test"}
    # Every summary row that matches is shown, nothing else.
    expected = [
        r
        for r in summary
        if r["split"] == "test" and r["metric"] in ("accuracy", "balanced_accuracy")
    ]
    assert shown == expected
    # Floats match as written on the command line: '1' for 1.0, alternatives too.
    ones = report.select_rows(summary, "label_fraction=1,protocol=knn|linear,split=test")
    assert len(ones) == 6 and {r["label_fraction"] for r in ones} == {1.0}


# ------------------------------------ calibration, operating points, subgroups (facets)


def _clinical_results(seed, lr, val, test):
    """A fine-tuning run's rows with every facet: calibration, operating points, subgroups.

    The validation eval's subgroup row favours the other learning rate: tuning must
    choose on the whole population only.
    """
    female, male = test - 0.1 + 0.01 * seed, test + 0.05
    rows = [
        _metric("balanced_accuracy", 1 - val, "validation", "best", subgroup_by="sex",
                subgroup="sex=female"),
        _metric("balanced_accuracy", val, "validation", "best"),
        _metric("balanced_accuracy", test, "test", "best"),
        _metric("ece", 0.2 + 0.01 * seed, "test", "best", calibration="before_temperature"),
        _metric("ece", 0.05 + 0.01 * seed, "test", "best", calibration="after_temperature"),
        _metric("temperature", 1.5 + seed, "test", "best", calibration="after_temperature"),
        _metric("threshold/mel", 0.3 + 0.1 * seed, "test", "best", target="specificity=0.9"),
        _metric("sensitivity/mel", 0.6, "test", "best", target="specificity=0.9",
                threshold=0.3 + 0.1 * seed, fit_on="validation"),
        _metric("balanced_accuracy", female, "test", "best", subgroup_by="sex",
                subgroup="sex=female"),
        _metric("balanced_accuracy", male, "test", "best", subgroup_by="sex", subgroup="sex=male"),
        _metric("gap/balanced_accuracy", female - test, "test", "best", subgroup_by="sex",
                subgroup="sex=female"),
        _metric("ece", 0.3, "test", "best", calibration="before_temperature", subgroup_by="sex",
                subgroup="sex=female"),
        _metric("num_cases", 6, "test", "best", subgroup_by="sex", subgroup="sex=unknown",
                too_small=True, min_cases=30),
    ]  # fmt: skip
    for row in rows:
        if row["metric"] in ("num_cases", "temperature", "threshold/mel"):
            row["ci_low"] = row["ci_high"] = math.nan
    return rows


@pytest.fixture
def clinical_root(tmp_path):
    root = tmp_path / "clinical"
    for method, by_lr in (("scratch", {0.1: 0.5, 0.4: 0.6}), ("micle", {0.1: 0.7, 0.4: 0.65})):
        for lr, val in by_lr.items():
            for seed in range(2):
                test = val + 0.1
                _run(
                    root,
                    f"ft_{method}_lr{lr}_s{seed}",
                    "finetune",
                    {"method": method, "label_fraction": 0.1, "lr": lr, "seed": seed},
                    _clinical_results(seed, lr, val, test),
                    tune=TUNE,
                )
    return root


def test_facets_are_rows_of_their_own_and_tuning_ignores_them(clinical_root):
    result = report.write_report(str(clinical_root))
    summary = result["summary"]
    for facet in ("calibration", "target", "subgroup_by", "subgroup"):
        assert facet not in result["params"]
    # Chosen on the whole population's validation value (0.6 > 0.5; 0.7 > 0.65), not
    # the subgroup's (which favours the other rate); every facet row of the arm kept.
    assert {(r["method"], r["tuned"]) for r in summary} == {
        ("scratch", "lr=0.4"),
        ("micle", "lr=0.1"),
    }
    assert all("no run has" not in c for c in result["choices"])
    micle = [r for r in summary if r["method"] == "micle"]
    before = _find(micle, metric="ece", calibration="before_temperature", subgroup=None)
    after = _find(micle, metric="ece", calibration="after_temperature")
    assert (before["n"], before["mean"]) == (2, pytest.approx(0.205))
    assert after["mean"] == pytest.approx(0.055)
    # The threshold differs by seed: a value averaged over seeds, not a grouping key.
    threshold = _find(micle, metric="threshold/mel")
    assert (threshold["n"], threshold["mean"]) == (2, pytest.approx(0.35))
    assert _find(micle, metric="sensitivity/mel")["target"] == "specificity=0.9"
    female = _find(micle, metric="balanced_accuracy", subgroup="sex=female", split="test")
    assert female["mean"] == pytest.approx(0.8 - 0.1 + 0.005)
    assert female["subgroup_by"] == "sex"
    gap = _find(micle, metric="gap/balanced_accuracy")
    assert gap["mean"] == pytest.approx(-0.1 + 0.005)
    assert _find(micle, metric="num_cases")["too_small"] is True


def test_subgroups_have_their_own_table_and_figures(clinical_root, tmp_path):
    out = tmp_path / "out"
    result = report.write_report(str(clinical_root), str(out))
    table = (out / report.TABLE_FILE).read_text()
    assert "| calibration | target | metric |" in table
    assert (
        "| micle | 0.1 | lr=0.1 | derm | test | test | after_temperature | - | ece | 2 | 0.0550 |"
        in (table)
    )
    assert "sex=" not in table  # subgroups are in their own file
    subgroups_md = (out / report.SUBGROUP_FILE).read_text()
    female = (
        "| micle | 0.1 | lr=0.1 | derm | test | test | - | sex=female | balanced_accuracy | 2 |"
    )
    assert f"{female} 0.7050 | [0.6415, 0.7685] |" in subgroups_md
    assert "- sex=unknown: 6 cases" in subgroups_md.split("Too small for metrics")[1]
    assert "| sex=unknown |" not in subgroups_md
    with open(out / report.CSV_FILE) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert {"calibration", "target", "subgroup_by", "subgroup", "too_small"} <= set(
        reader.fieldnames
    )
    assert len(rows) == len(result["summary"])
    pngs = sorted(pathlib.Path(p).name for p in result["paths"] if p.endswith(".png"))
    # One figure per eval, whatever learning rate each method's tuning chose.
    assert pngs == [
        "calibration_test.png",
        "subgroups_test_test_sex.png",
        "subgroups_validation_validation_sex.png",
    ]
    for name in pngs:
        image = np.asarray(Image.open(out / name).convert("L"))
        assert image.shape[0] > 100 and image.std() > 5


def test_show_filters_on_facets(clinical_root, tmp_path):
    summary = report.write_report(str(clinical_root))["summary"]
    shown = report.select_rows(summary, "subgroup_by=sex,metric=balanced_accuracy,split=test")
    assert {(r["method"], r["subgroup"]) for r in shown} == {
        (m, s) for m in ("scratch", "micle") for s in ("sex=female", "sex=male")
    }
    # Without a subgroup key, the whole population only; '-' matches a missing facet.
    whole = report.select_rows(summary, "metric=balanced_accuracy,split=test")
    assert [r["subgroup"] for r in whole] == [None, None]
    everyone = report.select_rows(summary, "subgroup=-|sex=female,metric=balanced_accuracy")
    assert len(everyone) == 2 * 2 * 2  # methods x (validation, test) x (everyone, women)
    assert {r["metric"] for r in report.select_rows(summary, "target=-")} == {
        "balanced_accuracy",
        "ece",
        "temperature",
    }
    cmd = [
        sys.executable,
        "-m",
        "micle_jax.report",
        f"--root={clinical_root}",
        f"--out={tmp_path}",
        "--show=calibration=after_temperature,metric=ece",
    ]
    printed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = [x for x in printed.splitlines() if x.startswith("| ") and "---" not in x][1:]
    assert len(lines) == 2 and all("ece" in x for x in lines), printed
    assert "calibration=after_temperature" in printed  # a constant column, above the table
