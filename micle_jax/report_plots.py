"""The report's figures, and the reliability diagrams a run writes next to its results.

From the summary rows of `report_summary.aggregate` (mean and 95% CI per group):
label-efficiency curves, in-domain vs shifted bars, ECE before and after
temperature scaling (`plot_calibration`) and every subgroup against the whole
population (`plot_subgroups`). From one run's artifacts: its reliability
diagrams, WORKDIR/plots/reliability_<eval>_<checkpoint>.png (`write_run_plots`,
called by the fine-tuning trainer and --mode=eval).
Figures are drawn with matplotlib's object API on the Agg canvas (no display,
no pyplot global state), so they work on headless machines and inside tests.
"""

from __future__ import annotations

import collections
import io
import math
import os
import re
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from micle_jax import fs, report_summary, rundir

_NOT_IN_PANEL_KEY = {"method", "label_fraction", "dataset", "split", "eval", "tuned"}
# Subgroup figures: the whole-population metrics a reader compares groups on.
SUBGROUP_PLOT_METRICS = ("accuracy", "balanced_accuracy", "auc_mean", "ece", "brier")


def _save(fig: Figure, path: str) -> None:
    """fig.savefig(path) for a local path; a URL (gs://...) gets the PNG in one upload."""
    if not fs.is_url(path):
        fig.savefig(path)
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    fs.write_bytes(path, buffer.getvalue())


def _title(fig: Figure, text: str, fontsize: float = 9) -> str:
    """`text` broken into lines that fit the figure's width at `fontsize` points.

    Matplotlib neither wraps titles nor lets constrained layout shrink them,
    so a panel key of five columns ran off both sides of a 6-inch figure.
    Allows 0.6 em per character and 80% of the width (the axes' centre is
    off the figure's by the y label).
    """
    width = int(0.8 * fig.get_figwidth() * 72 / (0.6 * fontsize))
    return textwrap.fill(text, width=max(width, 20), break_long_words=False)


def _slug(parts: Sequence) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", "_".join(str(p) for p in parts if p not in ("", None)))


def _panel_labels(keys: Sequence[tuple], columns: Sequence[str], always: Sequence[str]):
    """Per panel key: (file slug, title text) from the `always` columns and those that vary.

    A column a panel has no value for (a metric without a calibration) is
    left out of its title, as of its slug.
    """
    shown = [i for i, c in enumerate(columns) if c in always or len({k[i] for k in keys}) > 1]
    return [
        (
            _slug(k[i] for i in shown),
            ", ".join(f"{columns[i]}={k[i]}" for i in shown if k[i] not in ("", None)),
        )
        for k in keys
    ]


def _methods(rows: Sequence[dict]) -> list:
    return sorted({r["method"] for r in rows}, key=report_summary.sort_key)


def _population(summary: Sequence[dict]) -> list[dict]:
    """Rows of the whole population, without operating points (one panel per metric)."""
    return [r for r in summary if r.get("subgroup") is None and r.get("target") is None]


