"""What a clinical reader asks beyond top-1 and mean AUC: calibration, operating points, subgroups.

The multiclass and multilabel evals accept four more fields:

  config.evals.test = dict(type='classification', data=dict(split='test'),
      fit_on='validation',     # the eval whose predictions fit temperature and thresholds
      calibration=True,        # ECE (15 equal-width and equal-mass bins), Brier, NLL,
                               # before/after temperature scaling (calibration.py)
      operating_points=True,   # thresholds for target specificity / sensitivity
                               # (operating_points.py); True = DEFAULT_TARGETS
      subgroups='auto')        # every metric by metadata column (subgroups.py)

Validation-fitted values. A temperature or a threshold must be chosen on
data other than the data it is tested on. `fit_on` names ANOTHER EVAL of
config.evals (by name, e.g. the periodic 'validation' eval) of the same type.
`run_evaluators` evaluates that eval first, on the same variables, and hands
its `Predictions` (outputs.py: logits and labels on the model's classes) to
this one, which fits the temperature (calibration.fit_temperatures) and the
thresholds (operating_points.fit_thresholds) on them and applies them to its
own predictions. So:

  - no split is predicted twice: the final evaluation already runs the
    validation eval, and its predictions are reused (an eval that is not due
    in a periodic evaluation is only predicted, without its metrics);
  - the fitting data is the deployment's: a shifted test set (shift_test)
    is scored with the thresholds chosen on the in-domain validation split;
  - `build_evaluators` checks everything up front (`check_fit_on`): the named
    eval exists, has the same type, fits on nothing itself and does not read
    the same data (fitting on the test data would flatter it).

Calibration without `fit_on` reports the uncalibrated values only;
operating points need it. Every metric, the calibration and operating-point
ones included, is computed for every subgroup with its gap to the whole
population (metric_set.evaluate), in one case bootstrap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from micle_jax.evaluators import calibration, metric_set, operating_points, subgroups
from micle_jax.evaluators.outputs import EvalOutput, Metric, Predictions

EXTRA_FIELDS = ("fit_on", "calibration", "operating_points", "subgroups")


class ClinicalMetrics:
    """One eval's calibration, operating points and subgroups, from its config entry.

    Args:
      name: the eval's name.
      entry: its config entry (EXTRA_FIELDS; all off when absent).
      data: its EvalData (source and split, for the subgroups' metadata).
      class_names: the model's classes.
      field: the config field of `entry`, for messages (default 'config.evals.<name>';
        the feature evaluation's is 'config.clinical').
    """

    def __init__(
        self,
        name: str,
        entry: Mapping,
        data,
        class_names: Sequence[str],
        field: str | None = None,
    ):
        self.name = name
        field = field or f"config.evals.{name}"
        self.fit_on = str(entry.get("fit_on") or "")
        self.class_names = list(class_names)
        spec = entry.get("calibration")
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"bins"})
            if unknown:
                raise ValueError(
                    f"{field}.calibration has unknown field(s) {unknown}; accepted: "
                    "True, False or dict(bins=15)"
                )
            self.bins = int(spec.get("bins", calibration.DEFAULT_BINS))
        else:
            self.bins = calibration.DEFAULT_BINS if spec else 0
        if spec and self.bins < 2:
            raise ValueError(f"{field}.calibration: bins={self.bins} must be >= 2")
        self.targets, self.target_classes = operating_points.parse(
            name, entry.get("operating_points"), self.class_names, field
        )
        if self.targets and not self.fit_on:
            raise ValueError(
                f"{field}.operating_points needs fit_on: the name of the eval whose "
                "predictions choose the thresholds (e.g. fit_on='validation'); thresholds chosen "
                "on the evaluated data itself would flatter it"
            )
        self.subgroups = None
        spec = entry.get("subgroups")
        if spec:
            meta = subgroups.read_image_meta(data.config.source, data.split)
            self.subgroups = subgroups.Subgroups(name, spec, meta, str(data.config.source), field)

    def evaluate(
        self,
        pred: Predictions,
        base: Callable[[Predictions], metric_set.MetricSet],
        samples: int,
        seed: int,
        fit: Predictions | None = None,
    ) -> EvalOutput:
        """The evaluator's metrics (`base`) plus this eval's, whole population and subgroups.

        Args:
          pred: the eval's predictions.
          base: the evaluator's own metrics of any subset of predictions.
          samples, seed: the case bootstrap.
          fit: the predictions of the eval named by fit_on (None when it has none).

        Returns:
          EvalOutput with the metrics, artifacts 'reliability' (calibration) and
          'subgroups' (their sizes), and `pred` as its predictions.
        """
        if self.fit_on and fit is None:
            raise ValueError(
                f"eval {self.name!r} fits on eval {self.fit_on!r} but got no predictions of it; "
                "run it through evaluators.run_evaluators"
            )
        fitted, sets = [], [base]
        temperature = None
        if self.bins:
            if self.fit_on:
                temperature = calibration.fit_temperatures(fit)
                fitted += self._temperature_metrics(temperature, fit.label_type == "multilabel")
            sets.append(
                functools.partial(
                    calibration.metric_set,
                    class_names=self.class_names,
                    bins=self.bins,
                    temperature=temperature,
                )
            )
        if self.targets:
            thresholds = operating_points.fit_thresholds(fit, self.targets, self.target_classes)
            fitted += self._threshold_metrics(thresholds)
            sets.append(
                functools.partial(
                    operating_points.metric_set,
                    class_names=self.class_names,
                    thresholds=thresholds,
                    fit_on=self.fit_on,
                )
            )
        groups, min_cases, group_metrics = [], 0, ("*",)
        if self.subgroups is not None:
            labelled = pred.weights > 0 if pred.weights.ndim == 1 else (pred.weights > 0).any(1)
            groups = self.subgroups.groups(pred.image_ids, labelled, pred.case_ids)
            min_cases, group_metrics = self.subgroups.min_cases, self.subgroups.metrics
        make_set = lambda p: metric_set.join([s(p) for s in sets])
        metrics = metric_set.evaluate(
            pred, make_set, samples, seed, groups, min_cases, group_metrics
        )
        artifacts = {}
        if self.bins:
            artifacts["reliability"] = calibration.reliability_curves(
                pred, self.class_names, self.bins, temperature
            )
        if groups:
            artifacts["subgroups"] = [
                {
                    **g.tags,
                    "num_cases": g.num_cases,
                    "num_images": g.num_images,
                    "too_small": g.num_cases < min_cases,
                }
                for g in groups
            ]
        return EvalOutput(metrics + fitted, artifacts, predictions=pred)

    def _temperature_metrics(self, temperature: np.ndarray, per_class: bool) -> list[Metric]:
        """The fitted temperature(s): one number each, no interval."""
        tags, info = {"calibration": calibration.AFTER}, {"fit_on": self.fit_on}
        if not per_class:
            return [Metric("temperature", float(temperature[0]), tags=tags, info=info)]
        return [
            Metric(f"temperature/{c}", float(t), tags=dict(tags), info=dict(info))
            for c, t in zip(self.class_names, temperature, strict=True)
            if not np.isnan(t)
        ]

    def _threshold_metrics(self, thresholds) -> list[Metric]:
        """The fitted thresholds: one number each, no interval."""
        return [
            Metric(
                f"threshold/{self.class_names[c]}",
                float(t),
                tags={"target": operating_points.target_label(kind, target)},
                info={"fit_on": self.fit_on},
            )
            for (kind, target), by_class in thresholds.items()
            for c, t in by_class.items()
        ]


def check_fit_on(evaluators: Mapping) -> None:
    """Errors for any eval whose fit_on names no usable eval (clinical.py docstring)."""
    for name, evaluator in evaluators.items():
        fit_on = getattr(evaluator, "fit_on", "")
        if not fit_on:
            continue
        other = evaluators.get(fit_on)
        if other is None:
            raise ValueError(
                f"config.evals.{name}.fit_on={fit_on!r} names no eval; config.evals has "
                f"{sorted(evaluators)}"
            )
        if fit_on == name:
            raise ValueError(
                f"config.evals.{name}.fit_on names the eval itself; name the eval of another "
                "split (e.g. 'validation'): values fitted on the evaluated data flatter it"
            )
        if type(other) is not type(evaluator):
            raise ValueError(
                f"config.evals.{name}.fit_on={fit_on!r}: that eval is a different type; fit on "
                "an eval of the same type (classification or multilabel)"
            )
        if getattr(other, "fit_on", ""):
            raise ValueError(
                f"config.evals.{name}.fit_on={fit_on!r}, which itself fits on "
                f"{other.fit_on!r}; fit on an eval without fit_on"
            )
        same = (other.data.config.source, other.split) == (
            evaluator.data.config.source,
            evaluator.split,
        )
        if same:
            raise ValueError(
                f"config.evals.{name}.fit_on={fit_on!r} reads the same data "
                f"({evaluator.data.config.source} split {evaluator.split!r}); fit on another "
                "split: values fitted on the evaluated data flatter it"
            )
