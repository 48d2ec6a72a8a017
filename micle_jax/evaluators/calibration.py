"""Calibration: is a 0.9 probability right 90% of the time? ECE, Brier, NLL, temperature scaling.

Guo et al. 2017 ("On Calibration of Modern Neural Networks"):

  - ECE, the expected calibration error: the images binned by their score,
    sum over bins of (bin's share of images) x |bin's outcome rate - its mean
    score|; 15 equal-width bins on [0, 1] ('ece') and 15 equal-mass bins
    ('ece_adaptive', edges at the scores' quantiles). The bins are scikit-learn's
    `calibration_curve` bins (strategy 'uniform' and 'quantile'; a score on an
    edge goes to the lower bin), so the reliability diagram is its curve.
  - Multiclass: the score is the top-1 softmax probability (the confidence)
    and the outcome whether the top-1 class is right; 'brier' is the
    multiclass Brier score, sum over classes of (p_c - y_c)^2 averaged over
    images (0..2), 'nll' the mean negative log-likelihood.
  - Multilabel: each class is a binary problem (score: the sigmoid of its
    logit, outcome: the label, unknown labels left out): 'ece/<class>',
    'brier/<class>' (mean (p - y)^2) and 'nll/<class>', and their mean over
    classes ('ece', ...).
  - Temperature scaling: logits / T with the T > 0 that minimises the NLL on
    another eval's predictions (fit_on, clinical.py; the validation split):
    one T for multiclass, one per class for multilabel. It changes no
    ranking and no top-1 prediction; the metrics are then reported again
    with tag calibration='after_temperature' and the 'temperature' itself.

Every function takes integer per-image weights (the case bootstrap's counts;
bootstrap.py): a weight of 2 is the image twice, 0 leaves it out. The metric
sets take a batch of them, [S, n] for S resamples, and return [S, k]
(metric_set.py).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.optimize

from micle_jax.evaluators import metrics
from micle_jax.evaluators.metric_set import MetricSet, join
from micle_jax.evaluators.outputs import Predictions

DEFAULT_BINS = 15  # Guo et al. 2017
BEFORE, AFTER = "before_temperature", "after_temperature"
# The temperature is searched on log T in [log 0.05, log 20].
_LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))
_METRICS = ("ece", "ece_adaptive", "brier", "nll")


def equal_width_edges(bins: int) -> np.ndarray:
    """[bins + 1] edges of equal-width bins on [0, 1]."""
    return np.linspace(0.0, 1.0, bins + 1)


class EqualMassEdges:
    """Equal-mass bin edges of fixed scores for any integer weights, the sort done once.

    `edges(weights)` is np.percentile(np.repeat(scores, weights), linspace(0, 100,
    bins + 1)) (linear interpolation): calibration_curve's strategy='quantile'
    on the resampled images, without building the repeated array; a batch of
    weights [S, n] gives every resample's edges at once.

    Args:
      scores: [n]; bins: how many bins.
    """

    def __init__(self, scores: np.ndarray, bins: int):
        scores = np.asarray(scores, np.float64)
        self.order = np.argsort(scores, kind="mergesort")
        self.sorted = scores[self.order]
        self.quantiles = np.linspace(0.0, 1.0, bins + 1)

    def edges(self, weights: np.ndarray) -> np.ndarray:
        """The edges under `weights` [n] or [S, n], rounded to integers.

        Returns:
          [bins + 1] float64 ([S, bins + 1] for [S, n] weights); NaN where every
          weight (of the row) is 0.
        """
        w, batched = metrics.weight_rows(weights, len(self.order))
        edges = self._sorted_edges(np.take(w, self.order, axis=1))
        return edges if batched else edges[0]

    def binned_sums(self, weights: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Each resample's sums of weight x value over its own equal-mass bins.

        Args:
          weights: [S, n] integer per-image weights; the bins are edges(weights).
          values: [n] one value per image (calibration: outcome - score).

        Returns:
          [S, bins] float64; NaN rows where every weight is 0.
        """
        w = np.take(np.asarray(weights, np.float64), self.order, axis=1)
        edges = self._sorted_edges(w)
        num_rows, bins = len(w), len(self.quantiles) - 1
        # A score on an edge goes to the lower bin (calibration_curve's
        # searchsorted(edges[1:-1], score)): its bin is the number of inner
        # edges below it. Each inner edge is passed by the sorted scores from
        # the first rank above it on, so the bins of the sorted scores are a
        # running count of those ranks.
        first_above = np.searchsorted(self.sorted, edges[:, 1:-1], side="right")  # [S, bins - 1]
        stride = len(self.order) + 1
        marks = np.bincount(
            (first_above + stride * np.arange(num_rows)[:, None]).ravel(),
            minlength=num_rows * stride,
        )
        bin_of = np.cumsum(marks.reshape(num_rows, stride)[:, :-1], axis=1)  # [S, n]
        sums = np.bincount(
            (bin_of + bins * np.arange(num_rows)[:, None]).ravel(),
            (w * np.asarray(values, np.float64)[self.order]).ravel(),
            minlength=num_rows * bins,
        ).reshape(num_rows, bins)
        return np.where(np.isnan(edges).any(axis=1)[:, None], np.nan, sums)

    def _sorted_edges(self, w: np.ndarray) -> np.ndarray:
        """[S, bins + 1] edges (NaN rows: no weight) of weights [S, n] in sorted order."""
        num_rows, n = w.shape
        if n == 0:
            return np.full((num_rows, len(self.quantiles)), np.nan)
        cum = np.cumsum(np.rint(w).astype(np.int64), axis=1)
        total = cum[:, -1:]
        position = self.quantiles * (total - 1)  # into each row's sorted repeated scores
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, total - 1)
        t = position - low
        a = self.sorted[self._first_above(cum, low)]
        b = self.sorted[self._first_above(cum, high)]
        # numpy's interpolation (np.lib's _lerp): from the nearer end.
        edges = np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
        return np.where(total > 0, edges, np.nan)

    @staticmethod
    def _first_above(cum: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Per row, np.searchsorted(cum[s], x[s], side='right'), clipped to [0, n - 1].

        The rows' counts [S, n] (non-decreasing, in [0, max total]) are offset
        by row * (max total + 1), so that one searchsorted over all rows finds
        each row's position: integers, so the offsets change no comparison.
        """
        num_rows, n = cum.shape
        stride = int(cum[:, -1].max()) + 1
        offset = stride * np.arange(num_rows, dtype=np.int64)[:, None]
        found = np.searchsorted((cum + offset).ravel(), (x + offset).ravel(), side="right")
        index = found.reshape(x.shape) - n * np.arange(num_rows)[:, None]
        return np.clip(index, 0, n - 1)


def equal_mass_edges(scores: np.ndarray, weights: np.ndarray, bins: int) -> np.ndarray:
    """[bins + 1] edges at the weighted scores' quantiles (NaN if every weight is 0).

    np.percentile of the scores repeated `weights` times: calibration_curve's
    strategy='quantile' on the resampled images (EqualMassEdges).
    """
    return EqualMassEdges(scores, bins).edges(weights)


def bin_index(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """[n] bin of each score: calibration_curve's np.searchsorted(edges[1:-1], scores)."""
    return np.searchsorted(edges[1:-1], scores)


def reliability(scores, outcomes, weights, edges) -> dict[str, list[float]]:
    """The reliability diagram's bins: weighted count, mean score, outcome rate (NaN if empty).

    Args:
      scores: [n] in [0, 1]; outcomes: [n] in {0, 1}; weights: [n]; edges: [bins + 1].
    """
    bins = len(edges) - 1
    index = bin_index(scores, edges)
    count = np.bincount(index, weights, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.bincount(index, weights * scores, minlength=bins) / count
        outcome = np.bincount(index, weights * outcomes, minlength=bins) / count
    return {
        "edges": [float(e) for e in edges],
        "count": count.tolist(),
        "score": score.tolist(),
        "outcome": outcome.tolist(),
    }


def _ece(gaps: np.ndarray, total: np.ndarray) -> np.ndarray:
    """ECE from each bin's sum of weight x (outcome - score), gaps [S, bins], and the total
    weight [S]: sum over bins of |gap| / total; [S], NaN where total <= 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.abs(gaps).sum(axis=1) / total, np.nan)


def expected_calibration_error(scores, outcomes, weights, edges) -> float:
    """ECE: sum over bins of |sum of weight x (outcome - score)| / total weight (NaN: none).

    Args:
      scores: [n]; outcomes: [n] in {0, 1}; weights: [n]; edges: [bins + 1].
    """
    scores = np.asarray(scores, np.float64)
    weights = np.asarray(weights, np.float64)
    if np.isnan(edges).any():
        return float("nan")
    residuals = weights * (np.asarray(outcomes) - scores)
    gaps = np.bincount(bin_index(scores, edges), residuals, minlength=len(edges) - 1)
    return float(_ece(gaps[None], np.array([weights.sum()]))[0])


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """[n, C] float64 log-probabilities of softmax(logits / temperature)."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def sigmoid(logits: np.ndarray, temperature=1.0) -> np.ndarray:
    """float64 sigmoid(logits / temperature), element-wise (temperature broadcasts)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, np.float64) / temperature))


def binary_nll_terms(logits, targets, temperature=1.0) -> np.ndarray:
    """Per-element -log p(target) of sigmoid(logits / temperature): softplus(z) - y z.

    A NaN temperature (a class without a fitted one) gives NaN terms, silently.
    """
    z = np.asarray(logits, np.float64) / temperature
    with np.errstate(invalid="ignore"):
        return np.logaddexp(0.0, z) - np.asarray(targets, np.float64) * z


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    total = weights.sum()
    return float(np.dot(weights, values) / total) if total > 0 else float("nan")


def fit_temperature(nll) -> float:
    """The T in [0.05, 20] minimising nll(T) (bounded Brent on log T)."""
    result = scipy.optimize.minimize_scalar(
        lambda log_t: nll(math.exp(log_t)),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


def fit_temperatures(pred: Predictions) -> np.ndarray:
    """Temperatures fitted on `pred`: [1] for multiclass, [C] for multilabel (NaN: a class
    without both a positive and a negative label)."""
    if pred.label_type == "multiclass":
        keep = np.asarray(pred.weights, np.float64)
        labels = np.asarray(pred.labels)
        rows = np.arange(len(labels))
        nll = lambda t: _weighted_mean(-log_softmax(pred.logits, t)[rows, labels], keep)
        return np.array([fit_temperature(nll)])
    out = []
    for c in range(pred.logits.shape[1]):
        mask = np.asarray(pred.weights[:, c], np.float64)
        y = np.asarray(pred.labels[:, c], np.float64)
        if (mask * y).sum() <= 0 or (mask * (1 - y)).sum() <= 0:
            out.append(np.nan)
            continue
        z = pred.logits[:, c]
        nll = lambda t, z=z, y=y, m=mask: _weighted_mean(binary_nll_terms(z, y, t), m)
        out.append(fit_temperature(nll))
    return np.array(out)


def _binary_problems(pred: Predictions, temperature) -> tuple[np.ndarray, ...]:
    """(scores, outcomes, weights, nll terms), each [n, K]: the problems calibration scores.

    Multiclass: K = 1 (top-1 confidence, whether top-1 is right); multilabel: K = C.
    """
    if pred.label_type == "multiclass":
        logp = log_softmax(pred.logits, float(temperature[0]))
        labels = np.asarray(pred.labels)
        top1 = np.argmax(pred.logits, axis=1)  # the same argmax (first on ties) as accuracy
        rows = np.arange(len(labels))
        return (
            np.exp(logp[rows, top1])[:, None],
            (top1 == labels).astype(np.float64)[:, None],
            np.asarray(pred.weights, np.float64)[:, None],
            -logp[rows, labels][:, None],
        )
    y = np.asarray(pred.labels, np.float64)
    return (
        sigmoid(pred.logits, temperature),
        y,
        np.asarray(pred.weights, np.float64),
        binary_nll_terms(pred.logits, y, temperature),
    )


def _brier_terms(pred: Predictions, temperature) -> np.ndarray:
    """[n, K] per-image Brier terms (multiclass: sum over classes; multilabel: per class)."""
    if pred.label_type == "multiclass":
        probs = np.exp(log_softmax(pred.logits, float(temperature[0])))
        onehot = np.eye(probs.shape[1])[np.asarray(pred.labels)]
        return ((probs - onehot) ** 2).sum(axis=1)[:, None]
    return (sigmoid(pred.logits, temperature) - np.asarray(pred.labels, np.float64)) ** 2


def _problem_set(pred: Predictions, temperature, bins: int, tag: str, class_names) -> MetricSet:
    scores, outcomes, masks, nll = _binary_problems(pred, temperature)
    brier = _brier_terms(pred, temperature)
    k = scores.shape[1]
    residuals = outcomes - scores
    # A class without a fitted temperature (NaN scores) gets NaN metrics: left out.
    valid = np.flatnonzero(~np.isnan(scores).any(axis=0))
    width = equal_width_edges(bins)
    # Per problem, [n, bins + 2]: each image's residual in the column of its
    # equal-width bin, then its Brier and NLL terms, so that one matrix product
    # sums all of them for every resample.
    summed = {
        j: np.concatenate(
            [
                np.eye(bins)[bin_index(scores[:, j], width)] * residuals[:, j, None],
                brier[:, j, None],
                nll[:, j, None],
            ],
            axis=1,
        )
        for j in valid
    }
    mass = {j: EqualMassEdges(scores[:, j], bins) for j in valid}

    def compute(w: np.ndarray) -> np.ndarray:
        values = np.full((len(w), len(_METRICS), k), np.nan)
        for j in valid:
            wj = w * masks[:, j]
            total = wj.sum(axis=1)
            sums = wj @ summed[j]
            values[:, 0, j] = _ece(sums[:, :bins], total)
            values[:, 1, j] = _ece(mass[j].binned_sums(wj, residuals[:, j]), total)
            with np.errstate(invalid="ignore", divide="ignore"):
                means = sums[:, bins:] / total[:, None]
            values[:, 2:, j] = np.where(total[:, None] > 0, means, np.nan)
        if pred.label_type == "multiclass":
            return values[:, :, 0]
        # The mean over the classes whose metrics are defined in the resample.
        defined = ~np.isnan(values[:, :1, :])  # [S, 1, K]
        count = defined.sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(defined, values, 0.0).sum(axis=2) / count
        means = np.where(count > 0, means, np.nan)
        return np.concatenate([values.reshape(len(w), -1), means], axis=1)

    if pred.label_type == "multiclass":
        names = list(_METRICS)
    else:
        names = [f"{m}/{c}" for m in _METRICS for c in class_names] + list(_METRICS)
    return MetricSet(names, compute, [{"calibration": tag} for _ in names])


def metric_set(
    pred: Predictions, class_names, bins: int = DEFAULT_BINS, temperature=None
) -> MetricSet:
    """The calibration metrics of `pred` (module docstring), before and, given fitted
    temperatures ([1] or [C], from fit_temperatures), after temperature scaling; its
    compute maps weights [S, n] to [S, k]."""
    num = 1 if pred.label_type == "multiclass" else pred.logits.shape[1]
    sets = [_problem_set(pred, np.ones(num), bins, BEFORE, class_names)]
    if temperature is not None:
        fitted = np.asarray(temperature, np.float64)
        sets.append(_problem_set(pred, fitted, bins, AFTER, class_names))
    return join(sets)


def reliability_curves(pred: Predictions, class_names, bins: int, temperature=None) -> list[dict]:
    """The reliability diagrams' data (equal-width bins, whole population), for artifacts.

    Returns:
      [{'calibration': 'before_temperature' | 'after_temperature', 'class': None
        (multiclass top-1) or a class name, 'edges', 'count', 'score', 'outcome'}].
    """
    num = 1 if pred.label_type == "multiclass" else pred.logits.shape[1]
    curves = []
    runs = [(BEFORE, np.ones(num))]
    if temperature is not None:
        runs.append((AFTER, np.asarray(temperature, np.float64)))
    for tag, t in runs:
        scores, outcomes, masks, _ = _binary_problems(pred, t)
        for j in range(scores.shape[1]):
            if np.isnan(scores[:, j]).all():
                continue
            curve = reliability(scores[:, j], outcomes[:, j], masks[:, j], equal_width_edges(bins))
            name = None if pred.label_type == "multiclass" else class_names[j]
            curves.append({"calibration": tag, "class": name, **curve})
    return curves
