"""Multilabel evaluation: ROC AUC per finding and their mean.

The chest X-ray task of Azizi et al. 2021 reports the mean AUC over CheXpert's
five findings (atelectasis, cardiomegaly, consolidation, edema, pleural
effusion). Uncertain and missing labels are masked (the eval's data uses the
'ignore' policy unless it says otherwise); intervals are case bootstraps.
Calibration, operating points and subgroups (clinical.py) are optional fields.

  config.evals.test = dict(type='multilabel', data=dict(split='test'))
  config.evals.shift_nih = dict(type='multilabel',
      data=dict(source='records:/data/chestxray14', split='test'),
      label_map={'Atelectasis': 'atelectasis', ..., 'Hernia': ''})
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np

from micle_jax.evaluators import clinical, metrics
from micle_jax.evaluators.base import EvaluatorFields
from micle_jax.evaluators.eval_data import Context
from micle_jax.evaluators.metric_set import MetricSet
from micle_jax.evaluators.outputs import EvalOutput, Predictions

EXTRA_FIELDS = ("bootstrap_samples", *clinical.EXTRA_FIELDS)


def multilabel_set(pred: Predictions, class_names: Sequence[str]) -> MetricSet:
    """'auc/<class>' and 'auc_mean' of `pred` as a function of per-image weights [S, n].

    The mean is over the classes defined (a positive and a negative label)
    for the given weights, inside each bootstrap sample too.
    """
    logits = np.asarray(pred.logits, np.float32)
    if len(class_names) != logits.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {logits.shape[1]} logits")

    known = np.asarray(pred.weights) > 0  # [n, C]: the labels that count
    aucs_of = [
        metrics.WeightedAuc(logits[:, c], np.asarray(pred.labels)[:, c])
        for c in range(logits.shape[1])
    ]

    def compute(w: np.ndarray) -> np.ndarray:
        aucs = np.stack([auc(w * known[:, c]) for c, auc in enumerate(aucs_of)], axis=1)
        return np.concatenate([aucs, metrics.nanmean_rows(aucs)[:, None]], axis=1)

    return MetricSet([f"auc/{c}" for c in class_names] + ["auc_mean"], compute)


def _artifacts(pred: Predictions, class_names: Sequence[str]) -> dict:
    mask = np.asarray(pred.weights) > 0
    return {
        "class_names": list(class_names),
        "num_images": int(mask.any(axis=1).sum()),
        "positives": (np.asarray(pred.labels) * mask).sum(axis=0).astype(int).tolist(),
        "labelled": mask.sum(axis=0).astype(int).tolist(),
    }


def _check_defined(pred: Predictions) -> None:
    aucs = metrics.multilabel_auc(pred.logits, pred.labels, pred.weights)
    if np.all(np.isnan(aucs)):
        raise ValueError(
            "no class has both a positive and a negative label in the evaluation data, "
            "so no AUC is defined; evaluate on a larger or labelled split"
        )


def evaluate_predictions(
    pred: Predictions,
    class_names: Sequence[str],
    clinical_metrics: clinical.ClinicalMetrics,
    samples: int,
    seed: int,
    fit: Predictions | None = None,
) -> EvalOutput:
    """Every multilabel eval's output: `multilabel_set` and the eval's clinical metrics.

    The evaluators of logits (MultilabelEvaluator) and of frozen features
    (linear_probe.py) share it; the arguments are classification.evaluate_predictions'.
    """
    _check_defined(pred)
    make_set = functools.partial(multilabel_set, class_names=class_names)
    output = clinical_metrics.evaluate(pred, make_set, samples, seed, fit)
    output.artifacts = {**_artifacts(pred, class_names), **output.artifacts}
    return output


class MultilabelEvaluator(EvaluatorFields):
    """config.evals.NAME = dict(type='multilabel', data=..., [label_map, ...])."""

    def __init__(self, name: str, entry: Mapping, ctx: Context):
        super().__init__(name, entry, ctx, EXTRA_FIELDS, default_samples=1000)
        self.label_map = self.data.check_labels("multilabel", entry.get("label_map"))
        self.class_names = list(ctx.task.class_names)
        self.clinical = clinical.ClinicalMetrics(name, entry, self.data, self.class_names)
        self.fit_on = self.clinical.fit_on

    def predict(self, variables: Mapping) -> Predictions:
        """The model's logits on the split, labels and masks mapped onto the model's classes."""
        pred = self.data.predict(variables, ("logits",))
        if "label_mask" not in pred:
            raise ValueError(f"eval {self.name!r}: the data has no multilabel 'label_mask'")
        targets, mask = self.label_map.multilabel(pred["label"], pred["label_mask"])
        logits = np.asarray(pred["logits"], np.float32)
        return Predictions(logits, targets, mask, pred["case_id"], pred["image_id"], "multilabel")

    def evaluate(self, variables: Mapping, step: int, fit: Predictions | None = None) -> EvalOutput:
        """Predicts the split and computes the metrics (`evaluate_predictions`).

        Args:
          variables: {'params', 'batch_stats'}; step: the training step.
          fit: the predictions of the eval named by fit_on (run_evaluators passes them).
        """
        return evaluate_predictions(
            self.predict(variables), self.class_names, self.clinical, self.samples, self.seed, fit
        )