def plot_label_efficiency(summary: Sequence[dict], params: Sequence[str], out: str) -> list[str]:
    """One PNG per (dataset, metric, ...): metric vs label fraction, a line and 95% band per method.

    Args:
      summary: rows of `report_summary.aggregate` (need 'method' and a numeric 'label_fraction').
      params: their parameter columns.
      out: the folder to write to.

    Returns:
      The paths written (none when no panel has two label fractions).
    """
    if "method" not in params or "label_fraction" not in params:
        return []
    # 'tuned' (the hyper-parameter chosen per arm) differs between the points of one curve.
    columns = [
        c
        for c in (*params, *report_summary.RESULT_KEYS, "calibration")
        if c not in ("method", "label_fraction", "tuned")
    ]
    panels = collections.defaultdict(list)
    for row in _population(summary):
        if isinstance(row["label_fraction"], int | float):
            panels[tuple(row[c] for c in columns)].append(row)
    panels = {k: v for k, v in panels.items() if len({r["label_fraction"] for r in v}) > 1}
    keys = list(panels)
    paths = []
    labels = _panel_labels(keys, columns, ("dataset", "metric"))
    for key, (name, title) in zip(keys, labels, strict=True):
        rows = panels[key]
        info = dict(zip(columns, key, strict=True))
        fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        for method in _methods(rows):
            points = sorted(
                (r for r in rows if r["method"] == method), key=lambda r: r["label_fraction"]
            )
            x = np.array([100 * r["label_fraction"] for r in points])
            (line,) = ax.plot(x, [r["mean"] for r in points], marker="o", label=str(method))
            low = np.array([r["ci_low"] for r in points], dtype=float)
            high = np.array([r["ci_high"] for r in points], dtype=float)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("labelled training examples used (%)")
        ax.set_ylabel(info["metric"])
        ax.set_title(_title(fig, f"Label efficiency: {title}"), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(title="pre-training (95% CI bands)", fontsize=8, title_fontsize=8)
        path = os.path.join(out, f"label_efficiency_{name}.png")
        _save(fig, path)
        paths.append(path)
    return paths


def plot_distribution_shift(summary: Sequence[dict], params: Sequence[str], out: str) -> list[str]:
    """One PNG per (metric, ...) with several test datasets: grouped bars per method.

    Each group is a method; its bars are the datasets the same models were
    evaluated on (first the dataset with the most results, usually the
    in-domain one), at the largest label fraction, with 95% CI error bars.
    Only test splits when the panel has any.

    Returns:
      The paths written (none when no metric was evaluated on two datasets).
    """
    if "method" not in params:
        return []
    keys = (*params, *report_summary.RESULT_KEYS, "calibration")
    columns = [c for c in keys if c not in _NOT_IN_PANEL_KEY]
    population = _population(summary)
    popularity = collections.Counter(r["dataset"] for r in population)
    panels = collections.defaultdict(list)
    for row in population:
        panels[tuple(row.get(c) for c in columns)].append(row)
    selected = {}
    for key, rows in panels.items():
        if any(r["split"] == "test" for r in rows):
            rows = [r for r in rows if r["split"] == "test"]
        fractions = [r.get("label_fraction") for r in rows]
        if all(isinstance(f, int | float) for f in fractions):
            rows = [r for r in rows if r.get("label_fraction") == max(fractions)]
        if len({r["dataset"] for r in rows}) > 1:
            selected[key] = rows
    keys = list(selected)
    paths = []
    labels = _panel_labels(keys, columns, ("metric",))
    for key, (name, title) in zip(keys, labels, strict=True):
        rows = selected[key]
        info = dict(zip(columns, key, strict=True))
        datasets = sorted({r["dataset"] for r in rows}, key=lambda d: (-popularity[d], d))
        methods = _methods(rows)
        width = 0.8 / len(datasets)
        fig = Figure(figsize=(2 + 1.2 * len(methods), 4.5), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        for i, dataset in enumerate(datasets):
            by_method = {r["method"]: r for r in rows if r["dataset"] == dataset}
            means, errors = [], [[], []]
            for method in methods:
                r = by_method.get(method)
                mean = r["mean"] if r else math.nan
                means.append(mean)
                errors[0].append(_nan_to_zero(mean - r["ci_low"]) if r else 0.0)
                errors[1].append(_nan_to_zero(r["ci_high"] - mean) if r else 0.0)
            x = np.arange(len(methods)) + (i - (len(datasets) - 1) / 2) * width
            ax.bar(x, means, width, yerr=errors, capsize=3, label=dataset)
        ax.set_xticks(np.arange(len(methods)), [str(m) for m in methods])
        ax.set_ylabel(info["metric"])
        fraction = rows[0].get("label_fraction")
        suffix = f", {100 * fraction:g}% labels" if isinstance(fraction, int | float) else ""
        ax.set_title(_title(fig, f"In-domain vs shifted: {title}{suffix}"), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=len(datasets))
        path = os.path.join(out, f"distribution_shift_{name}.png")
        _save(fig, path)
        paths.append(path)
    return paths


def _nan_to_zero(x: float) -> float:
    return 0.0 if math.isnan(x) else max(x, 0.0)


def _panels(rows: Sequence[dict], columns: Sequence[str]) -> dict[tuple, list[dict]]:
    panels = collections.defaultdict(list)
    for row in rows:
        panels[tuple(row.get(c) for c in columns)].append(row)
    return panels


def plot_calibration(summary: Sequence[dict], params: Sequence[str], out: str) -> list[str]:
    """One PNG per (dataset, split, eval, checkpoint, ...): ECE before and after temperature
    scaling, bars per method with 95% CI error bars (the whole population's 'ece').

    Returns:
      The paths written (none without calibration rows).
    """
    if "method" not in params:
        return []
    rows = [
        r for r in _population(summary) if r["metric"] == "ece" and r.get("calibration") is not None
    ]
    keys = (*params, *report_summary.RESULT_KEYS)
    columns = [c for c in keys if c not in ("method", "tuned", "metric")]
    panels = _panels(rows, columns)
    keys = list(panels)
    paths = []
    for key, (name, title) in zip(keys, _panel_labels(keys, columns, ("eval",)), strict=True):
        rows = panels[key]
        methods = _methods(rows)
        tags = sorted({r["calibration"] for r in rows}, reverse=True)  # before, then after
        width = 0.8 / len(tags)
        fig = Figure(figsize=(3.5 + 1.2 * len(methods), 4), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        for i, tag in enumerate(tags):
            by_method = {r["method"]: r for r in rows if r["calibration"] == tag}
            means, errors = [], [[], []]
            for method in methods:
                r = by_method.get(method)
                means.append(r["mean"] if r else math.nan)
                errors[0].append(_nan_to_zero(r["mean"] - r["ci_low"]) if r else 0.0)
                errors[1].append(_nan_to_zero(r["ci_high"] - r["mean"]) if r else 0.0)
            x = np.arange(len(methods)) + (i - (len(tags) - 1) / 2) * width
            ax.bar(x, means, width, yerr=errors, capsize=3, label=tag.replace("_", " "))
        ax.set_xticks(np.arange(len(methods)), [str(m) for m in methods])
        ax.set_ylabel("expected calibration error (15 bins)")
        ax.set_title(_title(fig, f"Calibration: {title}"), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out, f"calibration_{name}.png")
        _save(fig, path)
        paths.append(path)
    return paths


def plot_subgroups(summary: Sequence[dict], params: Sequence[str], out: str) -> list[str]:
    """One PNG per (dataset, split, eval, checkpoint, subgroup column, ...): a panel per
    SUBGROUP_PLOT_METRICS metric, each subgroup's mean and 95% CI per method, and the whole
    population's value as a dashed line (uncalibrated values; no operating points).

    Returns:
      The paths written (none without subgroup rows).
    """
    if "method" not in params:
        return []

    def plotted(row):
        return row["metric"] in SUBGROUP_PLOT_METRICS and row.get("calibration") in (
            None,
            "before_temperature",
        )

    rows = [r for r in summary if r.get("subgroup") is not None and r.get("target") is None]
    rows = [r for r in rows if plotted(r)]
    whole = [r for r in _population(summary) if plotted(r)]
    keys = (*params, *report_summary.RESULT_KEYS)
    base = [c for c in keys if c not in ("method", "tuned", "metric")]
    panels = _panels(rows, [*base, "subgroup_by"])
    keys = list(panels)
    paths = []
    labels = _panel_labels(keys, [*base, "subgroup_by"], ("eval", "subgroup_by"))
    for key, (name, title) in zip(keys, labels, strict=True):
        rows = panels[key]
        metrics = [m for m in SUBGROUP_PLOT_METRICS if any(r["metric"] == m for r in rows)]
        groups = list(dict.fromkeys(r["subgroup"] for r in rows))
        methods = _methods(rows)
        fig = Figure(
            figsize=(3.2 * len(metrics) + 1, 1 + 0.35 * len(groups) * max(1, len(methods) / 2)),
            dpi=100,
            layout="constrained",
        )
        axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
        offsets = (np.arange(len(methods)) - (len(methods) - 1) / 2) * 0.8 / max(len(methods), 1)
        for ax, metric in zip(axes, metrics, strict=True):
            for j, method in enumerate(methods):
                by_group = {
                    r["subgroup"]: r
                    for r in rows
                    if r["metric"] == metric and r["method"] == method
                }
                y = [i + offsets[j] for i, g in enumerate(groups) if g in by_group]
                found = [by_group[g] for g in groups if g in by_group]
                x = np.array([r["mean"] for r in found])
                err = [
                    [_nan_to_zero(r["mean"] - r["ci_low"]) for r in found],
                    [_nan_to_zero(r["ci_high"] - r["mean"]) for r in found],
                ]
                (line,) = ax.plot(x, y, "o", label=str(method))
                ax.errorbar(x, y, xerr=err, fmt="none", ecolor=line.get_color(), capsize=2)
                info = dict(zip(base, key, strict=False))
                same = [
                    r
                    for r in whole
                    if r["metric"] == metric
                    and r["method"] == method
                    and all(r.get(c) == info[c] for c in base)
                ]
                if same:
                    ax.axvline(same[0]["mean"], color=line.get_color(), linestyle="--", alpha=0.6)
            ax.set_title(metric, fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(np.arange(len(groups)), groups)
        axes[0].invert_yaxis()
        axes[-1].legend(title="dashed: whole population", fontsize=7, title_fontsize=7)
        fig.suptitle(_title(fig, f"Subgroups: {title} (95% CI)"), fontsize=9)
        path = os.path.join(out, f"subgroups_{name}.png")
        _save(fig, path)
        paths.append(path)
    return paths


def plot_reliability(curves: Sequence[dict], title: str, path: str) -> str:
    """A reliability diagram: outcome rate vs mean score per bin, before/after temperature.

    Args:
      curves: an eval's artifacts['reliability'] (evaluators/calibration.py
        reliability_curves): one panel per class (one for multiclass top-1).
      title: the figure's title; path: the PNG to write.
    """
    classes = list(dict.fromkeys(c["class"] for c in curves))
    fig = Figure(figsize=(3.6 * len(classes), 4.6), dpi=100, layout="constrained")
    axes = fig.subplots(
        2, len(classes), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for col, name in enumerate(classes):
        ax, hist = axes[0][col], axes[1][col]
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
        for curve in (c for c in curves if c["class"] == name):
            score = np.array(curve["score"], dtype=float)
            outcome = np.array(curve["outcome"], dtype=float)
            filled = ~np.isnan(score)
            label = curve["calibration"].replace("_", " ")
            (line,) = ax.plot(score[filled], outcome[filled], "o-", label=label)
            edges = np.array(curve["edges"])
            hist.bar(
                edges[:-1],
                curve["count"],
                np.diff(edges),
                align="edge",
                alpha=0.4,
                color=line.get_color(),
            )
        ax.set_title("top-1 confidence" if name is None else str(name), fontsize=9)
        ax.set_ylabel("accuracy" if name is None else "fraction positive")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        hist.set_xlabel("mean score in bin" if name is not None else "confidence")
        hist.set_ylabel("images")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(_title(fig, title), fontsize=9)
    _save(fig, path)
    return path


def write_run_plots(workdir: str, artifacts: dict) -> list[str]:
    """A run's reliability diagrams, WORKDIR/plots/reliability_<eval>_<checkpoint>.png.

    Args:
      workdir: the run directory.
      artifacts: results.json's {'<eval>/<checkpoint>': artifacts}.

    Returns:
      The paths written (none when no eval has calibration on).
    """
    paths = []
    for key, artifact in sorted(artifacts.items()):
        curves = (artifact or {}).get("reliability")
        if not curves:
            continue
        folder = os.path.join(workdir, rundir.PLOTS_DIR)
        fs.makedirs(folder)
        path = os.path.join(folder, f"reliability_{_slug(key.split('/'))}.png")
        paths.append(plot_reliability(curves, f"Reliability: {key}", path))
    return paths
