"""Operating points: the sensitivity at the specificity we need, chosen on validation.

A deployed classifier is a threshold on a score. For each class (one-vs-rest
for multiclass: its softmax probability against every other class;
multilabel: its sigmoid probability, unknown labels left out) and each
target, the threshold is chosen on another eval's predictions (fit_on,
clinical.py; the validation split), an image counting as positive when its
score is >= the threshold (scikit-learn's roc_curve convention):

  - 'specificity=0.9': the most sensitive point of the validation ROC curve
    whose specificity is >= 0.9 (of equally sensitive ones, the most specific);
  - 'sensitivity=0.9': the most specific point whose sensitivity is >= 0.9
    (of equally specific ones, the most sensitive).

On the evaluated data (test) the threshold is kept fixed and the rows give
'sensitivity/<class>', 'specificity/<class>', 'ppv/<class>' and
'npv/<class>' with case-bootstrap intervals (the threshold's own noise from
validation is not in them), tagged target='specificity=0.9' and carrying the
'threshold'; 'threshold/<class>' is a row of its own. A class without both a
positive and a negative image in the fitting data gets no threshold.

  operating_points=True                        DEFAULT_TARGETS, every class
  operating_points=dict(specificity=(0.9,), sensitivity=(0.95,), classes=('mel',))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from micle_jax.evaluators.calibration import log_softmax, sigmoid
from micle_jax.evaluators.metric_set import MetricSet
from micle_jax.evaluators.outputs import Predictions

KINDS = ("specificity", "sensitivity")
DEFAULT_TARGETS = {"specificity": (0.9, 0.95), "sensitivity": (0.9, 0.95)}
RATES = ("sensitivity", "specificity", "ppv", "npv")
_EPS = 1e-12  # a rate equal to its target up to rounding meets it


def target_label(kind: str, value: float) -> str:
    """The 'target' tag: 'specificity=0.9'."""
    return f"{kind}={value:g}"


def parse(
    name: str, spec, class_names: Sequence[str], field: str | None = None
) -> tuple[list[tuple[str, float]], list]:
    """The operating_points field -> ([(kind, target)], [class indices]); ([], []) when off.

    `field` names the config entry in messages (default 'config.evals.<name>').
    """
    field = field or f"config.evals.{name}"
    if not spec:
        return [], []
    spec = dict(DEFAULT_TARGETS) if spec is True else dict(spec)
    classes = spec.pop("classes", None)
    unknown = sorted(set(spec) - set(KINDS))
    if unknown:
        raise ValueError(
            f"{field}.operating_points has unknown field(s) {unknown}; accepted: "
            f"{list(KINDS)} (tuples of targets in (0, 1)) and 'classes'"
        )
    targets = []
    for kind in KINDS:
        values = spec.get(kind, ())
        values = (values,) if isinstance(values, int | float) else tuple(values)
        for value in values:
            if not 0 < float(value) < 1:
                raise ValueError(
                    f"{field}.operating_points.{kind} target {value} must be in (0, 1)"
                )
            targets.append((kind, float(value)))
    if not targets:
        raise ValueError(f"{field}.operating_points names no target")
    if classes is None:
        return targets, list(range(len(class_names)))
    classes = (classes,) if isinstance(classes, str) else tuple(classes)
    bad = [c for c in classes if c not in class_names]
    if bad:
        raise ValueError(
            f"{field}.operating_points.classes names {bad}, which are not model "
            f"classes {list(class_names)}"
        )
    return targets, [list(class_names).index(c) for c in classes]


def one_vs_rest(pred: Predictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, positives, weights), each [n, C] float64: one binary problem per class."""
    if pred.label_type == "multiclass":
        scores = np.exp(log_softmax(pred.logits))
        positives = np.eye(scores.shape[1])[np.asarray(pred.labels)]
        weights = np.repeat(np.asarray(pred.weights, np.float64)[:, None], scores.shape[1], 1)
        return scores, positives, weights
    labels = np.asarray(pred.labels, np.float64)
    return sigmoid(pred.logits), labels, np.asarray(pred.weights, np.float64)


