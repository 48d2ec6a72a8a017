"""The report's figures: label-efficiency curves and in-domain vs shifted bars.

Both take the summary rows of `report_summary.aggregate` (mean and 95% CI per group).
Figures are drawn with matplotlib's object API on the Agg canvas (no display,
no pyplot global state), so they work on headless machines and inside tests.
"""

from __future__ import annotations

import collections
import math
import os
import re
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from micle_jax import report_summary

_NOT_IN_PANEL_KEY = {"method", "label_fraction", "dataset", "split", "eval", "tuned"}


def _slug(parts: Sequence) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", "_".join(str(p) for p in parts if p not in ("", None)))


def _panel_labels(keys: Sequence[tuple], columns: Sequence[str], always: Sequence[str]):
    """Per panel key: (file slug, title text) from the `always` columns and those that vary."""
    shown = [i for i, c in enumerate(columns) if c in always or len({k[i] for k in keys}) > 1]
    return [
        (_slug(k[i] for i in shown), ", ".join(f"{columns[i]}={k[i]}" for i in shown)) for k in keys
    ]


def _methods(rows: Sequence[dict]) -> list:
    return sorted({r["method"] for r in rows}, key=report_summary.sort_key)


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
        for c in (*params, *report_summary.RESULT_KEYS)
        if c not in ("method", "label_fraction", "tuned")
    ]
    panels = collections.defaultdict(list)
    for row in summary:
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
        ax.set_title(f"Label efficiency: {title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(title="pre-training (95% CI bands)", fontsize=8, title_fontsize=8)
        path = os.path.join(out, f"label_efficiency_{name}.png")
        fig.savefig(path)
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
    columns = [c for c in (*params, *report_summary.RESULT_KEYS) if c not in _NOT_IN_PANEL_KEY]
    popularity = collections.Counter(r["dataset"] for r in summary)
    panels = collections.defaultdict(list)
    for row in summary:
        panels[tuple(row[c] for c in columns)].append(row)
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
        ax.set_title(f"In-domain vs shifted: {title}{suffix}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=len(datasets))
        path = os.path.join(out, f"distribution_shift_{name}.png")
        fig.savefig(path)
        paths.append(path)
    return paths


def _nan_to_zero(x: float) -> float:
    return 0.0 if math.isnan(x) else max(x, 0.0)
