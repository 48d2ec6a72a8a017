"""Classification metrics in NumPy, on gathered predictions, with per-example weights.

Every metric takes `weights` [n] (non-negative): 0 drops an example (padding,
an unmapped label), and integer weights are how the case bootstrap
(bootstrap.py) resamples patients without copying arrays. `WeightedAuc` and
`per_class_accuracy` also take a batch of weights [S, n] (S resamples at once,
metric_set.py) and then return one row of values per resample. With unit
weights each function equals its scikit-learn counterpart
(tests/test_evaluators.py checks accuracy_score, top_k_accuracy_score,
confusion_matrix and roc_auc_score on random data).
"""

from __future__ import annotations

import numpy as np

from micle_jax import losses


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n, np.float64)
    weights = np.asarray(weights, np.float64)
    if weights.shape != (n,):
        raise ValueError(f"weights must be [n]={n}; got shape {weights.shape}")
    return weights


def weight_rows(weights: np.ndarray | None, n: int) -> tuple[np.ndarray, bool]:
    """Per-example weights as a batch of rows.

    Args:
      weights: None (every example once), [n], or [S, n] (S resamples).
      n: the number of examples.

    Returns:
      ([S, n] float64 weights (S = 1 unless batched), whether `weights` was [S, n]).
    """
    if weights is not None and np.ndim(weights) == 2:
        weights = np.asarray(weights, np.float64)
        if weights.shape[1] != n:
            raise ValueError(f"weights must be [S, n={n}]; got shape {weights.shape}")
        return weights, True
    return _weights(weights, n)[None], False


def nanmean_rows(values: np.ndarray) -> np.ndarray:
    """[S, k] -> [S]: each row's mean over its non-NaN entries; NaN for a row without any."""
    defined = ~np.isnan(values)
    count = defined.sum(axis=1)
    total = np.where(defined, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be [n] integers; got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"label {int(bad[0])} is outside the class list [0, {num_classes}); the "
            "evaluation data's labels do not match the model's classes"
        )
    return labels


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each label is among the k highest scores, by scikit-learn's tie rule.

    The training steps' rule (losses.topk_correct, run here in NumPy): top-1 is
    np.argmax(scores) == label (ties to the lowest class, as accuracy_score on
    argmax predictions); top-k, k > 1, ranks ties by the highest class index
    first, as top_k_accuracy_score. A tie never counts in the example's favour.

    Args:
      scores: [n, classes] logits or probabilities.
      labels: [n] integer classes in [0, classes).
      k: 1 <= k; k >= classes makes every example correct.

    Returns:
      [n] bool.
    """
    scores = np.asarray(scores)
    labels = _check_labels(labels, scores.shape[1])
    if k < 1:
        raise ValueError(f"top-k needs k >= 1; got {k}")
    return losses.topk_correct(scores, labels, int(k)) > 0


def confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, weights=None
) -> np.ndarray:
    """Weighted confusion matrix: rows true class, columns predicted class.

    Args:
      labels, predictions: [n] ints in [0, num_classes); weights: [n] or None.

    Returns:
      [num_classes, num_classes] float64 (counts when the weights are 1).
    """
    labels = _check_labels(labels, num_classes)
    predictions = _check_labels(predictions, num_classes)
    w = _weights(weights, len(labels))
    matrix = np.zeros((num_classes, num_classes), np.float64)
    np.add.at(matrix, (labels, predictions), w)
    return matrix


def per_class_accuracy(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Per-class top-1 accuracy (the recall of each class).

    The diagonal of the confusion matrix over its row sums, both weighted sums
    over images (w @ onehot), so a batch of resamples costs two matrix products.

    Args:
      scores: [n, classes]; labels: [n] ints; weights: [n], [S, n] or None.

    Returns:
      [classes] float64 ([S, classes] for [S, n] weights); NaN for a class
      without examples.
    """
    scores = np.asarray(scores)
    labels = _check_labels(labels, scores.shape[1])
    w, batched = weight_rows(weights, len(labels))
    onehot = np.eye(scores.shape[1])[labels]
    totals = w @ onehot
    right = w @ (onehot * (np.argmax(scores, axis=1) == labels)[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(totals > 0, right / np.where(totals > 0, totals, 1), np.nan)
    return out if batched else out[0]


class WeightedAuc:
    """The ROC AUC of one binary problem for any per-example weights, its sort done once.

    The probability that a random positive scores above a random negative,
    ties counting one half (the Mann-Whitney statistic, equal to the trapezoidal
    ROC area scikit-learn computes), each example counted `weight` times. The
    scores are sorted and grouped into ties here, so a bootstrap sample costs
    two weighted sums per tie group instead of a sort, and a batch of samples
    [S, n] costs a few array operations.

    Args:
      scores: [n] float; targets: [n] in {0, 1}.
    """

    def __init__(self, scores: np.ndarray, targets: np.ndarray):
        scores = np.asarray(scores, np.float64)
        self.order = np.argsort(scores, kind="mergesort")
        positive = (np.asarray(targets) > 0.5)[self.order]
        self.positive, self.negative = positive.astype(np.float64), (~positive).astype(np.float64)
        sorted_scores = scores[self.order]
        # Tie groups: a positive beats every negative of a lower score and half of
        # the negatives with its own score.
        self.starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) != 0])

    def __call__(self, weights: np.ndarray | None = None) -> float | np.ndarray:
        """The AUC under per-example weights.

        Args:
          weights: [n], [S, n] (S resamples at once) or None (all 1).

        Returns:
          AUC in [0, 1] (a float for [n] weights, [S] float64 for [S, n]); NaN
          when the weighted positives or negatives are 0.
        """
        w, batched = weight_rows(weights, len(self.order))
        w = np.take(w, self.order, axis=1)  # as w[:, order], faster
        total_pos, total_neg = w @ self.positive, w @ self.negative
        defined = (total_pos > 0) & (total_neg > 0)
        auc = np.full(len(w), np.nan)
        if defined.any():
            pos_w, neg_w = w * self.positive, w * self.negative
            if len(self.starts) < len(self.order):  # ties: one term per group of equal scores
                pos_w = np.add.reduceat(pos_w, self.starts, axis=1)
                neg_w = np.add.reduceat(neg_w, self.starts, axis=1)
            # The negatives below each group and half of those in it.
            beaten = np.cumsum(neg_w, axis=1) - 0.5 * neg_w
            wins = np.einsum("sg,sg->s", pos_w, beaten)
            with np.errstate(invalid="ignore", divide="ignore"):
                auc = np.where(defined, wins / (total_pos * total_neg), np.nan)
        return auc if batched else float(auc[0])


