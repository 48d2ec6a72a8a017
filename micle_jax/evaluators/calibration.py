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
bootstrap.py): a weight of 2 is the image twice, 0 leaves it out.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.optimize

from micle_jax.evaluators.metric_set import MetricSet
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
    on the resampled images, without building the repeated array.

    Args:
      scores: [n]; bins: how many bins.
    """

    def __init__(self, scores: np.ndarray, bins: int):
        scores = np.asarray(scores, np.float64)
        self.order = np.argsort(scores, kind="mergesort")
        self.sorted = scores[self.order]
        self.quantiles = np.linspace(0.0, 1.0, bins + 1)

    def edges(self, weights: np.ndarray) -> np.ndarray:
        """[bins + 1] edges (NaN if every weight is 0); weights are rounded to integers."""
        cum = np.cumsum(np.rint(np.asarray(weights)[self.order]).astype(np.int64))
        total = int(cum[-1]) if cum.size else 0
        if total <= 0:
            return np.full(len(self.quantiles), np.nan)
        position = self.quantiles * (total - 1)  # into the sorted repeated scores
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, total - 1)
        t = position - low
        a = self.sorted[np.searchsorted(cum, low, side="right")]
        b = self.sorted[np.searchsorted(cum, high, side="right")]
        # numpy's interpolation (np.lib's _lerp): from the nearer end.
        return np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)


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


def expected_calibration_error(scores, outcomes, weights, edges) -> float:
    """ECE: sum over bins of |sum of weight x (outcome - score)| / total weight (NaN: none)."""
    scores = np.asarray(scores, np.float64)
    weights = np.asarray(weights, np.float64)
    total = weights.sum()
    if total <= 0 or np.isnan(edges).any():
        return float("nan")
    residuals = weights * (np.asarray(outcomes) - scores)
    gaps = np.bincount(bin_index(scores, edges), residuals, minlength=len(edges) - 1)
    return float(np.abs(gaps).sum() / total)


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
    # A class without a fitted temperature (NaN scores) gets NaN metrics: left out.
    valid = ~np.isnan(scores).any(axis=0)
    width = equal_width_edges(bins)
    width_bins = [bin_index(scores[:, j], width) for j in range(k)]
    mass = [EqualMassEdges(scores[:, j], bins) for j in range(k)]

    def compute(w: np.ndarray) -> np.ndarray:
        values = np.full((len(_METRICS), k), np.nan)
        for j in range(k):
            wj = w * masks[:, j]
            total = wj.sum()
            if total <= 0 or not valid[j]:
                continue
            gaps = np.bincount(width_bins[j], wj * (outcomes[:, j] - scores[:, j]), minlength=bins)
            values[0, j] = np.abs(gaps).sum() / total
            edges = mass[j].edges(wj)
            values[1, j] = expected_calibration_error(scores[:, j], outcomes[:, j], wj, edges)
            values[2, j] = np.dot(wj, brier[:, j]) / total
            values[3, j] = np.dot(wj, nll[:, j]) / total
        if pred.label_type == "multiclass":
            return values[:, 0]
        defined = ~np.isnan(values[0])
        means = values[:, defined].mean(axis=1) if defined.any() else np.full(len(_METRICS), np.nan)
        return np.concatenate([values.reshape(-1), means])

    if pred.label_type == "multiclass":
        names = list(_METRICS)
    else:
        names = [f"{m}/{c}" for m in _METRICS for c in class_names] + list(_METRICS)
    return MetricSet(names, compute, [{"calibration": tag} for _ in names])


def metric_set(
    pred: Predictions, class_names, bins: int = DEFAULT_BINS, temperature=None
) -> MetricSet:
    """The calibration metrics of `pred` (module docstring), before and, given fitted
    temperatures ([1] or [C], from fit_temperatures), after temperature scaling."""
    num = 1 if pred.label_type == "multiclass" else pred.logits.shape[1]
    sets = [_problem_set(pred, np.ones(num), bins, BEFORE, class_names)]
    if temperature is not None:
        fitted = np.asarray(temperature, np.float64)
        sets.append(_problem_set(pred, fitted, bins, AFTER, class_names))
    names = [n for s in sets for n in s.names]
    return MetricSet(
        names,
        lambda w: np.concatenate([s.compute(w) for s in sets]),
        [t for s in sets for t in s.tags],
    )


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
