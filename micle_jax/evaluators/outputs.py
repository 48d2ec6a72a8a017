"""What an evaluation returns (`EvalOutput`), and its rows in results.json (`metric_rows`).

A metric is a name, a value and its 95% bootstrap interval, plus `tags` that
say which facet of the evaluation it is (rundir.RESULT_TAGS: 'calibration'
before or after temperature scaling, an operating point's 'target', a
'subgroup') and `info` that only describes it (the 'threshold' of an
operating point, the eval it was 'fit_on'). Both go into the metric's
results.json row. An evaluation also hands on its `Predictions`, which other
evals of the same checkpoint fit on (fit_on: clinical.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Metric:
    """One evaluated number with its 95% bootstrap confidence interval (NaN: none)."""

    name: str  # 'accuracy', 'top3', 'auc_mean', 'auc/<class>', 'ece', 'sensitivity/<class>', ...
    value: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    tags: dict[str, Any] = dataclasses.field(default_factory=dict)  # which facet
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # about it, not a facet

    @property
    def key(self) -> str:
        """The name, with the tags if any: 'ece[calibration=after_temperature]'."""
        if not self.tags:
            return self.name
        return self.name + "[" + ",".join(f"{k}={v}" for k, v in sorted(self.tags.items())) + "]"


@dataclasses.dataclass
class Predictions:
    """An eval's model outputs and labels on the model's classes, one row per real image.

    Attributes:
      logits: [n, C] float32.
      labels: multiclass [n] int class; multilabel [n, C] in {0, 1}.
      weights: multiclass [n] 0/1 (0: the label maps to no model class);
        multilabel [n, C] label mask (0: unknown label).
      case_ids, image_ids: [n] str.
      label_type: 'multiclass' or 'multilabel'.
    """

    logits: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    case_ids: np.ndarray
    image_ids: np.ndarray
    label_type: str

    def __len__(self) -> int:
        return len(self.logits)

    def take(self, index: np.ndarray) -> Predictions:
        """The images `index` ([k] int) only."""
        return Predictions(
            self.logits[index],
            self.labels[index],
            self.weights[index],
            self.case_ids[index],
            self.image_ids[index],
            self.label_type,
        )


@dataclasses.dataclass
class EvalOutput:
    """What an evaluator returns: metrics, artifacts (e.g. a confusion matrix), predictions.

    `predictions` (multiclass and multilabel evals) are not written anywhere:
    run_evaluators hands them to the evals that fit on this one.
    """

    metrics: list[Metric]
    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)
    predictions: Predictions | None = None

    def get(self, name: str) -> float:
        """The value of the untagged (whole population) metric `name`; KeyError naming them."""
        for metric in self.metrics:
            if metric.name == name and not metric.tags:
                return metric.value
        names = sorted({m.name for m in self.metrics if not m.tags})
        raise KeyError(f"no metric {name!r}; available: {names}")


def metric_rows(output: EvalOutput, evaluator, step: int, checkpoint: str) -> list[dict[str, Any]]:
    """results.json rows of one evaluation (the format the sweep report reads).

    Args:
      output: what `evaluator.evaluate` returned.
      evaluator: a base.Evaluator (its name, split and dataset label the rows).
      step: the training step of the evaluated variables.
      checkpoint: 'final' or 'best'.

    Returns:
      One row per metric: eval, metric, value, ci_low, ci_high, split, dataset,
      step, checkpoint, then the metric's tags and info.
    """
    return [
        {
            "eval": evaluator.name,
            "metric": m.name,
            "value": float(m.value),
            "ci_low": float(m.ci_low),
            "ci_high": float(m.ci_high),
            "split": evaluator.split,
            "dataset": evaluator.dataset,
            "step": int(step),
            "checkpoint": checkpoint,
            **m.tags,
            **m.info,
        }
        for m in output.metrics
    ]