def roc_auc(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted area under the ROC curve of one binary problem (WeightedAuc).

    Args:
      scores: [n] float; targets: [n] in {0, 1}; weights: [n] or None.

    Returns:
      AUC in [0, 1]; NaN when the weighted positives or negatives are 0.
    """
    return WeightedAuc(scores, targets)(weights)


def multilabel_auc(
    scores: np.ndarray,
    targets: np.ndarray,
    label_mask: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Per-class ROC AUC of a multilabel problem.

    Args:
      scores: [n, classes] logits or probabilities.
      targets: [n, classes] in {0, 1}.
      label_mask: [n, classes], 0 where the label is unknown (ignored).
      weights: [n] per-example weights or None.

    Returns:
      [classes] float64; NaN for a class without a (weighted) positive and negative.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(
            f"multilabel_auc: scores and targets must be [n, classes]; got {scores.shape} "
            f"and {targets.shape}"
        )
    w = _weights(weights, scores.shape[0])
    mask = np.ones_like(scores, np.float64) if label_mask is None else np.asarray(label_mask)
    return np.array(
        [roc_auc(scores[:, c], targets[:, c], w * (mask[:, c] > 0)) for c in range(scores.shape[1])]
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax: [n, classes] -> [n, classes] probabilities (float32)."""
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function (float32), stable for large |logits|."""
    logits = np.asarray(logits, np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)


def balanced_accuracy(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, weights=None
) -> float:
    """Mean per-class recall over the classes present in `labels`.

    scikit-learn's balanced_accuracy_score (adjusted=False): the metric for an
    imbalanced task (HAM10000: 'nv' is 67% of the images, so predicting it
    always scores 0.67 top-1 but 1/7 balanced accuracy).

    Args:
      labels: [n] true classes; predictions: [n] predicted classes.
      num_classes: C; weights: [n] per-image weights (0 leaves an image out) or None.
    """
    matrix = confusion_matrix(labels, predictions, num_classes, weights)
    rows = matrix.sum(axis=1)
    present = rows > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(matrix)[present] / rows[present]))


def macro_auc(scores: np.ndarray, labels: np.ndarray, weights=None) -> float:
    """Mean over classes of the one-vs-rest ROC AUC of softmax(scores), multiclass labels.

    scikit-learn's roc_auc_score(multi_class='ovr', average='macro') over the
    classes that have both positives and negatives; for two classes it is the
    ordinary AUC of the positive class (both one-vs-rest AUCs are equal).

    Args:
      scores: [n, C] logits or votes; labels: [n] int classes; weights: [n] or None.
    """
    scores = np.asarray(scores, np.float64)
    probs = softmax(scores) if scores.shape[1] > 1 else scores
    labels = np.asarray(labels)
    w = _weights(weights, len(labels))
    aucs = []
    for c in range(scores.shape[1]):
        targets = (labels == c).astype(np.float64)
        inside = w > 0
        if targets[inside].min(initial=1) == targets[inside].max(initial=0):
            continue
        aucs.append(roc_auc(probs[:, c], targets, w))
    return float(np.mean(aucs)) if aucs else float("nan")
