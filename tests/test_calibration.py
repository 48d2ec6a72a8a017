"""Calibration metrics (evaluators/calibration.py): ECE by hand and against scikit-learn's
calibration_curve, Brier and NLL against brier_score_loss and log_loss, temperature scaling."""

import numpy as np
import pytest
from sklearn import calibration as skc
from sklearn import metrics as skm

from micle_jax.evaluators import calibration, clinical
from micle_jax.evaluators.metric_set import MetricSet
from micle_jax.evaluators.outputs import Predictions


def _multiclass(logits, labels, weights=None):
    n = len(labels)
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    return Predictions(
        np.asarray(logits, np.float64), np.asarray(labels), w, ids, ids, "multiclass"
    )


def _values(metric_set, weights):
    """{(name, calibration tag): value} of a MetricSet at `weights`."""
    values = metric_set.compute(np.asarray(weights, np.float64)[None])[0]
    return {
        (n, t["calibration"]): v
        for n, t, v in zip(metric_set.names, metric_set.tags, values, strict=True)
    }


def _softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ece_by_hand_on_five_images():
    """Top-1 confidences 0.95, 0.95, 0.85, 0.62, 0.55 (right, wrong, right, right, wrong).

    15 bins of width 1/15: both 0.95 in (14/15, 1] (accuracy 1/2), 0.85 in
    (12/15, 13/15], 0.62 in (9/15, 10/15], 0.55 in (8/15, 9/15]:
    ECE = 2/5 |0.5 - 0.95| + 1/5 |1 - 0.85| + 1/5 |1 - 0.62| + 1/5 |0 - 0.55|
        = 0.18 + 0.03 + 0.076 + 0.11 = 0.396.
    """
    confidence = np.array([0.95, 0.95, 0.85, 0.62, 0.55])
    # Two classes: logits whose softmax gives these confidences for class 0.
    logits = np.stack([np.log(confidence), np.log(1 - confidence)], axis=1)
    labels = np.array([0, 1, 0, 0, 1])
    values = _values(calibration.metric_set(_multiclass(logits, labels), ["a", "b"]), np.ones(5))
    assert values[("ece", "before_temperature")] == pytest.approx(0.396, abs=1e-12)
    # Brier by hand: per image (p0 - y0)^2 + (p1 - y1)^2 = 2 (1 - p_true)^2.
    p_true = np.array([0.95, 0.05, 0.85, 0.62, 0.45])
    assert values[("brier", "before_temperature")] == pytest.approx(np.mean(2 * (1 - p_true) ** 2))
    assert values[("nll", "before_temperature")] == pytest.approx(-np.mean(np.log(p_true)))
    # Image 1 counted twice (a bootstrap weight): bin 14 holds 3 images, 1 right.
    twice = _values(
        calibration.metric_set(_multiclass(logits, labels), ["a", "b"]), [1, 2, 1, 1, 1]
    )
    by_hand = (3 * abs(1 / 3 - 0.95) + 0.15 + 0.38 + 0.55) / 6
    assert twice[("ece", "before_temperature")] == pytest.approx(by_hand, abs=1e-12)


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_and_ece_match_sklearn_calibration_curve(strategy):
    rng = np.random.default_rng(0)
    # Ties and scores on bin edges: an edge score belongs to the lower bin, as sklearn's.
    scores = np.concatenate(
        [np.round(rng.beta(4, 2, 360), 2), np.linspace(0, 1, 16)[[3, 7, 9, 12]]]
    )
    scores = np.concatenate([scores, scores[-4:]] * 5)
    n = len(scores)
    outcomes = (rng.random(n) < scores**1.5).astype(float)  # over-confident
    weights = np.ones(n)
    edges = (
        calibration.equal_width_edges(15)
        if strategy == "uniform"
        else calibration.equal_mass_edges(scores, weights, 15)
    )
    prob_true, prob_pred = skc.calibration_curve(outcomes, scores, n_bins=15, strategy=strategy)
    curve = calibration.reliability(scores, outcomes, weights, edges)
    filled = np.array(curve["count"]) > 0
    np.testing.assert_allclose(np.array(curve["outcome"])[filled], prob_true)
    np.testing.assert_allclose(np.array(curve["score"])[filled], prob_pred)
    # ECE: the bins' |prob_true - prob_pred| weighted by their share of images.
    share = np.array(curve["count"])[filled] / n
    want = np.sum(share * np.abs(prob_true - prob_pred))
    got = calibration.expected_calibration_error(scores, outcomes, weights, edges)
    assert got == pytest.approx(want, abs=1e-12)


