"""What an evaluation returns (`EvalOutput`), and its rows in results.json (`metric_rows`)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Metric:
    """One evaluated number with its 95% bootstrap confidence interval."""

    name: str  # 'accuracy', 'top3', 'auc_mean', 'auc/<class>', 'per_class_accuracy/<class>'
    value: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")


@dataclasses.dataclass
class EvalOutput:
    """What an evaluator returns: metrics, plus artifacts (e.g. a confusion matrix)."""

    metrics: list[Metric]
    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def get(self, name: str) -> float:
        """The value of metric `name`; KeyError naming the available ones."""
        for metric in self.metrics:
            if metric.name == name:
                return metric.value
        raise KeyError(f"no metric {name!r}; available: {[m.name for m in self.metrics]}")


def metric_rows(output: EvalOutput, evaluator, step: int, checkpoint: str) -> list[dict[str, Any]]:
    """results.json rows of one evaluation (the format the sweep report reads).

    Args:
      output: what `evaluator.evaluate` returned.
      evaluator: a base.Evaluator (its name, split and dataset label the rows).
      step: the training step of the evaluated variables.
      checkpoint: 'final' or 'best'.
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
        }
        for m in output.metrics
    ]
