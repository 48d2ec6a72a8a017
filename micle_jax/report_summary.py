"""A sweep's results as summary rows: collected per run, grouped over seeds.

`collect` reads ROOT/<run>/results.json and ROOT/<run>/sweep_run.json into one
row per (run, result entry); `select_tuned` keeps the runs of the
hyper-parameters chosen on validation; `aggregate` groups the rows by every
parameter but the seed, by RESULT_KEYS and by the FACETS (calibration before
or after temperature scaling, an operating point's target, a subgroup) into
summary rows (mean, 95% CI) that the report's tables (report.py) and figures
(report_plots.py) show, in the order `sort_key` gives (numbers, then
METHOD_ORDER, then text; subgroups in the order the runs list them).

Confidence intervals. Seeds are independent repeats of the whole fine-tuning,
so the interval of the mean over n > 1 seeds is the t interval
mean +- t(0.975, n-1) * std / sqrt(n) (std with ddof=1). Averaging the runs'
bootstrap CIs would be wrong: a bootstrap CI measures test-set sampling noise
of one model and does not shrink with more seeds nor include seed-to-seed
variation. With a single run (n = 1) the run's own bootstrap CI (test-set
noise only) is the only interval there is, and it is reported as such.

A run with several entries for the same (eval, dataset, split, metric,
checkpoint) contributes its latest step. Missing or unreadable results are
listed by path.
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import scipy.stats

from micle_jax import fs, rundir

# Where a result comes from, besides the run's sweep parameters.
RESULT_KEYS = ("dataset", "split", "eval", "checkpoint", "metric")
# results.json entry fields that say which comparison a number belongs to.
ENTRY_TAGS = ("protocol", "label_fraction")
# results.json entry fields that say which facet of an evaluation a number is
# (not a parameter of the run: a tuned arm spans them).
FACETS = rundir.RESULT_TAGS
# An entry field describing a subgroup that had too few cases for metrics.
TOO_SMALL = "too_small"
# A row's run's sweep_run.json 'tune' ({'params', 'select'}) plus 'arm': its other parameters.
TUNE_KEY = "_tune"
# How methods are ordered in tables and figures: baselines first.
METHOD_ORDER = ("supervised", "scratch", "simclr", "micle")
# Row fields that are a result, not a parameter of the run.
_VALUE_KEYS = {"value", "ci_low", "ci_high", "step", TOO_SMALL, *RESULT_KEYS, *FACETS}


def _read_json(path: str):
    with fs.open(path) as f:
        return json.load(f)


def collect(root: str) -> tuple[list[dict], list[str]]:
    """Reads every run's results under `root`.

    Returns:
      rows: one dict per (run, result entry): the run's sweep parameters (from
        sweep_run.json; 'method' = the folder name when it has none), 'run',
        and the entry's fields (value, ci_low, ci_high, dataset, metric, ...).
      problems: 'PATH: why' for each results.json that is missing (in a stage
        where other runs have one) or unreadable.
    """
    if not fs.isdir(root):
        raise FileNotFoundError(f"--root={root}: no such folder")
    rows, problems = [], []
    runs_by_stage = collections.defaultdict(list)
    stages_with_results = set()
    for name in sorted(fs.listdir(root)):
        workdir = os.path.join(root, name)
        if not fs.isdir(workdir):
            continue
        run_file = os.path.join(workdir, rundir.RUN_FILE)
        results_file = os.path.join(workdir, rundir.RESULTS_FILE)
        run_info = {}
        if fs.exists(run_file):
            try:
                run_info = _read_json(run_file)
            except (OSError, json.JSONDecodeError) as e:
                problems.append(f"{run_file}: unreadable ({e}); run labelled by its folder")
        stage = run_info.get("stage")
        runs_by_stage[stage].append(workdir)
        if not fs.exists(results_file):
            continue
        stages_with_results.add(stage)
        params = dict(run_info.get("params") or {"method": name})
        tune = run_info.get("tune")
        if tune:
            # The arm of a tuned run: its own parameters but the seed and the tuned
            # ones, kept aside because a row's entry fields shadow a parameter of
            # the same name (a 'dataset' parameter by the entry's dataset).
            skip = {"seed", *tune.get("params", ())}
            tune = {**tune, "arm": {k: v for k, v in params.items() if k not in skip}}
        try:
            new = _result_rows(_read_json(results_file), name, params)
            for row in new:
                if tune:
                    row[TUNE_KEY] = tune
            rows.extend(new)
        except (OSError, ValueError, TypeError, KeyError) as e:
            problems.append(f"{results_file}: unreadable ({type(e).__name__}: {e})")
    for stage in sorted(stages_with_results - {None}):
        for workdir in runs_by_stage[stage]:
            results_file = os.path.join(workdir, rundir.RESULTS_FILE)
            if not fs.exists(results_file):
                problems.append(f"{results_file}: missing (run {_status(workdir)})")
    return rows, problems


def _status(workdir: str) -> str:
    try:
        status = rundir.read_status(workdir)
    except ValueError as e:
        return str(e)
    return f"has no {rundir.STATUS_FILE}" if status is None else str(status.get("status"))


def _result_rows(data, run: str, params: dict) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError("expected an object with a 'results' list")
    latest: dict[tuple, dict] = {}
    for entry in data["results"]:
        value = float(entry["value"])
        row = {
            **params,
            "run": run,
            "dataset": str(entry.get("dataset", "")),
            "split": str(entry.get("split", "")),
            "eval": str(entry.get("eval", "")),
            "checkpoint": str(entry.get("checkpoint", "")),
            "metric": str(entry["metric"]),
            "value": value,
            "ci_low": float(entry.get("ci_low", math.nan)),
            "ci_high": float(entry.get("ci_high", math.nan)),
            "step": int(entry.get("step", -1)),
        }
        # One run may report several protocols and label fractions (the frozen
        # feature evaluation): those of the entry win over the run's parameters.
        for tag in (*ENTRY_TAGS, *FACETS):
            if tag in entry:
                row[tag] = entry[tag]
        if entry.get(TOO_SMALL):
            row[TOO_SMALL] = True
        key = tuple((k, row[k]) for k in (*RESULT_KEYS, *ENTRY_TAGS, *FACETS) if k in row)
        if key not in latest or row["step"] >= latest[key]["step"]:
            latest[key] = row
    return list(latest.values())


def seed_interval(values: Sequence[float], ci_lows: Sequence[float], ci_highs: Sequence[float]):
    """Mean over seeds and its 95% CI (see the module docstring for why).

    Args:
      values: [n] the metric of each seed's run.
      ci_lows, ci_highs: [n] each run's own bootstrap CI; used only when n = 1.

    Returns:
      (mean, ci_low, ci_high, std, how): std is NaN for n = 1; how names the CI.
    """
    values = np.asarray(values, np.float64)
    n = len(values)
    if n == 0:
        raise ValueError("seed_interval needs at least one value")
    mean = float(values.mean())
    if n == 1:
        return mean, float(ci_lows[0]), float(ci_highs[0]), math.nan, "bootstrap of the 1 run"
    with np.errstate(invalid="ignore"):  # an inf among the values gives NaN, not a warning
        std = float(values.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return mean, mean - half, mean + half, std, f"t over {n} seeds"


def param_columns(rows: Sequence[dict]) -> list[str]:
    """The sweep parameters rows are grouped by: method, label_fraction, then the rest."""
    skip = {"run", "seed", TUNE_KEY, *_VALUE_KEYS}
    names = {k for row in rows for k in row if k not in skip}
    first = [k for k in ("method", "protocol", "label_fraction") if k in names]
    return first + sorted(names - set(first))


def select_tuned(rows: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """Keeps, for each arm, the runs of the tuned value chosen on validation.

    Rows of runs whose sweep stage has `tuned` parameters (sweep_run.json
    'tune': {'params': ['lr'], 'select': 'validation/balanced_accuracy'})
    form arms: every parameter but the seed and the tuned ones. In each arm the
    tuned values are ranked by the mean over seeds of the `select` metric (the
    'best' checkpoint's if the runs have one, else 'final'); the best value's
    rows are kept with a 'tuned' column ('lr=0.1') and the tuned parameters
    dropped, the others are left out. Test numbers never take part.

    Returns:
      (rows, one line per arm saying what was chosen and from which values).
    """
    plain = [r for r in rows if TUNE_KEY not in r]
    tuned_rows = [r for r in rows if TUNE_KEY in r]
    arms: dict[tuple, list[dict]] = collections.defaultdict(list)
    for row in tuned_rows:
        names = tuple(row[TUNE_KEY]["params"])
        columns = {
            (k, str(v))
            for k, v in row.items()
            if k not in {"run", "seed", TUNE_KEY, *names} and k not in _VALUE_KEYS
        }
        run_params = {(k, str(v)) for k, v in (row[TUNE_KEY].get("arm") or {}).items()}
        arm = tuple(sorted(columns | run_params))
        arms[(names, row[TUNE_KEY]["select"], arm)].append(row)
    kept, notes = list(plain), []
    by_run: dict[tuple, dict[str, list[dict]]] = collections.defaultdict(dict)
    for (names, select, arm), members in arms.items():
        for row in members:
            by_run[(names, select, arm)].setdefault(row["run"], []).append(row)
    for (names, select, arm), runs in by_run.items():
        eval_name, _, metric = select.partition("/")
        scores: dict[tuple, list[float]] = collections.defaultdict(list)
        for run_rows in runs.values():
            value = tuple(run_rows[0].get(n) for n in names)
            chosen = [
                r
                for r in run_rows
                if (r["eval"], r["metric"]) == (eval_name, metric)
                and not any(r.get(f) is not None for f in FACETS)
            ]
            # The label of the checkpoint kept under WORKDIR/best (rundir.checkpoint_label).
            best = [r for r in chosen if r["checkpoint"] == rundir.BEST_DIR] or chosen
            if best:
                scores[value].append(best[0]["value"])
        if not scores:
            notes.append(f"{dict(arm)}: no run has {select}; its runs are left out")
            continue
        means = {v: float(np.mean(s)) for v, s in scores.items()}
        choice = max(sorted(means, key=str), key=lambda v: means[v])
        label = ",".join(f"{n}={v}" for n, v in zip(names, choice, strict=True))
        tried = "; ".join(
            f"{','.join(f'{n}={x}' for n, x in zip(names, v, strict=True))}: {means[v]:.4f}"
            for v in sorted(means, key=str)
        )
        arm_text = ", ".join(
            f"{k}={v}" for k, v in arm if k in ("dataset", "method", "label_fraction")
        )
        notes.append(f"{arm_text}: {label} by mean {select} over seeds ({tried})")
        for run_rows in runs.values():
            if tuple(run_rows[0].get(n) for n in names) != choice:
                continue
            for row in run_rows:
                out = {k: v for k, v in row.items() if k not in names and k != TUNE_KEY}
                out["tuned"] = label
                kept.append(out)
    return kept, notes


def sort_key(value) -> tuple:
    """Orders a column's values: numbers ascending, then METHOD_ORDER, then text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    if value in METHOD_ORDER:
        return (1, METHOD_ORDER.index(value), "")
    return (2, 0.0, "" if value is None else str(value))


def aggregate(rows: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """Groups rows by every parameter but the seed, by RESULT_KEYS and by FACETS.

    Returns:
      (summary rows with params, RESULT_KEYS, FACETS (None where a row has
      none), n, mean, ci_low, ci_high, std, ci_method, seeds, values, and
      too_small (a subgroup too small for metrics in some run); the parameter
      column names).
    """
    params = param_columns(rows)
    # Subgroups keep the order the evaluations wrote them in (age bands, 'unknown' last).
    first_seen = {}
    for row in rows:
        first_seen.setdefault(row.get("subgroup"), len(first_seen))
    groups = collections.defaultdict(list)
    for row in rows:
        key = tuple(row.get(k) for k in params) + tuple(row[k] for k in RESULT_KEYS)
        groups[key + tuple(row.get(f) for f in FACETS)].append(row)
    summary = []
    for key, members in groups.items():
        members = sorted(members, key=lambda r: sort_key(r.get("seed")))
        mean, low, high, std, how = seed_interval(
            [r["value"] for r in members],
            [r["ci_low"] for r in members],
            [r["ci_high"] for r in members],
        )
        out = dict(zip((*params, *RESULT_KEYS, *FACETS), key, strict=True))
        out.update(
            n=len(members),
            mean=mean,
            ci_low=low,
            ci_high=high,
            std=std,
            ci_method=how,
            seeds=" ".join(str(r.get("seed", "-")) for r in members),
            values=" ".join(f"{r['value']:.6g}" for r in members),
        )
        if any(r.get(TOO_SMALL) for r in members):
            out[TOO_SMALL] = True
        summary.append(out)
    first = [p for p in ("method", "label_fraction") if p in params]
    order = [*RESULT_KEYS[:-1], "subgroup_by", "subgroup", RESULT_KEYS[-1], "calibration"]
    order += ["target", *(p for p in params if p not in first), *first]

    def sort_value(row, k):
        if k == "subgroup":
            return (0, float(first_seen[row.get(k)]), "")
        return sort_key(row.get(k))

    summary.sort(key=lambda r: tuple(sort_value(r, k) for k in order))
    return summary, params
