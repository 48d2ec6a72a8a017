r"""Tables and plots of a sweep's results.

    python -m micle_jax.report --root=workdirs/label_efficiency [--out=DIR]

Reads ROOT/<run>/results.json (written by evaluating runs) and
ROOT/<run>/sweep_run.json (written by `python -m launch.sweep`, it names the
run's parameters: method, label_fraction, seed, ...), and writes to OUT
(default ROOT/report):
  results.md   one row per method x label fraction x dataset x metric (and any
               other sweep parameter but the seed), mean over seeds, 95% CI;
  results.csv  the same rows with every column;
  label_efficiency_*.png, distribution_shift_*.png  (see report_plots.py).

Confidence intervals. Seeds are independent repeats of the whole fine-tuning,
so the interval of the mean over n > 1 seeds is the t interval
mean +- t(0.975, n-1) * std / sqrt(n) (std with ddof=1). Averaging the runs'
bootstrap CIs would be wrong: a bootstrap CI measures test-set sampling noise
of one model and does not shrink with more seeds nor include seed-to-seed
variation. With a single run (n = 1) the run's own bootstrap CI (test-set
noise only) is the only interval there is, and it is reported as such.

A run with several entries for the same (eval, dataset, split, metric,
checkpoint) contributes its latest step. Missing or unreadable results are
listed by path; a ROOT without any result is an error.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import scipy.stats
from absl import app, flags

RESULTS_FILE = "results.json"
RUN_FILE = "sweep_run.json"  # written by launch/sweep.py
STATUS_FILE = "run_status.json"
# Where a result comes from, besides the run's sweep parameters.
RESULT_KEYS = ("dataset", "split", "eval", "checkpoint", "metric")
# results.json entry fields that say which comparison a number belongs to.
ENTRY_TAGS = ("protocol", "label_fraction")
# A row's run's sweep_run.json 'tune' ({'params', 'select'}) plus 'arm': its other parameters.
TUNE_KEY = "_tune"
METHOD_ORDER = ("supervised", "scratch", "simclr", "micle")
CSV_COLUMNS_AFTER = (
    "n",
    "mean",
    "ci_low",
    "ci_high",
    "std",
    "ci_method",
    "seeds",
    "values",
)


def _read_json(path: str):
    with open(path) as f:
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
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--root={root}: no such folder")
    rows, problems = [], []
    runs_by_stage = collections.defaultdict(list)
    stages_with_results = set()
    for name in sorted(os.listdir(root)):
        workdir = os.path.join(root, name)
        if not os.path.isdir(workdir):
            continue
        run_file = os.path.join(workdir, RUN_FILE)
        results_file = os.path.join(workdir, RESULTS_FILE)
        run_info = {}
        if os.path.exists(run_file):
            try:
                run_info = _read_json(run_file)
            except (OSError, json.JSONDecodeError) as e:
                problems.append(f"{run_file}: unreadable ({e}); run labelled by its folder")
        stage = run_info.get("stage")
        runs_by_stage[stage].append(workdir)
        if not os.path.exists(results_file):
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
            if not os.path.exists(os.path.join(workdir, RESULTS_FILE)):
                status = _status(workdir)
                problems.append(f"{os.path.join(workdir, RESULTS_FILE)}: missing (run {status})")
    return rows, problems


def _status(workdir: str) -> str:
    try:
        return str(_read_json(os.path.join(workdir, STATUS_FILE)).get("status"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return f"has no {STATUS_FILE}"


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
        for tag in ENTRY_TAGS:
            if tag in entry:
                row[tag] = entry[tag]
        key = tuple(row[k] for k in (*RESULT_KEYS, *ENTRY_TAGS) if k in row)
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
    std = float(values.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return mean, mean - half, mean + half, std, f"t over {n} seeds"


def param_columns(rows: Sequence[dict]) -> list[str]:
    """The sweep parameters rows are grouped by: method, label_fraction, then the rest."""
    skip = {"run", "seed", "value", "ci_low", "ci_high", "step", TUNE_KEY, *RESULT_KEYS}
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
            chosen = [r for r in run_rows if (r["eval"], r["metric"]) == (eval_name, metric)]
            best = [r for r in chosen if r["checkpoint"] == "best"] or chosen
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


_VALUE_KEYS = {"value", "ci_low", "ci_high", "step", *RESULT_KEYS}


def _sort_key(value):
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    if value in METHOD_ORDER:
        return (1, METHOD_ORDER.index(value), "")
    return (2, 0.0, "" if value is None else str(value))


def aggregate(rows: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """Groups rows by every parameter but the seed and by RESULT_KEYS.

    Returns:
      (summary rows with params, RESULT_KEYS, n, mean, ci_low, ci_high, std,
      ci_method, seeds, values; the parameter column names).
    """
    params = param_columns(rows)
    groups = collections.defaultdict(list)
    for row in rows:
        key = tuple(row.get(k) for k in params) + tuple(row[k] for k in RESULT_KEYS)
        groups[key].append(row)
    summary = []
    for key, members in groups.items():
        members = sorted(members, key=lambda r: _sort_key(r.get("seed")))
        mean, low, high, std, how = seed_interval(
            [r["value"] for r in members],
            [r["ci_low"] for r in members],
            [r["ci_high"] for r in members],
        )
        out = dict(zip((*params, *RESULT_KEYS), key, strict=True))
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
        summary.append(out)
    first = [p for p in ("method", "label_fraction") if p in params]
    order = [*RESULT_KEYS, *(p for p in params if p not in first), *first]
    summary.sort(key=lambda r: tuple(_sort_key(r.get(k)) for k in order))
    return summary, params


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(summary: Sequence[dict], params: Sequence[str]) -> str:
    """A markdown table; columns that hold one value in every row become a line above it."""
    optional = [p for p in params if p not in ("method", "label_fraction")]
    optional += ["split", "eval", "checkpoint"]
    constant = {c: summary[0].get(c) for c in optional if len({r.get(c) for r in summary}) == 1}
    columns = [c for c in (*params, "dataset", "split", "eval", "checkpoint") if c not in constant]
    columns += ["metric", "n", "mean", "95% CI"]
    lines = []
    if constant:
        lines.append("Every row: " + ", ".join(f"{k}={_fmt(v)}" for k, v in constant.items()))
        lines.append("")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in summary:
        bootstrap = "*" if row["n"] == 1 else ""
        cells = [
            f"[{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]{bootstrap}"
            if c == "95% CI"
            else (f"{row[c]:g}" if c in params and isinstance(row[c], float) else _fmt(row[c]))
            for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "95% CI: mean +- t(0.975, n-1) * std / sqrt(n) over n seeds; "
        "*: n = 1, the run's own bootstrap CI (test-set noise only)."
    )
    return "\n".join(lines) + "\n"


def write_csv(path: str, summary: Sequence[dict], params: Sequence[str]) -> None:
    """Writes the summary rows with every column to `path`."""
    columns = [*params, *RESULT_KEYS, *CSV_COLUMNS_AFTER]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in summary:
            writer.writerow({c: row.get(c) for c in columns})


def write_report(root: str, out: str | None = None) -> dict:
    """Collects, aggregates and writes the report.

    Returns:
      {'table': markdown text, 'paths': [written files], 'problems': [...],
       'summary': summary rows}.
    """
    # Imported here: matplotlib is only needed for writing, not for collecting.
    from micle_jax import report_plots

    rows, problems = collect(root)
    if not rows:
        details = "".join(f"\n  {p}" for p in problems)
        raise ValueError(
            f"no results found under {root}: no ROOT/<run>/{RESULTS_FILE} could be read; "
            f"have the evaluating runs finished?{details}"
        )
    rows, choices = select_tuned(rows)
    summary, params = aggregate(rows)
    out = out or os.path.join(root, "report")
    os.makedirs(out, exist_ok=True)
    table = markdown_table(summary, params)
    paths = [os.path.join(out, "results.md"), os.path.join(out, "results.csv")]
    chosen = "".join(f"- {c}\n" for c in choices)
    with open(paths[0], "w") as f:
        f.write(f"# Results of {root}\n\n{table}")
        if chosen:
            f.write(f"\nHyper-parameters chosen on validation:\n\n{chosen}")
    write_csv(paths[1], summary, params)
    paths += report_plots.plot_label_efficiency(summary, params, out)
    paths += report_plots.plot_distribution_shift(summary, params, out)
    return dict(
        table=table, paths=paths, problems=problems, summary=summary, params=params, choices=choices
    )


def select_rows(summary: list[dict], show: str) -> list[dict]:
    """The summary rows matching every 'key=value' of `show` (comma-separated; '' = all).

    A value may list alternatives with '|': 'metric=accuracy|balanced_accuracy'.
    """
    wanted = [item.split("=", 1) for item in show.split(",") if item.strip()]
    for item in wanted:
        if len(item) != 2:
            raise ValueError(f"--show={show!r}: expected key=value pairs such as split=test")
    options = [(k.strip(), {v.strip() for v in value.split("|")}) for k, value in wanted]
    return [r for r in summary if all(_spellings(r.get(k)) & vs for k, vs in options)]


def _spellings(value) -> set[str]:
    """How --show may write a value: str(), and '1' as well as '1.0' for floats."""
    return {str(value), f"{value:g}"} if isinstance(value, float) else {str(value)}


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.root:
        raise app.UsageError("--root=SWEEP_DIR is required")
    try:
        report = write_report(flags.FLAGS.root, flags.FLAGS.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    if flags.FLAGS.show:
        rows = select_rows(report["summary"], flags.FLAGS.show)
        if not rows:
            print(f"error: no result matches --show={flags.FLAGS.show!r}")
            return 1
        params = [k for k in report["params"] if any(k in r for r in rows)]
        print(markdown_table(rows, params), end="")
        print(f"({len(rows)} of {len(report['summary'])} rows; all of them in results.md)\n")
    else:
        print(report["table"])
    for problem in report["problems"]:
        print(f"problem: {problem}")
    for path in report["paths"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    # Defined here, not at import: report_plots imports this module again as
    # micle_jax.report, which must not define the flags a second time.
    flags.DEFINE_string("root", None, "Sweep folder: ROOT/<run>/results.json.")
    flags.DEFINE_string("out", None, "Where to write the report (default ROOT/report).")
    flags.DEFINE_string(
        "show", "", "Print only rows matching key=value,... (e.g. split=test,metric=accuracy)."
    )
    app.run(main)