def test_equal_mass_edges_are_the_percentiles_of_the_repeated_scores():
    """EqualMassEdges sorts once; each row of integer weights, alone ([n]) or in a batch of
    resamples ([S, n]), gives np.percentile's edges of its repeated scores."""
    rng = np.random.default_rng(4)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        scores = rng.random(n) if trial % 2 else np.round(rng.random(n), 1)  # ties
        bins = int(rng.integers(2, 16))
        edges = calibration.EqualMassEdges(scores, bins)
        batch = rng.integers(0, 4, (4, n)).astype(float)
        batch[trial % 4] = 0  # a resample without any of these images
        batched = edges.edges(batch)
        assert batched.shape == (4, bins + 1)
        for weights, row in zip(batch, batched, strict=True):
            np.testing.assert_array_equal(edges.edges(weights), row)
            repeated = np.repeat(scores, weights.astype(int))
            if not repeated.size:
                assert np.isnan(row).all()
                continue
            want = np.percentile(repeated, np.linspace(0, 100, bins + 1))
            np.testing.assert_allclose(row, want, rtol=0, atol=1e-12)


def test_weighted_ece_equals_ece_of_the_repeated_images():
    """Bootstrap weights are image counts: ECE (both binnings) on the repeated images."""
    rng = np.random.default_rng(1)
    n, c = 300, 4
    labels = rng.integers(0, c, n)
    logits = 2 * rng.normal(size=(n, c)) + 2 * np.eye(c)[labels]
    weights = rng.integers(0, 3, n)
    got = _values(calibration.metric_set(_multiclass(logits, labels), list("abcd")), weights)
    rep = np.repeat(np.arange(n), weights)
    probs = _softmax(logits[rep])
    confidence, correct = probs.max(1), (probs.argmax(1) == labels[rep]).astype(float)
    for name, strategy in (("ece", "uniform"), ("ece_adaptive", "quantile")):
        prob_true, prob_pred = skc.calibration_curve(
            correct, confidence, n_bins=15, strategy=strategy
        )
        if strategy == "uniform":
            edges = np.linspace(0, 1, 16)
        else:
            edges = np.percentile(confidence, np.linspace(0, 100, 16))
        counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=15)
        share = counts[counts > 0] / len(rep)
        want = np.sum(share * np.abs(prob_true - prob_pred))
        assert got[(name, "before_temperature")] == pytest.approx(want, abs=1e-12), name
    want_brier = skm.brier_score_loss(labels[rep], probs, labels=range(c))
    assert got[("brier", "before_temperature")] == pytest.approx(want_brier)
    want_nll = skm.log_loss(labels[rep], probs, labels=range(c))
    assert got[("nll", "before_temperature")] == pytest.approx(want_nll)


def test_multilabel_calibration_per_class_matches_sklearn_with_masks():
    rng = np.random.default_rng(2)
    n, names = 500, ["edema", "effusion", "hernia"]
    logits = rng.normal(size=(n, 3)) * 2
    targets = (rng.random((n, 3)) < 1 / (1 + np.exp(-logits / 2))).astype(float)
    mask = (rng.random((n, 3)) > 0.2).astype(float)
    mask[:, 2] = 0  # no known label: the class has no calibration metrics
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    pred = Predictions(logits, targets, mask, ids, ids, "multilabel")
    values = _values(calibration.metric_set(pred, names), np.ones(n))
    eces = []
    for c, name in enumerate(names[:2]):
        known = mask[:, c] > 0
        p = 1 / (1 + np.exp(-logits[known, c]))
        y = targets[known, c]
        prob_true, prob_pred = skc.calibration_curve(y, p, n_bins=15)
        counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], p), minlength=15)
        eces.append(np.sum(counts[counts > 0] / known.sum() * np.abs(prob_true - prob_pred)))
        assert values[(f"ece/{name}", "before_temperature")] == pytest.approx(eces[-1])
        assert values[(f"brier/{name}", "before_temperature")] == pytest.approx(
            skm.brier_score_loss(y, p)
        )
        assert values[(f"nll/{name}", "before_temperature")] == pytest.approx(skm.log_loss(y, p))
    assert np.isnan(values[("ece/hernia", "before_temperature")])
    assert values[("ece", "before_temperature")] == pytest.approx(np.mean(eces))


def test_temperature_scaling_recovers_the_temperature_and_is_the_nll_minimum():
    """Labels drawn from softmax(z / 2): the fitted T is about 2 and no T on a fine grid
    has a lower validation NLL; on test the scaled probabilities are better calibrated."""
    rng = np.random.default_rng(3)
    c = 5

    def draw(n):
        logits = 3 * rng.normal(size=(n, c))
        probs = _softmax(logits / 2.0)
        labels = np.array([rng.choice(c, p=p) for p in probs])
        return _multiclass(logits, labels)

    validation, test = draw(4000), draw(4000)
    temperature = calibration.fit_temperatures(validation)
    assert temperature.shape == (1,)
    assert temperature[0] == pytest.approx(2.0, abs=0.15)
    grid = np.linspace(0.5, 4, 3501)
    rows = np.arange(len(validation.labels))
    nll = [
        -np.mean(calibration.log_softmax(validation.logits, t)[rows, validation.labels])
        for t in grid
    ]
    assert grid[int(np.argmin(nll))] == pytest.approx(temperature[0], abs=2e-3)
    values = _values(
        calibration.metric_set(test, list("abcde"), temperature=temperature), np.ones(4000)
    )
    assert values[("ece", "after_temperature")] < 0.5 * values[("ece", "before_temperature")]
    assert values[("nll", "after_temperature")] < values[("nll", "before_temperature")]
    # The scaled metrics are those of logits / T, computed the plain way.
    scaled = _values(
        calibration.metric_set(
            _multiclass(test.logits / temperature[0], test.labels), list("abcde")
        ),
        np.ones(4000),
    )
    for name in ("ece", "ece_adaptive", "brier", "nll"):
        assert values[(name, "after_temperature")] == pytest.approx(
            scaled[(name, "before_temperature")]
        )


