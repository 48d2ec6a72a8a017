"""95% confidence intervals by bootstrap over CASES (patients), not images.

Images of one patient are correlated; resampling images would treat them as
independent and give intervals that are too narrow. Each bootstrap sample
draws `num_cases` cases with replacement and keeps all images of each drawn
case, as many times as the case was drawn. Implemented as per-image integer
weights (the case's draw count), so every metric in metrics.py can be
recomputed without copying arrays. The metrics take the resamples' weights
as one batch [S, n] (metric_set.py); `confidence_interval` hands them over in
chunks of at most MAX_CHUNK_ELEMENTS weights, so that a 100k-image eval
never holds 1000 x 100k of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

DEFAULT_SAMPLES = 1000
DEFAULT_LEVEL = 0.95
MAX_CHUNK_ELEMENTS = 2**22  # float64 weights per chunk of resamples: 32 MiB


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
    return _draw(rng, case_of_image, num_cases, num_samples)


def bootstrap_weight_chunks(
    case_of_image: np.ndarray,
    num_cases: int,
    num_samples: int,
    seed: int,
    max_elements: int = MAX_CHUNK_ELEMENTS,
) -> Iterator[np.ndarray]:
    """`bootstrap_weights`' rows, the same numbers, in consecutive chunks.

    One generator draws the chunks one after the other, so that their rows
    are those of bootstrap_weights(case_of_image, num_cases, num_samples, seed).

    Args:
      case_of_image, num_cases, num_samples, seed: as bootstrap_weights.
      max_elements: at most this many weights per chunk (at least one row).

    Yields:
      [rows, n] float64 weights, rows <= max(1, max_elements // n).
    """
    rng = np.random.default_rng(seed)
    rows = max(1, max_elements // max(len(case_of_image), 1))
    for start in range(0, num_samples, rows):
        yield _draw(rng, case_of_image, num_cases, min(rows, num_samples - start))


def _draw(rng: np.random.Generator, case_of_image, num_cases: int, rows: int) -> np.ndarray:
    """[rows, n] float64: the next `rows` resamples' draw count of each image's case."""
    counts = rng.multinomial(num_cases, np.full(num_cases, 1.0 / num_cases), size=rows)
    return counts[:, case_of_image].astype(np.float64)


def confidence_interval(
    metric_fn: Callable[[np.ndarray], np.ndarray],
    case_ids: Sequence,
    num_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of a weighted metric, resampling cases.

    Args:
      metric_fn: per-image weights of a batch of resamples [S, n] -> [S] or
        [S, k] metrics (e.g. one AUC per class), NaN where undefined in a
        sample; called on chunks of at most MAX_CHUNK_ELEMENTS weights.
      case_ids: [n] case id of every image.
      num_samples: bootstrap samples (1000 by default).
      seed: for the resampling.
      level: coverage of the interval (0.95: the 2.5th and 97.5th percentiles).

    Returns:
      (low, high), each shaped like metric_fn's output for one sample ([] or
      [k]); NaN where the metric was undefined in every sample. With
      num_samples == 0 both are NaN.
    """
    if not 0 < level < 1:
        raise ValueError(f"bootstrap level={level} must be in (0, 1), e.g. 0.95")
    index, num_cases = case_index(case_ids)
    shape = _batched(metric_fn, np.ones((1, len(index)))).shape[1:]
    if num_samples <= 0 or num_cases == 0:
        nan = np.full(shape, np.nan)
        return nan, nan.copy()
    chunks = bootstrap_weight_chunks(index, num_cases, num_samples, seed, MAX_CHUNK_ELEMENTS)
    values = np.concatenate([_batched(metric_fn, w) for w in chunks]).reshape(num_samples, -1)
    tail = 100 * (1 - level) / 2
    missing = np.isnan(values)
    bounds = np.full((2, values.shape[1]), np.nan)
    # np.percentile for the columns without NaN, at once; np.nanpercentile (a
    # Python loop over columns) only for those undefined in some samples.
    full = ~missing.any(axis=0)
    partly = missing.any(axis=0) & ~missing.all(axis=0)
    if full.any():
        bounds[:, full] = np.percentile(values[:, full], [tail, 100 - tail], axis=0)
    if partly.any():
        bounds[:, partly] = np.nanpercentile(values[:, partly], [tail, 100 - tail], axis=0)
    return bounds[0].reshape(shape), bounds[1].reshape(shape)


def _batched(metric_fn: Callable[[np.ndarray], np.ndarray], weights: np.ndarray) -> np.ndarray:
    """metric_fn(weights [S, n]) as float64 [S] or [S, k], checked to have S rows."""
    values = np.asarray(metric_fn(weights), np.float64)
    if values.ndim not in (1, 2) or len(values) != len(weights):
        raise ValueError(
            f"the bootstrap's metric function gave shape {values.shape} for weights "
            f"{weights.shape}; it must map [S, n] to [S] or [S, k]"
        )
    return values
