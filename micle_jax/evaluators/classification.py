"""Multiclass evaluation: top-1/3/5 accuracy, per-class accuracy, confusion matrix.

The dermatology task of Azizi et al. 2021 reports top-1 accuracy over 27
classes (26 conditions + 'Other'); top-3 and top-5 are the usual companions
for many-class dermatology. Every number gets a 95% bootstrap interval over
cases (bootstrap.py). Calibration, operating points and subgroups
(clinical.py) are optional fields.

  config.evals.test = dict(type='classification', data=dict(split='test'))
  config.evals.test = dict(type='classification', data=dict(split='test'),
                           fit_on='validation', calibration=True,
                           operating_points=True, subgroups='auto')
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np

from micle_jax.evaluators import bootstrap, clinical, metric_set, metrics
from micle_jax.evaluators.base import EvaluatorFields
from micle_jax.evaluators.eval_data import Context
from micle_jax.evaluators.metric_set import MetricSet
from micle_jax.evaluators.outputs import EvalOutput, Predictions

EXTRA_FIELDS = ("bootstrap_samples", "topk", *clinical.EXTRA_FIELDS)
DEFAULT_TOPK = (3, 5)


def classification_set(
    pred: Predictions, class_names: Sequence[str], topk: Sequence[int] = DEFAULT_TOPK
) -> MetricSet:
    """The multiclass metrics of `pred` as a function of per-image weights (metric_set.py).

    'accuracy', 'top<k>' (1 < k < classes), 'balanced_accuracy' (mean per-class
    recall: sklearn's balanced_accuracy_score), 'auc_mean' (one-vs-rest ROC AUC
    of the softmax averaged over the classes with positives and negatives:
    roc_auc_score(multi_class='ovr', average='macro'); the AUC for two
    classes), 'per_class_accuracy/<class>' (NaN: a class without images).
    Its compute maps weights [S, n] to [S, k], every resample's means taken
    over the classes defined in that resample.
    """
    logits = np.asarray(pred.logits, np.float32)
    labels = np.asarray(pred.labels)
    num_classes = logits.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} logits")
    base_w = np.asarray(pred.weights, np.float64)
    ks = sorted({int(k) for k in topk if 1 < int(k) < num_classes})
    # [n, 1 + len(ks)]: whether each image is right at top-1, then at each top-k.
    correct = [metrics.topk_correct(logits, labels, k) for k in (1, *ks)]
    correct = np.stack(correct, axis=1).astype(np.float64)
    probs = metrics.softmax(logits)
    aucs_of = [metrics.WeightedAuc(probs[:, c], labels == c) for c in range(num_classes)]

    def compute(w: np.ndarray) -> np.ndarray:
        w = w * base_w
        total = w.sum(axis=1)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            accs = np.where(total > 0, (w @ correct) / total, np.nan)
        per_class = metrics.per_class_accuracy(logits, labels, w)  # NaN: a class without images
        aucs = np.stack([auc(w) for auc in aucs_of], axis=1)
        means = [metrics.nanmean_rows(per_class), metrics.nanmean_rows(aucs)]
        return np.concatenate([accs, np.stack(means, axis=1), per_class], axis=1)

    names = ["accuracy"] + [f"top{k}" for k in ks] + ["balanced_accuracy", "auc_mean"]
    names += [f"per_class_accuracy/{c}" for c in class_names]
    return MetricSet(names, compute)


def _artifacts(pred: Predictions, num_classes: int, class_names: Sequence[str]) -> dict:
    """The confusion matrix (rows true, columns predicted) and the evaluation's size."""
    # The confusion matrix's predictions: the same argmax (first index on
    # ties) that metrics.topk_correct scores as top-1.
    predictions = np.argmax(pred.logits, axis=1)
    base_w = np.asarray(pred.weights, np.float64)
    matrix = metrics.confusion_matrix(pred.labels, predictions, num_classes, base_w)
    keep = base_w > 0
    return {
        "confusion_matrix": matrix.astype(np.int64).tolist(),
        "class_names": list(class_names),
        "num_images": int(keep.sum()),
        "num_cases": len(set(np.asarray(pred.case_ids, dtype=object)[keep].tolist())),
    }


