"""Operating points (evaluators/operating_points.py): thresholds against scikit-learn's
roc_curve, test-set rates against confusion_matrix, and the config field's errors."""

import numpy as np
import pytest
from sklearn import metrics as skm

from micle_jax.evaluators import clinical, operating_points
from micle_jax.evaluators.metric_set import MetricSet
from micle_jax.evaluators.outputs import Predictions


def _sklearn_threshold(scores, positives, weights, kind, target):
    """The validation ROC point of the issue: the most sensitive one with specificity >=
    target (ties: the most specific), or the most specific one with sensitivity >= target
    (ties: the most sensitive); every threshold kept."""
    fpr, tpr, thresholds = skm.roc_curve(
        positives, scores, sample_weight=weights, drop_intermediate=False
    )
    if kind == "specificity":
        ok = np.flatnonzero(1 - fpr >= target - 1e-12)
        best = np.lexsort((-(1 - fpr[ok]), -tpr[ok]))[0]  # max tpr, then max specificity
    else:
        ok = np.flatnonzero(tpr >= target - 1e-12)
        best = np.lexsort((-tpr[ok], -(1 - fpr[ok])))[0]  # max specificity, then max tpr
    return thresholds[ok[best]]


@pytest.mark.parametrize("kind", ["specificity", "sensitivity"])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95])
def test_thresholds_match_sklearn_roc_curve_with_ties_and_weights(kind, target):
    rng = np.random.default_rng(0)
    n = 600
    positives = rng.random(n) < 0.3
    scores = np.round(rng.normal(positives * 1.2, 1.0), 1)  # many ties
    weights = rng.integers(0, 3, n).astype(float)
    got = operating_points.threshold_for_target(scores, positives, weights, kind, target)
    want = _sklearn_threshold(scores, positives, weights, kind, target)
    assert got == want
    # The threshold meets the target on the fitting data (weights = repeated images).
    rep = np.repeat(np.arange(n), weights.astype(int))
    predicted = scores[rep] >= got
    tn, fp, fn, tp = skm.confusion_matrix(positives[rep], predicted).ravel()
    rate = tn / (tn + fp) if kind == "specificity" else tp / (tp + fn)
    assert rate >= target


def test_no_threshold_without_positives_or_negatives():
    scores = np.array([0.1, 0.5, 0.9])
    for positives in ([0, 0, 0], [1, 1, 1]):
        for kind in operating_points.KINDS:
            t = operating_points.threshold_for_target(scores, positives, np.ones(3), kind, 0.9)
            assert np.isnan(t)


def _predictions(logits, labels, weights, label_type):
    ids = np.array([f"i{i}" for i in range(len(logits))], dtype=object)
    return Predictions(np.asarray(logits, np.float64), labels, weights, ids, ids, label_type)


def test_multiclass_one_vs_rest_rates_on_test_match_sklearn():
    """Thresholds chosen on validation softmax probabilities, applied to test; every rate is
    confusion_matrix's on (test probability >= threshold), the bootstrap's weights as counts."""
    rng = np.random.default_rng(1)
    c, names = 3, ["akiec", "mel", "nv"]

    def draw(n):
        labels = rng.integers(0, c, n)
        logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]
        return labels, logits

    val_labels, val_logits = draw(400)
    keep = (rng.random(400) > 0.1).astype(float)  # unmapped labels do not fit thresholds
    validation = _predictions(val_logits, val_labels, keep, "multiclass")
    targets, classes = operating_points.parse("test", True, names)
    thresholds = operating_points.fit_thresholds(validation, targets, classes)
    val_probs = np.exp(val_logits) / np.exp(val_logits).sum(1, keepdims=True)
    for (kind, target), by_class in thresholds.items():
        for k in range(c):
            want = _sklearn_threshold(val_probs[:, k], val_labels == k, keep, kind, target)
            assert by_class[k] == pytest.approx(want, rel=1e-12), (kind, target, k)

    test_labels, test_logits = draw(500)
    test = _predictions(test_logits, test_labels, np.ones(500), "multiclass")
    metric_set = operating_points.metric_set(test, names, thresholds, "validation")
    weights = rng.integers(0, 3, 500).astype(float)
    values = metric_set.compute(weights[None])[0]
    rep = np.repeat(np.arange(500), weights.astype(int))
    probs = np.exp(test_logits[rep]) / np.exp(test_logits[rep]).sum(1, keepdims=True)
    checked = 0
    for name, tags, info, value in zip(
        metric_set.names, metric_set.tags, metric_set.info, values, strict=True
    ):
        rate, cls = name.split("/")
        k = names.index(cls)
        kind, target = tags["target"].split("=")
        assert info["threshold"] == thresholds[(kind, float(target))][k]
        assert info["fit_on"] == "validation"
        predicted = probs[:, k] >= info["threshold"]
        tn, fp, fn, tp = skm.confusion_matrix(test_labels[rep] == k, predicted).ravel()
        want = {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
        }[rate]
        assert value == pytest.approx(want), name
        checked += 1
    assert checked == 4 * 4 * c  # 4 targets x 4 rates x 3 classes


