"""Metrics as functions of per-image weights, bootstrapped at once for the population and subgroups.

A `MetricSet` names k metrics of one set of predictions and computes all of
them for a batch of per-image weights, [S, n] -> [S, k]: one row per case
bootstrap resample (bootstrap.py: integer weights are how cases are
resampled), vectorised over the rows with NumPy, so that 1000 resamples cost
a few array operations rather than 1000 Python calls. An evaluator describes
its metrics as a function `make_set(predictions) -> MetricSet`; `evaluate`
then applies it to the whole population and to every subgroup's images
(subgroups.py), and draws one case bootstrap for all of them, so that

  - every number gets the same 95% interval over cases as before;
  - a subgroup's gap to the whole population ('gap/<metric>', subgroup value
    minus population value) is computed inside each bootstrap sample, and its
    interval is that of the paired difference, not of two independent numbers;
  - a subgroup with fewer than `min_cases` cases gets no metric at all, only
    its size ('num_cases', 'num_images', with too_small=True): an interval
    over a handful of cases would be meaningless.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from micle_jax.evaluators import bootstrap
from micle_jax.evaluators.outputs import Metric, Predictions
from micle_jax.evaluators.subgroups import Group

GAP_PREFIX = "gap/"


@dataclasses.dataclass
class MetricSet:
    """k named metrics of one set of predictions, as a function of per-image weights.

    Attributes:
      names: [k] metric names.
      compute: weights [S, n] float64 (S resamples, or S = 1 for the values
        themselves) -> [S, k] float64, row s the metrics under weights[s] (NaN:
        undefined for those weights). Vectorised over S: loops over classes,
        bins or subgroups, never over the rows.
      tags: [k] dicts (rundir.RESULT_TAGS facets, e.g. {'calibration': 'before_temperature'}).
      info: [k] dicts written with the metric (e.g. {'threshold': 0.42}).
    """

    names: list[str]
    compute: Callable[[np.ndarray], np.ndarray]
    tags: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    info: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        k = len(self.names)
        self.tags = list(self.tags) or [{} for _ in range(k)]
        self.info = list(self.info) or [{} for _ in range(k)]
        if not len(self.tags) == len(self.info) == k:
            raise ValueError(f"MetricSet: {k} names, {len(self.tags)} tags, {len(self.info)} info")


def _compute_rows(metric_set: MetricSet, weights: np.ndarray) -> np.ndarray:
    """`metric_set.compute(weights)`, checked to be [S, k] float64.

    Args:
      metric_set: the metrics; weights: [S, n] float64.

    Returns:
      [S, k] float64.
    """
    values = np.asarray(metric_set.compute(weights), np.float64)
    want = (len(weights), len(metric_set.names))
    if values.shape != want:
        raise ValueError(
            f"MetricSet.compute gave shape {values.shape} for weights {weights.shape}; it must "
            f"map weights [S, n] to [S, k] = {want} (metrics {metric_set.names[:3]}...)"
        )
    return values


def join(sets: Sequence[MetricSet]) -> MetricSet:
    """One MetricSet computing every metric of `sets`, in order."""
    sets = list(sets)
    return MetricSet(
        [n for s in sets for n in s.names],
        lambda w: np.concatenate([_compute_rows(s, w) for s in sets], axis=1),
        [t for s in sets for t in s.tags],
        [i for s in sets for i in s.info],
    )


def evaluate(
    predictions: Predictions,
    make_set: Callable[[Predictions], MetricSet],
    samples: int,
    seed: int,
    groups: Sequence[Group] = (),
    min_cases: int = 0,
    group_metrics: Sequence[str] = ("*",),
) -> list[Metric]:
    """The metrics of the whole population and of each subgroup, with case-bootstrap intervals.

    Args:
      predictions: every image of the evaluation.
      make_set: the evaluator's metrics of any subset of `predictions`; the
        names must not depend on the subset (undefined ones are NaN).
      samples, seed: case bootstrap resamples (0: no intervals) and their seed.
      groups: subgroups (indices into `predictions`).
      min_cases: a subgroup with fewer cases gets only its size rows.
      group_metrics: fnmatch patterns of the metrics reported per subgroup.

    Returns:
      The population's defined metrics (NaN values dropped), then per subgroup
      its 'num_cases' and 'num_images', its metrics and their 'gap/' versions,
      tagged with 'subgroup_by' and 'subgroup'.
    """
    whole = make_set(predictions)
    k = len(whole.names)
    measured = [g for g in groups if g.num_cases >= min_cases]
    subsets = []
    for group in measured:
        subset = make_set(predictions.take(group.index))
        if subset.names != whole.names:
            raise ValueError("make_set must name the same metrics for every subset")
        subsets.append(subset)

    def compute(w: np.ndarray) -> np.ndarray:
        """[S, n] -> [S, k (1 + 2 groups)]: population, then each group's values and gaps."""
        overall = _compute_rows(whole, w)
        parts = [overall]
        for group, subset in zip(measured, subsets, strict=True):
            value = _compute_rows(subset, np.take(w, group.index, axis=1))
            parts += [value, value - overall]
        return np.concatenate(parts, axis=1)

    values = compute(np.ones((1, len(predictions))))[0]
    low, high = bootstrap.confidence_interval(compute, predictions.case_ids, samples, seed)

    per_group = [any(fnmatch.fnmatchcase(n, p) for p in group_metrics) for n in whole.names]

    def metrics_at(offset: int, prefix: str = "", extra: dict | None = None) -> list[Metric]:
        out = []
        for j in range(k):
            v = values[offset + j]
            if np.isnan(v) or (extra and not per_group[j]):
                continue
            tags = {**whole.tags[j], **(extra or {})}
            out.append(
                Metric(
                    prefix + whole.names[j],
                    float(v),
                    float(low[offset + j]),
                    float(high[offset + j]),
                    tags,
                    dict(whole.info[j]),
                )
            )
        return out

    result = metrics_at(0)
    offsets = {id(g): k * (1 + 2 * i) for i, g in enumerate(measured)}
    for group in groups:
        too_small = group.num_cases < min_cases
        size_info = {"too_small": True, "min_cases": int(min_cases)} if too_small else {}
        for name, count in (("num_cases", group.num_cases), ("num_images", group.num_images)):
            result.append(Metric(name, float(count), tags=group.tags, info=dict(size_info)))
        if not too_small:
            offset = offsets[id(group)]
            result += metrics_at(offset, extra=group.tags)
            result += metrics_at(offset + k, GAP_PREFIX, group.tags)
    return result