def classification_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    case_ids: Sequence,
    class_names: Sequence[str],
    weights: np.ndarray | None = None,
    topk: Sequence[int] = DEFAULT_TOPK,
    bootstrap_samples: int = bootstrap.DEFAULT_SAMPLES,
    seed: int = 0,
) -> EvalOutput:
    """Multiclass metrics with case-bootstrap confidence intervals.

    Args:
      logits: [n, classes] model outputs.
      labels: [n] int classes in [0, classes).
      case_ids: [n] case of each image (the bootstrap's unit).
      class_names: [classes] names, for 'per_class_accuracy/<class>'.
      weights: [n] 0/1 per image (0 leaves it out), or None.
      topk: the k of the extra 'top<k>' metrics; k >= classes is skipped
        (every example would count as correct).
      bootstrap_samples: resamples for the intervals (0: no intervals).
      seed: for the resampling.

    Returns:
      metrics 'accuracy', 'top<k>', 'balanced_accuracy' (mean per-class
      recall), 'auc_mean' (one-vs-rest ROC AUC of the softmax, averaged over
      classes; the AUC for two classes), 'per_class_accuracy/<class>' (classes
      with examples); artifacts {'confusion_matrix': [classes, classes] counts
      (rows true, columns predicted), 'class_names', 'num_images', 'num_cases'}.
    """
    logits = np.asarray(logits, np.float32)
    labels = np.asarray(labels)
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
    case_ids = np.asarray(case_ids, dtype=object)
    pred = Predictions(logits, labels, weights, case_ids, case_ids, "multiclass")
    make_set = functools.partial(classification_set, class_names=class_names, topk=topk)
    result = metric_set.evaluate(pred, make_set, bootstrap_samples, seed)
    return EvalOutput(result, _artifacts(pred, logits.shape[1], class_names))


def evaluate_predictions(
    pred: Predictions,
    class_names: Sequence[str],
    topk: Sequence[int],
    clinical_metrics: clinical.ClinicalMetrics,
    samples: int,
    seed: int,
    fit: Predictions | None = None,
) -> EvalOutput:
    """Every multiclass eval's output: `classification_set` and the eval's clinical metrics.

    The evaluators of logits (ClassificationEvaluator) and of frozen features
    (knn.py, linear_probe.py) share it.

    Args:
      pred: the eval's predictions (logits or log-probabilities on class_names).
      class_names: the classes; topk: the extra 'top<k>' metrics.
      clinical_metrics: the eval's calibration, operating points and subgroups.
      samples, seed: the case bootstrap.
      fit: the predictions of the eval named by fit_on, when it has one.

    Returns:
      EvalOutput with the metrics, the confusion matrix and sizes, the clinical
      artifacts and `pred`.
    """
    make_set = functools.partial(classification_set, class_names=class_names, topk=topk)
    output = clinical_metrics.evaluate(pred, make_set, samples, seed, fit)
    output.artifacts = {**_artifacts(pred, len(class_names), class_names), **output.artifacts}
    return output


class ClassificationEvaluator(EvaluatorFields):
    """config.evals.NAME = dict(type='classification', data=..., [label_map, topk, ...])."""

    def __init__(self, name: str, entry: Mapping, ctx: Context):
        super().__init__(name, entry, ctx, EXTRA_FIELDS, default_samples=1000)
        self.label_map = self.data.check_labels("multiclass", entry.get("label_map"))
        self.topk = tuple(entry.get("topk") or DEFAULT_TOPK)
        self.class_names = list(ctx.task.class_names)
        self.clinical = clinical.ClinicalMetrics(name, entry, self.data, self.class_names)
        self.fit_on = self.clinical.fit_on

    def predict(self, variables: Mapping) -> Predictions:
        """The model's logits on the split, labels mapped onto the model's classes."""
        pred = self.data.predict(variables, ("logits",))
        labels, keep = self.label_map.multiclass(pred["label"])
        if not keep.any():
            raise ValueError(f"eval {self.name!r}: no image has a label that maps to the model")
        logits = np.asarray(pred["logits"], np.float32)
        return Predictions(logits, labels, keep, pred["case_id"], pred["image_id"], "multiclass")

    def evaluate(self, variables: Mapping, step: int, fit: Predictions | None = None) -> EvalOutput:
        """Predicts the split and computes the metrics (`evaluate_predictions`).

        Args:
          variables: {'params', 'batch_stats'}; step: the training step.
          fit: the predictions of the eval named by fit_on (run_evaluators passes them).
        """
        return evaluate_predictions(
            self.predict(variables),
            self.class_names,
            self.topk,
            self.clinical,
            self.samples,
            self.seed,
            fit,
        )