def test_multilabel_rates_leave_unknown_labels_out():
    rng = np.random.default_rng(2)
    n = 300
    targets = (rng.random((n, 2)) < 0.4).astype(float)
    logits = rng.normal(size=(n, 2)) + 2 * targets
    mask = (rng.random((n, 2)) > 0.3).astype(float)
    pred = _predictions(logits, targets, mask, "multilabel")
    thresholds = {("sensitivity", 0.9): {0: 0.3, 1: 0.6}}
    metric_set = operating_points.metric_set(pred, ["edema", "effusion"], thresholds, "validation")
    values = dict(zip(metric_set.names, metric_set.compute(np.ones((1, n)))[0], strict=True))
    for k, name in enumerate(["edema", "effusion"]):
        known = mask[:, k] > 0
        predicted = 1 / (1 + np.exp(-logits[known, k])) >= thresholds[("sensitivity", 0.9)][k]
        assert values[f"sensitivity/{name}"] == pytest.approx(
            skm.recall_score(targets[known, k], predicted)
        )
        assert values[f"ppv/{name}"] == pytest.approx(
            skm.precision_score(targets[known, k], predicted)
        )


def test_operating_points_field_errors():
    names = ["a", "b"]
    assert operating_points.parse("t", False, names) == ([], [])
    targets, classes = operating_points.parse(
        "t", dict(specificity=0.8, sensitivity=(), classes="b"), names
    )
    assert targets == [("specificity", 0.8)] and classes == [1]
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['specifity'\]"):
        operating_points.parse("t", dict(specifity=(0.9,)), names)
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        operating_points.parse("t", dict(sensitivity=(90,)), names)
    with pytest.raises(ValueError, match="not model classes"):
        operating_points.parse("t", dict(specificity=(0.9,), classes=("melanoma",)), names)
    with pytest.raises(ValueError, match="names no target"):
        operating_points.parse("t", dict(specificity=()), names)


def test_multilabel_thresholds_are_fitted_per_class_on_known_validation_labels():
    """Through ClinicalMetrics as an eval runs it: each finding's threshold is the validation
    ROC point of its own known labels (unknown ones left out), and its test rates are
    sklearn's on its known test labels at that threshold."""
    rng = np.random.default_rng(3)
    names = ["edema", "effusion", "hernia"]

    def draw(n, positive_rate):
        targets = (rng.random((n, 3)) < positive_rate).astype(float)
        logits = rng.normal(size=(n, 3)) + np.array([1.0, 2.0, 3.0]) * targets
        mask = (rng.random((n, 3)) > 0.25).astype(float)
        # Unknown labels scored high: counting them would move every threshold.
        logits[mask == 0] += 4.0
        return _predictions(logits, targets, mask, "multilabel")

    validation, test = draw(500, [0.3, 0.5, 0.2]), draw(400, [0.3, 0.5, 0.2])
    validation.labels[:, 2] = validation.labels[:, 2] * (1 - validation.weights[:, 2])
    entry = dict(fit_on="validation", operating_points=dict(specificity=0.9, sensitivity=0.95))
    metrics = clinical.ClinicalMetrics("test", entry, None, names)
    base = lambda p: MetricSet([], lambda w: np.zeros((len(w), 0)))  # noqa: E731 - none else
    output = metrics.evaluate(test, base, 0, 0, fit=validation)
    rows = {(m.name, m.tags["target"]): m for m in output.metrics}
    # 'hernia' has no known positive in validation: no threshold and no rates.
    assert not [key for key in rows if key[0].endswith("/hernia")]
    checked = 0
    for k, name in enumerate(names[:2]):
        known = validation.weights[:, k] > 0
        scores = 1 / (1 + np.exp(-validation.logits[known, k]))
        test_known = test.weights[:, k] > 0
        test_scores = 1 / (1 + np.exp(-test.logits[test_known, k]))
        for kind, target in (("specificity", 0.9), ("sensitivity", 0.95)):
            label = f"{kind}={target:g}"
            want = _sklearn_threshold(
                scores, validation.labels[known, k], np.ones(known.sum()), kind, target
            )
            threshold = rows[(f"threshold/{name}", label)]
            assert threshold.value == pytest.approx(want, rel=1e-12)
            assert threshold.info == {"fit_on": "validation"}
            predicted = test_scores >= want
            y = test.labels[test_known, k]
            tn, fp, fn, tp = skm.confusion_matrix(y, predicted).ravel()
            expected = {
                "sensitivity": tp / (tp + fn),
                "specificity": tn / (tn + fp),
                "ppv": tp / (tp + fp),
                "npv": tn / (tn + fn),
            }
            for rate, value in expected.items():
                row = rows[(f"{rate}/{name}", label)]
                assert row.value == pytest.approx(value), (rate, name, label)
                assert row.info["threshold"] == threshold.value
                checked += 1
    assert checked == 2 * 2 * 4