def threshold_for_target(scores, positives, weights, kind: str, target: float) -> float:
    """The threshold meeting `target` on one binary problem (module docstring).

    Args:
      scores: [n]; positives: [n] in {0, 1}; weights: [n].
      kind: 'specificity' or 'sensitivity'; target: in (0, 1).

    Returns:
      The threshold (the score of an image of weight > 0, or +inf: nothing
      positive), as roc_curve's; NaN when the data lack positives or negatives.
    """
    # Images of weight 0 are not there: their scores are no candidate threshold.
    weights = np.asarray(weights, np.float64)
    present = weights > 0
    scores = np.asarray(scores, np.float64)[present]
    positives = np.asarray(positives)[present] > 0.5
    pos, neg = weights[present] * positives, weights[present] * ~positives
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    # Candidate thresholds: +inf, then every distinct score, highest first.
    descending, group = np.unique(-scores, return_inverse=True)
    thresholds = np.concatenate([[np.inf], -descending])
    tp = np.concatenate([[0.0], np.cumsum(np.bincount(group, pos))])
    fp = np.concatenate([[0.0], np.cumsum(np.bincount(group, neg))])
    # Along the thresholds tp and fp grow: the specificity target holds on a
    # prefix, where the most sensitive point is the first one with the largest
    # tp (the highest threshold reaching it: the fewest false positives); the
    # sensitivity target on a suffix, where the most specific point is the last
    # one with the fewest fp (the lowest threshold keeping them: the most tp).
    if kind == "specificity":
        ok = np.flatnonzero(1.0 - fp / total_neg >= target - _EPS)
        return float(thresholds[ok[np.argmax(tp[ok] == tp[ok].max())]])
    ok = np.flatnonzero(tp / total_pos >= target - _EPS)
    return float(thresholds[ok[np.flatnonzero(fp[ok] == fp[ok].min())[-1]]])


def fit_thresholds(
    pred: Predictions, targets: Sequence[tuple[str, float]], classes: Sequence[int]
) -> dict[tuple[str, float], dict[int, float]]:
    """{(kind, target): {class: threshold}} on fitting predictions (NaN ones left out)."""
    scores, positives, weights = one_vs_rest(pred)
    out = {}
    for kind, target in targets:
        out[(kind, target)] = {}
        for c in classes:
            t = threshold_for_target(scores[:, c], positives[:, c], weights[:, c], kind, target)
            if not np.isnan(t):
                out[(kind, target)][c] = t
    return out


def rates(counts: np.ndarray) -> np.ndarray:
    """Sensitivity, specificity, PPV and NPV from weighted confusion counts.

    Args:
      counts: [..., 4, K] weighted (tp, fp, tn, fn) of K binary problems.

    Returns:
      [..., 4, K] float64 sensitivity, specificity, PPV, NPV (NaN: no denominator).
    """
    tp, fp, tn, fn = np.moveaxis(np.asarray(counts, np.float64), -2, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.stack([tp / (tp + fn), tn / (tn + fp), tp / (tp + fp), tn / (tn + fn)], axis=-2)
    return np.where(np.isfinite(out), out, np.nan)


def confusion_cells(predicted, positives, weights) -> np.ndarray:
    """[n, 4, K] each image's share of the (tp, fp, tn, fn) counts of K binary problems.

    A batch of per-image weights w [S, n] gives the counts as one matrix
    product, w @ cells (reshaped [S, 4, K]).

    Args:
      predicted, positives: [n, K] bool / {0, 1}; weights: [n, K] (0: unknown label).
    """
    predicted = np.asarray(predicted, bool)
    positives = np.asarray(positives) > 0.5
    cells = [predicted & positives, predicted & ~positives, ~predicted & ~positives]
    cells.append(~predicted & positives)
    return np.stack(cells, axis=1) * np.asarray(weights, np.float64)[:, None, :]


def metric_set(
    pred: Predictions,
    class_names: Sequence[str],
    thresholds: Mapping[tuple[str, float], Mapping[int, float]],
    fit_on: str,
) -> MetricSet:
    """Sensitivity, specificity, PPV and NPV of `pred` at fixed thresholds (fit_thresholds).

    Its compute maps weights [S, n] to [S, 4 x thresholds], the four rates of
    each (target, class) in turn.
    """
    scores, positives, weights = one_vs_rest(pred)
    combos = [(key, c, t) for key, by_class in thresholds.items() for c, t in by_class.items()]
    columns = np.array([c for _, c, _ in combos], np.int64)
    cut = np.array([t for _, _, t in combos], np.float64)
    cells = confusion_cells(scores[:, columns] >= cut, positives[:, columns], weights[:, columns])
    cells = cells.reshape(len(scores), -1)  # [n, 4 K]
    names, tags, info = [], [], []
    for (kind, target), c, t in combos:
        for rate in RATES:
            names.append(f"{rate}/{class_names[c]}")
            tags.append({"target": target_label(kind, target)})
            info.append({"threshold": t, "fit_on": fit_on})

    def compute(w: np.ndarray) -> np.ndarray:
        values = rates((w @ cells).reshape(len(w), 4, len(combos)))  # (tp, fp, tn, fn)
        return values.transpose(0, 2, 1).reshape(len(w), -1)

    return MetricSet(names, compute, tags, info)
