"""95% confidence intervals by bootstrap over CASES (patients), not images.

Images of one patient are correlated; resampling images would treat them as
independent and give intervals that are too narrow. Each bootstrap sample
draws `num_cases` cases with replacement and keeps all images of each drawn
case, as many times as the case was drawn. Implemented as per-image integer
weights (the case's draw count), so every metric in metrics.py can be
recomputed without copying arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_SAMPLES = 1000
DEFAULT_LEVEL = 0.95


def case_index(case_ids: Sequence) -> tuple[np.ndarray, int]:
    """Maps each image's case id to a case number.

    Args:
      case_ids: [n] case id (str or bytes) of every image.

    Returns:
      ([n] int64 case number in [0, num_cases), num_cases).
    """
    _, index = np.unique(np.asarray(case_ids, dtype=object).astype(str), return_inverse=True)
    index = index.reshape(-1).astype(np.int64)
    return index, int(index.max()) + 1 if index.size else 0


def bootstrap_weights(
    case_of_image: np.ndarray, num_cases: int, num_samples: int, seed: int
) -> np.ndarray:
    """Per-image weights of `num_samples` case bootstrap samples.

    Args:
      case_of_image: [n] case number of each image (from `case_index`).
      num_cases: how many cases there are.
      num_samples: bootstrap samples.
      seed: makes the samples reproducible.

    Returns:
      [num_samples, n] float64: how often each image's case was drawn.
    """
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(num_cases, np.full(num_cases, 1.0 / num_cases), size=num_samples)
    return counts[:, case_of_image].astype(np.float64)


def confidence_interval(
    metric_fn: Callable[[np.ndarray], np.ndarray | float],
    case_ids: Sequence,
    num_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of a weighted metric, resampling cases.

    Args:
      metric_fn: per-image weights [n] -> a scalar or a [k] array of metrics
        (e.g. one AUC per class), NaN where undefined in a sample.
      case_ids: [n] case id of every image.
      num_samples: bootstrap samples (1000 by default).
      seed: for the resampling.
      level: coverage of the interval (0.95: the 2.5th and 97.5th percentiles).

    Returns:
      (low, high), each shaped like metric_fn's output; NaN where the metric
      was undefined in every sample. With num_samples == 0 both are NaN.
    """
    if not 0 < level < 1:
        raise ValueError(f"bootstrap level={level} must be in (0, 1), e.g. 0.95")
    index, num_cases = case_index(case_ids)
    shape = np.shape(metric_fn(np.ones(len(index))))
    if num_samples <= 0 or num_cases == 0:
        nan = np.full(shape, np.nan)
        return nan, nan.copy()
    weights = bootstrap_weights(index, num_cases, num_samples, seed)
    values = np.array([np.asarray(metric_fn(w), np.float64) for w in weights])
    tail = 100 * (1 - level) / 2
    defined = ~np.all(np.isnan(values), axis=0)
    low = np.full(shape, np.nan)
    high = np.full(shape, np.nan)
    if np.any(defined):
        lo, hi = np.nanpercentile(values[:, defined] if shape else values, [tail, 100 - tail], 0)
        if shape:
            low[defined], high[defined] = lo, hi
        else:
            low, high = np.asarray(lo), np.asarray(hi)
    return low, high