def test_multilabel_temperatures_are_per_class_and_nan_without_both_labels():
    rng = np.random.default_rng(4)
    n = 3000
    logits = 3 * rng.normal(size=(n, 3))
    true_t = np.array([0.5, 3.0, 1.0])
    targets = (rng.random((n, 3)) < 1 / (1 + np.exp(-logits / true_t))).astype(float)
    targets[:, 2] = 1.0  # only positives: no temperature
    ids = np.arange(n).astype(str).astype(object)
    fitted = calibration.fit_temperatures(
        Predictions(logits, targets, np.ones((n, 3)), ids, ids, "multilabel")
    )
    np.testing.assert_allclose(fitted[:2], true_t[:2], rtol=0.1)
    assert np.isnan(fitted[2])


def test_multilabel_eval_fits_a_temperature_per_class_on_validation_and_applies_it_to_test():
    """ClinicalMetrics as an eval runs it: each finding's temperature is the minimum of its
    validation log-loss on known labels (a grid here), and test's after-temperature ECE and
    Brier are sklearn's on sigmoid(logit / T); a finding without both labels is left out."""
    rng = np.random.default_rng(5)
    names, true_t = ["edema", "effusion", "hernia"], np.array([0.5, 3.0, 1.0])

    def draw(n):
        logits = 3 * rng.normal(size=(n, 3))
        targets = (rng.random((n, 3)) < 1 / (1 + np.exp(-logits / true_t))).astype(float)
        mask = (rng.random((n, 3)) > 0.3).astype(float)
        targets[mask == 0] = 1 - targets[mask == 0]  # unknown labels, wrong on purpose
        ids = np.array([f"i{i}" for i in range(n)], dtype=object)
        return Predictions(logits, targets, mask, ids, ids, "multilabel")

    validation, test = draw(2000), draw(1500)
    validation.labels[:, 2] = 1.0  # only positives: no temperature for 'hernia'
    metrics = clinical.ClinicalMetrics(
        "test", dict(fit_on="validation", calibration=True), None, names
    )
    no_other_metrics = lambda p: MetricSet([], lambda w: np.zeros((len(w), 0)))  # noqa: E731
    output = metrics.evaluate(test, no_other_metrics, 0, 0, fit=validation)
    rows = {(m.name, m.tags.get("calibration")): m for m in output.metrics}
    assert ("temperature/hernia", "after_temperature") not in rows
    assert ("ece/hernia", "after_temperature") not in rows
    assert ("ece/hernia", "before_temperature") in rows  # test has both labels
    grid = np.exp(np.linspace(np.log(0.1), np.log(10), 4001))
    for c, name in enumerate(names[:2]):
        known = validation.weights[:, c] > 0
        z, y = validation.logits[known, c], validation.labels[known, c]
        x = z[None, :] / grid[:, None]  # [grid, images]: -log p = log(1 + e^-x)
        nll = np.mean(y * np.logaddexp(0, -x) + (1 - y) * np.logaddexp(0, x), axis=1)
        t = grid[np.argmin(nll)]
        assert nll.min() == pytest.approx(skm.log_loss(y, 1 / (1 + np.exp(-z / t))))
        temperature = rows[(f"temperature/{name}", "after_temperature")]
        assert temperature.value == pytest.approx(t, rel=2e-3)
        assert temperature.value == pytest.approx(true_t[c], rel=0.15)
        assert temperature.info == {"fit_on": "validation"}
        known = test.weights[:, c] > 0
        y = test.labels[known, c]
        p = 1 / (1 + np.exp(-test.logits[known, c] / temperature.value))
        prob_true, prob_pred = skc.calibration_curve(y, p, n_bins=15)
        counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], p), minlength=15)
        ece = np.sum(counts[counts > 0] / known.sum() * np.abs(prob_true - prob_pred))
        assert rows[(f"ece/{name}", "after_temperature")].value == pytest.approx(ece)
        assert rows[(f"brier/{name}", "after_temperature")].value == pytest.approx(
            skm.brier_score_loss(y, p)
        )
    # The reliability diagrams: one per finding before, one per fitted finding after.
    curves = [(c["calibration"], c["class"]) for c in output.artifacts["reliability"]]
    assert curves == [("before_temperature", n) for n in names] + [
        ("after_temperature", n) for n in names[:2]
    ]
