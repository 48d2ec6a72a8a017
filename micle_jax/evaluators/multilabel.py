"""Multilabel evaluation: ROC AUC per finding and their mean.

The chest X-ray task of Azizi et al. 2021 reports the mean AUC over CheXpert's
five findings (atelectasis, cardiomegaly, consolidation, edema, pleural
effusion). Uncertain and missing labels are masked (the eval's data uses the
'ignore' policy unless it says otherwise); intervals are case bootstraps.

  config.evals.test = dict(type='multilabel', data=dict(split='test'))
  config.evals.shift_nih = dict(type='multilabel',
      data=dict(source='records:/data/chestxray14', split='test'),
      label_map={'Atelectasis': 'atelectasis', ..., 'Hernia': ''})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from micle_jax.evaluators import bootstrap, metrics
from micle_jax.evaluators.base import EvaluatorFields
from micle_jax.evaluators.eval_data import Context
from micle_jax.evaluators.outputs import EvalOutput, Metric

EXTRA_FIELDS = ("bootstrap_samples",)


def multilabel_metrics(
    logits: np.ndarray,
    targets: np.ndarray,
    label_mask: np.ndarray,
    case_ids: Sequence,
    class_names: Sequence[str],
    bootstrap_samples: int = bootstrap.DEFAULT_SAMPLES,
    seed: int = 0,
) -> EvalOutput:
    """Per-class ROC AUC and their mean, with case-bootstrap intervals.

    Args:
      logits: [n, classes] model outputs.
      targets: [n, classes] in {0, 1}.
      label_mask: [n, classes], 0 where the label is unknown.
      case_ids: [n] case of each image.
      class_names: [classes].
      bootstrap_samples: resamples for the intervals (0: no intervals).
      seed: for the resampling.

    Returns:
      metrics 'auc/<class>' for each class with both a positive and a
      negative label, and 'auc_mean' (their mean; inside each bootstrap
      sample, the mean of the classes defined in that sample).
    """
    logits = np.asarray(logits, np.float32)
    if len(class_names) != logits.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {logits.shape[1]} logits")

    def compute(w: np.ndarray) -> np.ndarray:
        aucs = metrics.multilabel_auc(logits, targets, label_mask, w)
        mean = np.nanmean(aucs) if np.any(~np.isnan(aucs)) else np.nan
        return np.append(aucs, mean)

    values = compute(np.ones(len(logits)))
    if np.isnan(values[-1]):
        raise ValueError(
            "no class has both a positive and a negative label in the evaluation data, "
            "so no AUC is defined; evaluate on a larger or labelled split"
        )
    low, high = bootstrap.confidence_interval(compute, case_ids, bootstrap_samples, seed)
    names = [f"auc/{c}" for c in class_names] + ["auc_mean"]
    result = [
        Metric(n, float(v), float(lo), float(hi))
        for n, v, lo, hi in zip(names, values, low, high, strict=True)
        if not np.isnan(v)
    ]
    mask = np.asarray(label_mask) > 0
    artifacts = {
        "class_names": list(class_names),
        "num_images": int(mask.any(axis=1).sum()),
        "positives": (np.asarray(targets) * mask).sum(axis=0).astype(int).tolist(),
        "labelled": mask.sum(axis=0).astype(int).tolist(),
    }
    return EvalOutput(result, artifacts)


class MultilabelEvaluator(EvaluatorFields):
    """config.evals.NAME = dict(type='multilabel', data=..., [label_map, ...])."""

    def __init__(self, name: str, entry: Mapping, ctx: Context):
        super().__init__(name, entry, ctx, EXTRA_FIELDS, default_samples=1000)
        self.label_map = self.data.check_labels("multilabel", entry.get("label_map"))
        self.class_names = list(ctx.task.class_names)

    def evaluate(self, variables: Mapping, step: int) -> EvalOutput:
        """Predicts the split and computes the metrics (`multilabel_metrics`)."""
        pred = self.data.predict(variables, ("logits",))
        if "label_mask" not in pred:
            raise ValueError(f"eval {self.name!r}: the data has no multilabel 'label_mask'")
        targets, mask = self.label_map.multilabel(pred["label"], pred["label_mask"])
        return multilabel_metrics(
            pred["logits"],
            targets,
            mask,
            pred["case_id"],
            self.class_names,
            self.samples,
            self.seed,
        )
