r"""Tables and plots of a sweep's results.

    python -m micle_jax.report --root=workdirs/label_efficiency [--out=DIR]

Reads ROOT/<run>/results.json (written by evaluating runs) and
ROOT/<run>/sweep_run.json (written by `python -m launch.sweep`, it names the
run's parameters: method, label_fraction, seed, ...), and writes to OUT
(default ROOT/report):
  results.md   one row per method x label fraction x dataset x metric (and any
               other sweep parameter but the seed, and the facet: calibration
               before/after temperature scaling, an operating point's target),
               mean over seeds, 95% CI;
  subgroups.md the same for every metadata subgroup (sex, age band, ...) with
               its gap to the whole population ('gap/<metric>'), and the
               subgroups too small for metrics;
  results.csv  every row of both with every column;
  label_efficiency_*.png, distribution_shift_*.png, calibration_*.png,
  subgroups_*.png  (see report_plots.py).

Confidence intervals: over n > 1 seeds, the t interval of the mean; with a
single run, that run's own bootstrap CI (test-set noise only), marked '*'
(why: report_summary.py). A ROOT without any result is an error.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

from absl import app, flags

from micle_jax import fs, report_plots, report_summary, rundir

# What the report writes into OUT (default ROOT/DEFAULT_OUT).
DEFAULT_OUT = "report"
TABLE_FILE = "results.md"
SUBGROUP_FILE = "subgroups.md"
CSV_FILE = "results.csv"
CSV_COLUMNS_AFTER = (
    "n",
    "mean",
    "ci_low",
    "ci_high",
    "std",
    "ci_method",
    "seeds",
    "values",
    report_summary.TOO_SMALL,
)

_ROOT = flags.DEFINE_string("root", None, f"Sweep folder: ROOT/<run>/{rundir.RESULTS_FILE}.")
_OUT = flags.DEFINE_string("out", None, f"Where to write the report (default ROOT/{DEFAULT_OUT}).")
_SHOW = flags.DEFINE_string(
    "show",
    "",
    "Print only rows matching key=value,... (e.g. split=test,metric=accuracy); subgroup rows "
    "only when it names subgroup or subgroup_by (e.g. subgroup_by=sex); '-' matches no value.",
)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(summary: Sequence[dict], params: Sequence[str]) -> str:
    """A markdown table; columns that hold one value in every row become a line above it.

    The facets (report_summary.FACETS) are columns when some row has one.
    """
    facets = [f for f in report_summary.FACETS if any(r.get(f) is not None for r in summary)]
    optional = [p for p in params if p not in ("method", "label_fraction")]
    optional += ["split", "eval", "checkpoint", *facets]
    constant = {c: summary[0].get(c) for c in optional if len({r.get(c) for r in summary}) == 1}
    names = (*params, "dataset", "split", "eval", "checkpoint", *facets)
    columns = [c for c in names if c not in constant]
    columns += ["metric", "n", "mean", "95% CI"]
    lines = []
    if constant:
        lines.append("Every row: " + ", ".join(f"{k}={_fmt(v)}" for k, v in constant.items()))
        lines.append("")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in summary:
        bootstrap = "*" if row["n"] == 1 else ""
        # A fitted value or a count of one run (a threshold, a temperature) has no interval.
        interval = f"[{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]{bootstrap}"
        if math.isnan(row["ci_low"]) and math.isnan(row["ci_high"]):
            interval = "-"
        cells = [
            interval
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
    columns = [*params, *report_summary.RESULT_KEYS, *report_summary.FACETS, *CSV_COLUMNS_AFTER]
    with fs.open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in summary:
            writer.writerow({c: row.get(c) for c in columns})


def write_report(root: str, out: str | None = None) -> dict:
    """Collects, aggregates and writes the report.

    Returns:
      {'table': markdown text of results.md, 'paths': [written files],
       'problems': [...], 'summary': summary rows (subgroups too), 'params',
       'choices', 'subgroups': whether subgroups.md was written}.
    """
    rows, problems = report_summary.collect(root)
    if not rows:
        details = "".join(f"\n  {p}" for p in problems)
        raise ValueError(
            f"no results found under {root}: no ROOT/<run>/{rundir.RESULTS_FILE} could be read; "
            f"have the evaluating runs finished?{details}"
        )
    rows, choices = report_summary.select_tuned(rows)
    summary, params = report_summary.aggregate(rows)
    out = out or os.path.join(root, DEFAULT_OUT)
    fs.makedirs(out)
    population = [r for r in summary if r.get("subgroup") is None]
    table = markdown_table(population, params)
    paths = [os.path.join(out, TABLE_FILE), os.path.join(out, CSV_FILE)]
    chosen = "".join(f"- {c}\n" for c in choices)
    with fs.open(paths[0], "w") as f:
        f.write(f"# Results of {root}\n\n{table}")
        if chosen:
            f.write(f"\nHyper-parameters chosen on validation:\n\n{chosen}")
    write_csv(paths[1], summary, params)
    subgroups = [r for r in summary if r.get("subgroup") is not None]
    if subgroups:
        paths.append(os.path.join(out, SUBGROUP_FILE))
        with fs.open(paths[-1], "w") as f:
            f.write(f"# Subgroups of {root}\n\n{subgroup_text(subgroups, params)}")
    paths += report_plots.plot_label_efficiency(summary, params, out)
    paths += report_plots.plot_distribution_shift(summary, params, out)
    paths += report_plots.plot_calibration(summary, params, out)
    paths += report_plots.plot_subgroups(summary, params, out)
    return dict(
        table=table,
        paths=paths,
        problems=problems,
        summary=summary,
        params=params,
        choices=choices,
        subgroups=bool(subgroups),
    )


def subgroup_text(rows: Sequence[dict], params: Sequence[str]) -> str:
    """The subgroup table, then the subgroups that had too few cases for metrics."""
    measured = [r for r in rows if not r.get(report_summary.TOO_SMALL)]
    text = markdown_table(measured, params) if measured else ""
    small = [r for r in rows if r.get(report_summary.TOO_SMALL) and r["metric"] == "num_cases"]
    if small:
        text += "\nToo small for metrics (fewer cases than the eval's min_cases):\n\n"
        for r in small:
            keys = (*params, "dataset", "eval", "checkpoint")
            where = ", ".join(f"{k}={_fmt(r.get(k))}" for k in keys if k in r)
            text += f"- {r['subgroup']}: {r['mean']:g} cases ({where})\n"
    return text


def select_rows(summary: list[dict], show: str) -> list[dict]:
    """The summary rows matching every 'key=value' of `show` (comma-separated; '' = all).

    A value may list alternatives with '|': 'metric=accuracy|balanced_accuracy';
    '-' matches a row without the key ('target=-': no operating point). Subgroup
    rows are shown only when `show` names 'subgroup' or 'subgroup_by', so that
    'metric=accuracy' is the whole population's accuracy.
    """
    wanted = [item.split("=", 1) for item in show.split(",") if item.strip()]
    for item in wanted:
        if len(item) != 2:
            raise ValueError(f"--show={show!r}: expected key=value pairs such as split=test")
    options = [(k.strip(), {v.strip() for v in value.split("|")}) for k, value in wanted]
    subgroups = {k for k, _ in options} & {"subgroup", "subgroup_by"}
    return [
        r
        for r in summary
        if (subgroups or r.get("subgroup") is None)
        and all(_spellings(r.get(k)) & vs for k, vs in options)
    ]


def _spellings(value) -> set[str]:
    """How --show may write a value: str(), '1' as well as '1.0' for floats, '-' for none."""
    if value is None:
        return {"-", "None"}
    return {str(value), f"{value:g}"} if isinstance(value, float) else {str(value)}


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _ROOT.value:
        raise app.UsageError("--root=SWEEP_DIR is required")
    try:
        report = write_report(_ROOT.value, _OUT.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    if _SHOW.value:
        rows = select_rows(report["summary"], _SHOW.value)
        if not rows:
            print(f"error: no result matches --show={_SHOW.value!r}")
            return 1
        params = [k for k in report["params"] if any(k in r for r in rows)]
        print(markdown_table(rows, params), end="")
        files = TABLE_FILE + (f" and {SUBGROUP_FILE}" if report["subgroups"] else "")
        print(f"({len(rows)} of {len(report['summary'])} rows; all of them in {files})\n")
    else:
        print(report["table"])
    for problem in report["problems"]:
        print(f"problem: {problem}")
    for path in report["paths"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    app.run(main)
