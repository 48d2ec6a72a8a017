"""Evaluator metrics against scikit-learn, the case bootstrap, label maps, k-NN and probes;
calibration, operating points and subgroups through the evaluators (fit_on)."""

import os
import pathlib
import zlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression

from micle_jax import config_lib, evaluators, report_plots, sharding
from micle_jax.evaluators import (
    bootstrap,
    calibration,
    clinical,
    metric_set,
    metrics,
    multilabel,
    operating_points,
    subgroups,
)
from micle_jax.evaluators.classification import (
    classification_metrics,
    classification_set,
)
from micle_jax.evaluators.clinical import check_fit_on
from micle_jax.evaluators.eval_data import Context
from micle_jax.evaluators.knn import knn_scores, vote_log_shares
from micle_jax.evaluators.labels import LabelMap
from micle_jax.evaluators.linear_probe import fit_linear_probe
from micle_jax.evaluators.multilabel import multilabel_set
from micle_jax.evaluators.outputs import Predictions
from micle_jax.evaluators.predictor import Predictor
from micle_jax.models import conv
from micle_jax.task import TaskInfo


@pytest.fixture
def multiclass_data():
    rng = np.random.default_rng(0)
    n, c = 300, 6
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]  # better than chance
    return logits, labels


def test_topk_confusion_and_per_class_match_sklearn(multiclass_data):
    logits, labels = multiclass_data
    preds = logits.argmax(1)
    for k in (1, 3, 5):
        expected = skm.top_k_accuracy_score(labels, logits, k=k, labels=range(6))
        assert np.mean(metrics.topk_correct(logits, labels, k)) == pytest.approx(expected)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(labels, preds, 6), skm.confusion_matrix(labels, preds)
    )
    np.testing.assert_allclose(
        metrics.per_class_accuracy(logits, labels),
        skm.recall_score(labels, preds, average=None),
    )
    # Weights are example counts: weight 2 == the example twice, 0 == absent.
    w = np.random.default_rng(1).integers(0, 3, len(labels))
    rep = np.repeat(np.arange(len(labels)), w)
    np.testing.assert_allclose(
        metrics.per_class_accuracy(logits, labels, w),
        skm.recall_score(labels[rep], preds[rep], average=None),
    )
    names = [f"c{i}" for i in range(6)]
    out = classification_metrics(logits, labels, np.arange(len(labels)), names, w, (3,), 0)
    assert out.get("accuracy") == pytest.approx(skm.accuracy_score(labels[rep], preds[rep]))
    assert out.get("top3") == pytest.approx(
        skm.top_k_accuracy_score(labels[rep], logits[rep], k=3, labels=range(6))
    )


def test_per_class_accuracy_leaves_classes_without_images_out():
    """An empty class (no label, or only weight-0 images) is NaN, never 0: no row."""
    labels = np.array([0, 0, 1, 1, 1])
    logits = np.zeros((5, 4), np.float32)  # all ties: argmax predicts class 0
    logits[2, 1] = 1.0
    weights = np.array([1, 1, 1, 2, 0])
    np.testing.assert_array_equal(
        metrics.per_class_accuracy(logits, labels, weights), [1.0, 1 / 3, np.nan, np.nan]
    )
    names = ["a", "b", "c", "d"]
    out = classification_metrics(logits, labels, np.arange(5), names, weights, (), 0)
    assert out.get("per_class_accuracy/a") == 1.0
    assert out.get("per_class_accuracy/b") == 1 / 3
    assert out.get("balanced_accuracy") == pytest.approx(2 / 3)
    assert {m.name for m in out.metrics}.isdisjoint(
        {"per_class_accuracy/c", "per_class_accuracy/d"}
    )


def test_all_equal_logits_top1_is_the_first_class_as_sklearn():
    """A tie is no hit: argmax picks class 0, as accuracy_score on np.argmax predictions."""
    num_classes = 4
    labels = np.arange(40) % num_classes
    logits = np.zeros((40, num_classes), np.float32)
    want = skm.accuracy_score(labels, np.argmax(logits, axis=1))
    assert want == 1 / num_classes
    assert np.mean(metrics.topk_correct(logits, labels, 1)) == want
    names = [f"c{i}" for i in range(num_classes)]
    out = classification_metrics(logits, labels, np.arange(40), names, bootstrap_samples=0)
    assert out.get("accuracy") == want
    # top3 follows top_k_accuracy_score: ties rank the highest class index first.
    assert out.get("top3") == skm.top_k_accuracy_score(labels, logits, k=3) == 3 / 4


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6])
@pytest.mark.filterwarnings("ignore:'k' .6. greater than or equal to 'n_classes'")
def test_topk_with_ties_matches_sklearn(k):
    rng = np.random.default_rng(k)
    logits = rng.integers(0, 3, (400, 6)).astype(np.float32)  # most rows have ties
    labels = rng.integers(0, 6, 400)
    if k == 1:
        want = skm.accuracy_score(labels, np.argmax(logits, axis=1))
    else:
        want = skm.top_k_accuracy_score(labels, logits, k=k, labels=range(6))
    correct = metrics.topk_correct(logits, labels, k)
    assert np.mean(correct) == pytest.approx(want, abs=1e-12)
    w = rng.integers(0, 3, 400)
    weighted = skm.accuracy_score(labels, np.argmax(logits, axis=1), sample_weight=w)
    if k > 1:
        weighted = skm.top_k_accuracy_score(labels, logits, k=k, labels=range(6), sample_weight=w)
    assert np.sum(w * correct) / np.sum(w) == pytest.approx(weighted, abs=1e-12)


def test_roc_auc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + targets, 1)  # rounding makes ties
    assert metrics.roc_auc(scores, targets) == pytest.approx(skm.roc_auc_score(targets, scores))
    w = rng.integers(0, 4, 500).astype(float)
    assert metrics.roc_auc(scores, targets, w) == pytest.approx(
        skm.roc_auc_score(targets, scores, sample_weight=w)
    )
    assert np.isnan(metrics.roc_auc(scores, np.ones(500)))  # no negative: undefined


@pytest.mark.parametrize("ties", [True, False])
def test_one_weighted_auc_serves_every_bootstrap_sample(ties):
    """WeightedAuc sorts once; each row of weights (bootstrap counts, zeros), alone [n] or in
    a batch [S, n], gives sklearn's AUC; NaN for a row without positives or negatives."""
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + targets
    scores = np.round(scores, 1) if ties else scores
    auc = metrics.WeightedAuc(scores, targets)
    batch = rng.integers(0, 3, (20, 300)).astype(float)
    batch[5] = np.where(targets == 1, 1.0, 0.0)  # only positives
    batch[9] = 0.0
    batched = auc(batch)
    assert batched.shape == (20,)
    for i, w in enumerate(batch):
        assert auc(w) == batched[i] or np.isnan(auc(w)) and np.isnan(batched[i])
        if i in (5, 9):
            assert np.isnan(batched[i])
            continue
        assert batched[i] == pytest.approx(skm.roc_auc_score(targets, scores, sample_weight=w))


def test_multilabel_auc_masks_unknown_labels():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 2, (200, 3)).astype(np.float32)
    scores = rng.normal(size=(200, 3)) + targets
    mask = rng.random((200, 3)) > 0.3
    aucs = metrics.multilabel_auc(scores, targets, mask)
    for c in range(3):
        keep = mask[:, c]
        assert aucs[c] == pytest.approx(skm.roc_auc_score(targets[keep, c], scores[keep, c]))


def test_bootstrap_resamples_cases_not_images():
    # 20 cases of 10 identical images each: resampling images would make the
    # interval of the mean far too narrow; by case it matches 20 draws.
    case_ids = np.repeat(np.arange(20), 10)
    values = np.repeat(np.random.default_rng(4).normal(size=20), 10)
    low, high = bootstrap.confidence_interval(
        lambda w: (w @ values) / w.sum(axis=1), case_ids, num_samples=2000, seed=0
    )
    case_values = values[::10]
    rng = np.random.default_rng(5)
    ref = [rng.choice(case_values, 20).mean() for _ in range(2000)]
    ref_low, ref_high = np.percentile(ref, [2.5, 97.5])
    assert low == pytest.approx(ref_low, abs=0.08) and high == pytest.approx(ref_high, abs=0.08)
    assert low < values.mean() < high
    # Reproducible per seed; every sample draws as many cases as there are.
    again = bootstrap.confidence_interval(
        lambda w: (w @ values) / w.sum(axis=1), case_ids, num_samples=2000, seed=0
    )
    assert (float(again[0]), float(again[1])) == (float(low), float(high))
    index, num_cases = bootstrap.case_index(case_ids)
    weights = bootstrap.bootstrap_weights(index, num_cases, 5, 0)
    assert np.all(weights.sum(axis=1) == 200)
    assert np.all(weights.reshape(5, 20, 10).std(axis=2) == 0)  # a case's images move together


def test_bootstrap_chunks_are_the_same_resamples_and_intervals(monkeypatch):
    """The resamples, drawn in chunks of bounded size, are the numbers one draw of all of
    them gives (the formula bootstrap_weights always used), so intervals do not change."""
    case_ids = np.repeat(np.arange(30), 1 + np.arange(30) % 3)
    n, samples, seed = len(case_ids), 50, 7
    index, num_cases = bootstrap.case_index(case_ids)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(num_cases, np.full(num_cases, 1 / num_cases), size=samples)
    want = draws[:, index].astype(np.float64)
    draw = (index, num_cases, samples, seed)
    np.testing.assert_array_equal(bootstrap.bootstrap_weights(*draw), want)
    for max_elements, sizes in ((7 * n, [7] * 7 + [1]), (1, [1] * samples), (10**9, [samples])):
        chunks = list(bootstrap.bootstrap_weight_chunks(*draw, max_elements))
        assert [len(c) for c in chunks] == sizes
        np.testing.assert_array_equal(np.concatenate(chunks), want)

    values = np.random.default_rng(8).normal(size=n)
    rows_seen = []

    def mean(w):
        rows_seen.append(len(w))
        return (w @ values) / w.sum(axis=1)

    whole = bootstrap.confidence_interval(mean, case_ids, samples, seed)
    assert rows_seen == [1, samples]  # the shape probe, then one chunk
    ref = np.percentile([np.sum(w * values) / np.sum(w) for w in want], [2.5, 97.5])
    np.testing.assert_allclose(whole, ref, rtol=1e-12)
    monkeypatch.setattr(bootstrap, "MAX_CHUNK_ELEMENTS", 3 * n + 1)
    rows_seen.clear()
    chunked = bootstrap.confidence_interval(mean, case_ids, samples, seed)
    assert rows_seen == [1] + [3] * 16 + [2]
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)  # w @ values: BLAS rounding


def _resample_rows(known, present, rng, num_random=30):
    """[S, n] weights: bootstrap-like counts, then four rows: zero total weight, only images
    without a `known` label, a single image, and only the `present` images."""
    n = len(known)
    rows = list(rng.integers(0, 4, (num_random, n)).astype(np.float64))
    rows.append(np.zeros(n))
    rows.append(np.where(known, 0.0, 2.0))
    rows.append(np.eye(n)[int(np.flatnonzero(known)[0])])
    rows.append(present * rng.integers(1, 3, n).astype(np.float64))
    return np.stack(rows)


def _batched_and_row_by_row(joined, weights):
    """(compute on the whole [S, n] batch, compute on each [1, n] row, stacked)."""
    batched = joined.compute(weights)
    assert batched.shape == (len(weights), len(joined.names))
    one_by_one = np.concatenate([joined.compute(weights[i : i + 1]) for i in range(len(weights))])
    return batched, one_by_one


def _column(joined, name, calibration_tag=None):
    """The index of metric `name` (with tag calibration=calibration_tag if given)."""
    for j, (n, tags) in enumerate(zip(joined.names, joined.tags, strict=True)):
        if n == name and tags.get("calibration") == calibration_tag:
            return j
    raise KeyError(name)


def test_metric_sets_on_a_batch_of_resamples_equal_them_one_at_a_time():
    """Every metric set computes S resamples at once; each row equals that resample alone
    ([1, n]), NaN included: rows with zero weight, a class absent, one image."""
    rng = np.random.default_rng(13)
    num_classes, names = 4, ["a", "b", "c", "d"]

    def multiclass(n):
        labels = rng.choice(num_classes, n, p=[0.4, 0.3, 0.2, 0.1])
        logits = 2 * rng.normal(size=(n, num_classes)) + 2 * np.eye(num_classes)[labels]
        keep = (rng.random(n) > 0.1).astype(np.float64)  # some labels map to no class
        ids = np.array([f"i{i}" for i in range(n)], dtype=object)
        return Predictions(logits.astype(np.float32), labels, keep, ids, ids, "multiclass")

    validation, test = multiclass(150), multiclass(90)
    targets = [("specificity", 0.9), ("sensitivity", 0.9), ("sensitivity", 0.6)]
    thresholds = operating_points.fit_thresholds(validation, targets, range(num_classes))
    temperature = calibration.fit_temperatures(validation)
    joined = metric_set.join(
        [
            classification_set(test, names, topk=(2, 3)),
            calibration.metric_set(test, names, bins=6, temperature=temperature),
            operating_points.metric_set(test, names, thresholds, "validation"),
        ]
    )
    # The last row has images of classes 'a' and 'b' only.
    weights = _resample_rows(test.weights > 0, np.isin(test.labels, (0, 1)), rng)
    batched, one_by_one = _batched_and_row_by_row(joined, weights)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-12, atol=0)
    assert np.isnan(batched[-4:-2]).all()  # no weight on a labelled image
    assert not np.isnan(batched[:-4]).all(axis=0).any()  # the random rows define everything
    assert np.isnan(batched[-1, _column(joined, "per_class_accuracy/c")])
    for name in ("accuracy", "per_class_accuracy/a", "auc_mean"):
        assert not np.isnan(batched[-1, _column(joined, name)]), name
    assert not np.isnan(batched[-1, _column(joined, "ece_adaptive", calibration.AFTER)])

    # Multilabel: per-class AUC and calibration with per-class temperatures, one NaN.
    n = 120
    labels = (rng.random((n, 3)) < [0.3, 0.5, 0.1]).astype(np.float64)
    logits = rng.normal(size=(n, 3)) + 2 * labels
    mask = (rng.random((n, 3)) > 0.25).astype(np.float64)
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    pred = Predictions(logits.astype(np.float32), labels, mask, ids, ids, "multilabel")
    joined = metric_set.join(
        [
            multilabel_set(pred, ["x", "y", "z"]),
            calibration.metric_set(pred, ["x", "y", "z"], 5, np.array([0.7, np.nan, 2.0])),
        ]
    )
    # The last row has no positive 'x' label.
    weights = _resample_rows(mask[:, 2] > 0, labels[:, 0] == 0, rng)
    batched, one_by_one = _batched_and_row_by_row(joined, weights)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-12, atol=0)
    assert np.isnan(batched[-4]).all()
    assert np.isnan(batched[:, _column(joined, "ece/y", calibration.AFTER)]).all()
    assert not np.isnan(batched[:-4, _column(joined, "ece", calibration.AFTER)]).any()
    assert np.isnan(batched[-3, _column(joined, "auc/z")])  # no known 'z' label
    assert np.isnan(batched[-1, _column(joined, "auc/x")])
    assert not np.isnan(batched[-1, _column(joined, "auc_mean")])


def test_classification_metrics_values_and_intervals(multiclass_data):
    logits, labels = multiclass_data
    names = [f"c{i}" for i in range(6)]
    keep = np.ones(len(labels))
    keep[:10] = 0  # e.g. labels a shifted dataset maps to no model class
    out = classification_metrics(logits, labels, np.arange(len(labels)), names, keep, (3, 5), 200)
    sk_acc = skm.accuracy_score(labels[10:], logits[10:].argmax(1))
    assert out.get("accuracy") == pytest.approx(sk_acc)
    assert out.get("top3") == pytest.approx(
        skm.top_k_accuracy_score(labels[10:], logits[10:], k=3, labels=range(6))
    )
    for m in out.metrics:
        assert m.ci_low <= m.value <= m.ci_high, m
    assert {m.name for m in out.metrics} >= {"per_class_accuracy/c0", "top5"}
    matrix = np.array(out.artifacts["confusion_matrix"])
    assert matrix.sum() == len(labels) - 10
    # Two classes: top-3/top-5 would always be 1, so they are left out.
    two = classification_metrics(logits[:, :2], labels % 2, np.arange(len(labels)), ["a", "b"])
    assert [m.name for m in two.metrics if m.name.startswith("top")] == []


def test_multilabel_metrics_mean_of_defined_classes():
    rng = np.random.default_rng(6)
    targets = rng.integers(0, 2, (120, 3)).astype(np.float32)
    logits = rng.normal(size=(120, 3)) + targets
    mask = np.ones_like(targets)
    mask[:, 2] = 0  # no labels for class 2 (e.g. not in the shifted dataset)
    names = ["a", "b", "c"]
    no_clinical = clinical.ClinicalMetrics("test", {}, None, names)

    def evaluate(targets):
        pred = Predictions(logits, targets, mask, np.arange(120) // 2, np.arange(120), "multilabel")
        return multilabel.evaluate_predictions(pred, names, no_clinical, 100, 0)

    out = evaluate(targets)
    names = [m.name for m in out.metrics]
    assert names == ["auc/a", "auc/b", "auc_mean"]
    expected = [skm.roc_auc_score(targets[:, c], logits[:, c]) for c in range(2)]
    assert out.get("auc_mean") == pytest.approx(np.mean(expected))
    with pytest.raises(ValueError, match="no class has both"):
        evaluate(np.ones_like(targets))


def test_label_map_identity_shift_and_errors():
    identity = LabelMap("test", "multiclass", ["a", "b"], ["a", "b"], None)
    np.testing.assert_array_equal(identity.multiclass(np.array([1, 0]))[0], [1, 0])
    with pytest.raises(ValueError, match="outside the class list"):
        identity.multiclass(np.array([0, 2]))
    np.testing.assert_array_equal(identity.multiclass(np.array([-1, 1]))[1], [0, 1])
    with pytest.raises(ValueError, match="differ from the model's"):
        LabelMap("test", "multiclass", ["a", "c"], ["a", "b"], None)
    shift = LabelMap(
        "shift",
        "multilabel",
        ["Effusion", "Hernia", "Edema"],
        ["Edema", "Pleural Effusion"],
        {"Effusion": "Pleural Effusion", "Hernia": "", "Edema": "Edema"},
    )
    labels = np.array([[1, 1, 0], [0, 0, 1]], np.float32)
    out, mask = shift.multilabel(labels, np.ones_like(labels))
    np.testing.assert_array_equal(out, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(mask, np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"\['Hernia'\]"):
        LabelMap("s", "multilabel", ["Edema", "Hernia"], ["Edema"], {"Edema": "Edema"})
    with pytest.raises(ValueError, match="not model classes"):
        LabelMap("s", "multilabel", ["Edema"], ["Edema"], {"Edema": "Oedema"})
    dropped = LabelMap("s", "multiclass", ["x", "y"], ["y"], {"x": "", "y": "y"})
    labels, keep = dropped.multiclass(np.array([0, 1, 1]))
    np.testing.assert_array_equal(keep, [0, 1, 1])
    np.testing.assert_array_equal(labels[keep > 0], [0, 0])


def test_knn_matches_brute_force():
    rng = np.random.default_rng(7)
    train = rng.normal(size=(50, 8))
    train_labels = rng.integers(0, 3, 50)
    test = rng.normal(size=(10, 8))
    votes = knn_scores(train, train_labels, test, 3, k=5, temperature=0.1, chunk=4)
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    for i, row in enumerate(test / np.linalg.norm(test, axis=1, keepdims=True)):
        sims = tn @ row
        top = np.argsort(-sims)[:5]
        expected = np.zeros(3)
        np.add.at(expected, train_labels[top], np.exp(sims[top] / 0.1))
        np.testing.assert_allclose(votes[i], expected, rtol=1e-4)


def test_linear_probe_learns_separable_classes():
    rng = np.random.default_rng(8)
    centers = rng.normal(size=(3, 16)) * 3
    y_train, y_test = rng.integers(0, 3, 150), rng.integers(0, 3, 60)
    x_train = centers[y_train] + rng.normal(size=(150, 16))
    x_test = centers[y_test] + rng.normal(size=(60, 16))
    logits = fit_linear_probe(x_train, y_train, x_test, 3, steps=300)
    assert np.mean(metrics.topk_correct(logits, y_test, 1)) > 0.95
    multi = np.eye(3)[y_train]
    logits = fit_linear_probe(x_train, multi, x_test, 3, np.ones_like(multi), steps=300)
    aucs = metrics.multilabel_auc(logits, np.eye(3)[y_test])
    assert np.all(aucs > 0.95)


@pytest.mark.parametrize("l2", [1e-3, 1e-1, 10.0])
def test_linear_probe_is_scikit_learns_logistic_regression(l2):
    """The probe reaches the regularised optimum: scikit-learn's L-BFGS logistic regression.

    Ours minimises mean(w_i CE_i) / mean(w_i) + l2 |W|^2 on standardised
    features; scikit-learn C sum(w_i CE_i) + |W|^2 / 2, the same optimum at
    C = 1 / (2 l2 sum(w_i)). Multiclass with class-balanced weights; multilabel
    with a label mask, one binary problem per class (C = 1 / (2 l2 sum(mask))).
    The features are ill-conditioned like a backbone's (64 dimensions mixing 6
    latent ones): 300 Adam steps, the probe's former solver, ended 0.15 away
    from these probabilities at l2 = 1e-3.
    """
    rng = np.random.default_rng(3)
    n, d, c = 1000, 64, 5
    mix = rng.normal(size=(6, d))
    centers = rng.normal(size=(c, 6))

    def features(labels):
        latent = centers[labels] + rng.normal(size=(len(labels), 6))
        return latent @ mix + 0.05 * rng.normal(size=(len(labels), d))

    y = rng.choice(c, n, p=[0.55, 0.2, 0.12, 0.08, 0.05])
    x, x_test = features(y), features(rng.integers(0, c, 200))
    z, z_test = (x - x.mean(0)) / (x.std(0) + 1e-6), (x_test - x.mean(0)) / (x.std(0) + 1e-6)
    logits = fit_linear_probe(x, y, x_test, c, l2=l2, steps=300, balanced=True)
    sk = LogisticRegression(C=1 / (2 * l2 * n), class_weight="balanced", tol=1e-10, max_iter=10**5)
    np.testing.assert_allclose(
        _softmax(logits), sk.fit(z, y).predict_proba(z_test), atol=1e-3, rtol=0
    )

    multi = (rng.random((n, c)) < 0.3).astype(np.float64)
    multi[:, 0] = (y == 0).astype(np.float64)
    mask = (rng.random((n, c)) < 0.8).astype(np.float64)
    logits = fit_linear_probe(x, multi, x_test, c, mask, l2=l2, steps=300)
    for k in range(c):
        sk = LogisticRegression(C=1 / (2 * l2 * mask.sum()), tol=1e-10, max_iter=10**5)
        sk.fit(z, multi[:, k], sample_weight=mask[:, k])
        np.testing.assert_allclose(
            1 / (1 + np.exp(-logits[:, k])), sk.predict_proba(z_test)[:, 1], atol=1e-3, rtol=0
        )


def _softmax(logits):
    """Softmax in float64, computed here (not by the module under test)."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _ovr_auc_reference(labels, probs, present):
    """scikit-learn's one-vs-rest macro AUC, restricted to the classes in `present`."""
    if len(present) < 2:
        return float("nan")  # one class only: no AUC is defined
    if probs.shape[1] == 2:
        return skm.roc_auc_score(labels, probs[:, 1])
    if len(present) == probs.shape[1]:
        return skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    # sklearn refuses a class without positives; its ovr macro is the mean of
    # the binary AUCs, so take that mean over the classes it can score.
    return np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present])


@pytest.mark.parametrize("num_classes", [2, 5])
@pytest.mark.parametrize("case", ["all", "left_out", "absent_class"])
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_and_auc_mean_match_sklearn(num_classes, case):
    rng = np.random.default_rng(10 * num_classes + len(case))
    n = 240
    # Imbalanced labels (class 0 is 4x the others), so balanced accuracy differs from accuracy.
    p = np.array([4.0] + [1.0] * (num_classes - 1))
    labels = rng.choice(num_classes, n, p=p / p.sum())
    logits = rng.normal(size=(n, num_classes)) + 1.2 * np.eye(num_classes)[labels]
    logits[:, 0] += 0.8  # a bias towards the majority class
    weights = np.ones(n)
    if case == "left_out":
        weights[rng.permutation(n)[:60]] = 0
    if case == "absent_class":
        # The last class never occurs as a label (but is still predicted sometimes).
        labels = np.where(labels == num_classes - 1, 0, labels)
        logits[: n // 3, num_classes - 1] += 3.0
    keep = weights > 0
    y, scores = labels[keep], logits[keep]
    present = np.unique(y)
    probs = _softmax(scores)
    assert (case == "absent_class") == (len(present) < num_classes)
    assert len(np.unique(scores.argmax(1))) == num_classes  # every class is predicted

    want_balanced = skm.balanced_accuracy_score(y, scores.argmax(1))
    want_auc = _ovr_auc_reference(y, probs, present)
    if len(present) > 1:
        assert want_balanced != pytest.approx(skm.accuracy_score(y, scores.argmax(1)), abs=1e-3)

    names = [f"c{i}" for i in range(num_classes)]
    out = classification_metrics(
        logits, labels, np.arange(n), names, weights, topk=(), bootstrap_samples=0
    )
    assert out.get("balanced_accuracy") == pytest.approx(want_balanced, rel=1e-9)
    if np.isnan(want_auc):  # two classes, one absent: no AUC row rather than NaN
        assert "auc_mean" not in {m.name for m in out.metrics}
        assert np.isnan(metrics.macro_auc(logits, labels, weights))
        return
    assert out.get("auc_mean") == pytest.approx(want_auc, rel=1e-6)

    assert metrics.balanced_accuracy(
        labels, logits.argmax(1), num_classes, weights
    ) == pytest.approx(want_balanced, rel=1e-9)
    assert metrics.macro_auc(logits, labels, weights) == pytest.approx(want_auc, rel=1e-6)
    if case == "all":
        # No weights at all is the same as unit weights.
        assert metrics.balanced_accuracy(labels, logits.argmax(1), num_classes) == pytest.approx(
            want_balanced, rel=1e-9
        )
        assert metrics.macro_auc(logits, labels) == pytest.approx(want_auc, rel=1e-6)


def test_balanced_accuracy_and_auc_mean_bootstrap_resample_cases():
    # The intervals come from the same computation on case-resampled weights:
    # one resample's value equals sklearn on the images it draws (with repeats).
    rng = np.random.default_rng(11)
    n, c = 120, 3
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + np.eye(c)[labels]
    cases = np.arange(n) // 2
    index, num_cases = bootstrap.case_index(cases)
    w = bootstrap.bootstrap_weights(index, num_cases, 1, seed=3)[0]
    rep = np.repeat(np.arange(n), w.astype(int))
    balanced = skm.balanced_accuracy_score(labels[rep], logits[rep].argmax(1))
    auc = skm.roc_auc_score(labels[rep], _softmax(logits[rep]), multi_class="ovr")
    assert metrics.balanced_accuracy(labels, logits.argmax(1), c, w) == pytest.approx(balanced)
    assert metrics.macro_auc(logits, labels, w) == pytest.approx(auc, rel=1e-6)
    out = classification_metrics(logits, labels, cases, ["a", "b", "c"], topk=(), seed=0)
    for name in ("balanced_accuracy", "auc_mean"):
        m = next(m for m in out.metrics if m.name == name)
        assert m.ci_low < m.value < m.ci_high, m


def _knn_votes(num_test: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(test labels, k-NN votes [num_test, 3]) of 3 noisy Gaussian classes, 200 train images."""
    rng = np.random.default_rng(12)
    centers = rng.normal(size=(3, 16))
    y_train, y_test = rng.integers(0, 3, 200), rng.integers(0, 3, num_test)
    x_train = centers[y_train] + 1.5 * rng.normal(size=(200, 16))
    x_test = centers[y_test] + 1.5 * rng.normal(size=(num_test, 16))
    return y_test, knn_scores(x_train, y_train, x_test, 3, k=k, temperature=0.07)


def test_knn_probabilities_keep_a_confidently_wrong_image_finite():
    """At k=5 most test images have a class without a vote: its probability is not 0, so
    one confidently wrong image costs a bounded NLL and temperature scaling stays near 1.

    With log(1e-30) for a class without votes (the earlier floor) this problem's NLL
    was 1.585 and its fitted temperature 15.8; with the pseudo-neighbour 0.352 and 0.686.
    """
    y_test, votes = _knn_votes(300, k=5)
    assert (votes.min(axis=1) == 0).sum() > 250  # the case the smoothing is for
    logits = vote_log_shares(votes, 5)
    ids = np.arange(300).astype(str).astype(object)
    pred = Predictions(logits, y_test, np.ones(300), ids, ids, "multiclass")
    nll = -calibration.log_softmax(logits)[np.arange(300), y_test].mean()
    assert nll < 0.5, nll
    assert 0.5 < calibration.fit_temperatures(pred)[0] < 2.0


def test_knn_auc_mean_is_that_of_the_vote_shares():
    """The k-NN's class probabilities are its vote shares; raw votes would be one-hot."""
    y_test, votes = _knn_votes(100, k=20)
    shares = votes / votes.sum(axis=1, keepdims=True)
    logits = vote_log_shares(votes, 20)
    # The shares with a 21st neighbour voting 1/3 for each class (its weight the mean).
    smoothed = (shares + 1 / 60) / (1 + 1 / 20)
    np.testing.assert_allclose(_softmax(logits), smoothed, rtol=1e-5, atol=1e-12)
    assert _softmax(logits).min() >= 1 / 63 * (1 - 1e-6)  # no class has probability 0
    np.testing.assert_array_equal(logits.argmax(1), votes.argmax(1))
    out = classification_metrics(
        logits, y_test, np.arange(100), ["a", "b", "c"], topk=(), bootstrap_samples=0
    )
    want = skm.roc_auc_score(y_test, shares, multi_class="ovr")
    assert out.get("auc_mean") == pytest.approx(want, rel=1e-6)
    assert out.get("accuracy") == skm.accuracy_score(y_test, votes.argmax(1))
    # The raw votes' AUC is the hard predictions' (what the shares fix).
    hard = skm.roc_auc_score(y_test, np.eye(3)[votes.argmax(1)], multi_class="ovr")
    assert metrics.macro_auc(votes, y_test) == pytest.approx(hard, abs=1e-3)
    assert want > hard + 0.02


# --- Calibration, operating points and subgroups wired through the evaluators (clinical.py).

HAM10000 = pathlib.Path(__file__).resolve().parents[1] / "data" / "demo" / "ham10000"
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
CLINICAL = dict(fit_on="validation", calibration=True, operating_points=True, subgroups="auto")


class FakePredictor:
    """Logits from each image's label and id, noisier on each call (so that the splits'
    fitted temperatures differ); records which image ids every call saw."""

    def __init__(self):
        self.calls = []

    def predict(self, variables, batches, outputs):
        """{'logits' or 'features' (the same vectors), 'label', 'case_id', 'image_id'}."""
        del variables
        (output,) = outputs
        keep = {output: [], "label": [], "case_id": [], "image_id": []}
        scale = 1.0 + 2.0 * len(self.calls)
        for batch in batches:
            for i in np.flatnonzero(batch["mask"] > 0):
                image_id = batch["image_id"][i].decode()
                rng = np.random.default_rng(zlib.crc32(image_id.encode()))
                label = int(batch["label"][i])
                keep[output].append(scale * (rng.normal(size=7) + 1.5 * np.eye(7)[label]))
                keep["label"].append(label)
                keep["case_id"].append(batch["case_id"][i].decode())
                keep["image_id"].append(image_id)
        self.calls.append(keep["image_id"])
        out = {k: np.array(v, dtype=object if "id" in k else None) for k, v in keep.items()}
        out[output] = out[output].astype(np.float32)
        return out


def _ham_evaluators(test_entry, predictor=None, kind="classification"):
    """Evals 'validation' and 'test' (`test_entry`) of type `kind` on the HAM10000 demo
    records, predicted by `predictor` (a FakePredictor by default)."""
    config = ml_collections.ConfigDict(
        dict(
            seed=0,
            batch_size=64,
            eval_batch_size=512,
            bootstrap_samples=20,
            data=config_lib.data_config(
                source=f"records:{HAM10000}", split="train", image_size=8, mode="supervised"
            ),
        )
    )
    # A fine-tuning run's model has the task's head; a pre-training run's has none.
    task = TaskInfo("multiclass", HAM_CLASSES, 8, "ham10000") if kind == "classification" else None
    ctx = Context(config=config, task=task, predictor=predictor or FakePredictor())
    evaluator = evaluators.TYPES[kind]
    validation_entry = dict(type=kind, data=dict(split="validation"))
    if kind in ("knn", "linear_probe"):
        # The monitors' neighbours or probe come from the other held-out split: the
        # 6,861 training images would take the test most of a minute to read.
        validation_entry["train_data"] = dict(split="test")
        test_entry = dict(test_entry, train_data=dict(split="validation"))
    evals = {
        "validation": evaluator("validation", validation_entry, ctx),
        "test": evaluator("test", dict(type=kind, **test_entry), ctx),
    }
    check_fit_on(evals)
    return evals, ctx.predictor


@pytest.fixture(scope="module")
def ham_run():
    """One final evaluation of HAM10000's validation and test splits with CLINICAL on test."""
    evals, predictor = _ham_evaluators(dict(data=dict(split="test"), **CLINICAL))
    outputs, rows, artifacts = evaluators.run_evaluators(evals, {}, 100, "final")
    return evals, predictor, outputs, rows, artifacts


def test_test_eval_fits_on_the_validation_predictions_of_the_same_run(ham_run):
    evals, predictor, outputs, rows, _ = ham_run
    # Validation predicted once, first, and reused; test predicted once.
    assert len(predictor.calls) == 2
    validation, test = outputs["validation"].predictions, outputs["test"].predictions
    assert list(validation.image_ids) == predictor.calls[0]
    assert list(test.image_ids) == predictor.calls[1]
    by_key = {
        (r["metric"], r.get("target"), r.get("calibration"), r.get("subgroup")): r for r in rows
    }
    # The temperature is validation's NLL minimum (a grid, not the fitting code), not test's.
    grid = np.exp(np.linspace(np.log(0.2), np.log(10), 4001))
    labels = validation.labels

    def nll(pred, t):
        z = pred.logits.astype(np.float64) / t
        z = z - z.max(1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), pred.labels])

    best = grid[np.argmin([nll(validation, t) for t in grid])]
    temperature = by_key[("temperature", None, "after_temperature", None)]
    assert temperature["value"] == pytest.approx(best, rel=2e-3)
    assert temperature["fit_on"] == "validation" and np.isnan(temperature["ci_low"])
    on_test = grid[np.argmin([nll(test, t) for t in grid])]
    assert abs(on_test - best) > 0.5
    # The 90%-specificity threshold for 'mel' is validation's ROC point; test's rates at it
    # are sklearn's.
    mel = HAM_CLASSES.index("mel")
    probs = _softmax(validation.logits.astype(np.float64))
    fpr, tpr, thresholds = skm.roc_curve(labels == mel, probs[:, mel], drop_intermediate=False)
    ok = np.flatnonzero(1 - fpr >= 0.9 - 1e-12)
    want = thresholds[ok[np.lexsort((fpr[ok], -tpr[ok]))[0]]]
    threshold = by_key[("threshold/mel", "specificity=0.9", None, None)]
    assert threshold["value"] == pytest.approx(want, rel=1e-9)
    sensitivity = by_key[("sensitivity/mel", "specificity=0.9", None, None)]
    assert sensitivity["threshold"] == threshold["value"]
    predicted = _softmax(test.logits.astype(np.float64))[:, mel] >= threshold["value"]
    assert sensitivity["value"] == pytest.approx(skm.recall_score(test.labels == mel, predicted))
    assert sensitivity["ci_low"] < sensitivity["value"] < sensitivity["ci_high"]
    # Subgroups come from the records' metadata, joined on the image id.
    meta = subgroups.read_image_meta(f"records:{HAM10000}", "test")
    women = np.array([meta[i]["sex"] == "female" for i in test.image_ids])
    top1 = np.argmax(test.logits, 1)
    female = by_key[("accuracy", None, None, "sex=female")]
    assert female["value"] == pytest.approx(skm.accuracy_score(test.labels[women], top1[women]))
    assert female["subgroup_by"] == "sex" and female["eval"] == "test"
    assert by_key[("num_cases", None, None, "sex=unknown")]["too_small"] is True
    # Every row carries the results.json fields; validation's rows are as before.
    assert all({"eval", "metric", "value", "ci_low", "ci_high", "split"} <= set(r) for r in rows)
    assert {r["metric"] for r in rows if r["eval"] == "validation"} == {
        "accuracy", "top3", "top5", "balanced_accuracy", "auc_mean",
        *(f"per_class_accuracy/{c}" for c in HAM_CLASSES),
    }  # fmt: skip


def test_reliability_artifacts_and_tensorboard_scalars(ham_run, tmp_path):
    _, _, outputs, rows, artifacts = ham_run
    curves = artifacts["test/final"]["reliability"]
    assert [c["calibration"] for c in curves] == ["before_temperature", "after_temperature"]
    test = outputs["test"].predictions
    probs = _softmax(test.logits.astype(np.float64))
    correct = probs.argmax(1) == test.labels
    prob_true, prob_pred = calibration_curve(correct, probs.max(1), n_bins=15)
    filled = np.array(curves[0]["count"]) > 0
    np.testing.assert_allclose(np.array(curves[0]["outcome"])[filled], prob_true)
    np.testing.assert_allclose(np.array(curves[0]["score"])[filled], prob_pred)
    paths = report_plots.write_run_plots(str(tmp_path), artifacts)
    assert [os.path.basename(p) for p in paths] == ["reliability_test_final.png"]
    assert paths[0].startswith(str(tmp_path / "plots"))
    # TensorBoard: every whole-population number under a unique key, no subgroup.
    tags = evaluators.scalars(outputs)
    assert tags["test/accuracy"] == outputs["test"].get("accuracy")
    assert "test/ece[calibration=after_temperature]" in tags
    assert not any("subgroup" in k for k in tags)
    assert evaluators.row_scalars([r for r in rows if r["eval"] == "test"]) == {
        k: v for k, v in tags.items() if k.startswith("test/")
    }


@pytest.mark.parametrize("kind", ["knn", "linear_probe"])
def test_pretraining_monitors_report_the_clinical_metrics(kind):
    """A k-NN or linear-probe monitor with CLINICAL: the values of its own predictions.

    Validation's predictions (the monitor's log vote shares or probe logits)
    fit the temperature and thresholds; test's rows are those that
    calibration.py, operating_points.py and subgroups compute from them.
    """
    evals, predictor = _ham_evaluators(dict(data=dict(split="test"), **CLINICAL), kind=kind)
    outputs, rows, artifacts = evaluators.run_evaluators(evals, {}, 100, "final")
    # Each monitor predicts its neighbours' (probe's) split and its own split.
    assert len(predictor.calls) == 4
    validation, test = outputs["validation"].predictions, outputs["test"].predictions
    assert list(test.image_ids) == predictor.calls[3]
    by_key = {
        (r["metric"], r.get("target"), r.get("calibration"), r.get("subgroup")): r for r in rows
    }
    temperature = calibration.fit_temperatures(validation)[0]
    assert by_key[("temperature", None, "after_temperature", None)]["value"] == temperature
    thresholds = operating_points.fit_thresholds(
        validation, [("specificity", 0.9)], [HAM_CLASSES.index("mel")]
    )
    (mel_threshold,) = thresholds[("specificity", 0.9)].values()
    assert by_key[("threshold/mel", "specificity=0.9", None, None)]["value"] == mel_threshold
    mel = test.labels == HAM_CLASSES.index("mel")
    probs = _softmax(test.logits.astype(np.float64))
    predicted = probs[:, HAM_CLASSES.index("mel")] >= mel_threshold
    sensitivity = by_key[("sensitivity/mel", "specificity=0.9", None, None)]
    assert sensitivity["value"] == pytest.approx(skm.recall_score(mel, predicted))
    correct = (probs.argmax(1) == test.labels).astype(np.float64)
    brier = np.mean(np.sum((probs - np.eye(7)[test.labels]) ** 2, axis=1))
    assert by_key[("brier", None, "before_temperature", None)]["value"] == pytest.approx(brier)
    meta = subgroups.read_image_meta(f"records:{HAM10000}", "test")
    women = np.array([meta[i]["sex"] == "female" for i in test.image_ids])
    female = by_key[("accuracy", None, None, "sex=female")]
    assert female["value"] == pytest.approx(correct[women].mean())
    assert [c["calibration"] for c in artifacts["test/final"]["reliability"]] == [
        "before_temperature",
        "after_temperature",
    ]


def test_a_periodic_eval_fitting_on_an_eval_not_due_predicts_it_only():
    evals, predictor = _ham_evaluators(dict(data=dict(split="test"), **CLINICAL))
    outputs, rows, _ = evaluators.run_evaluators(evals, {}, 3, names=["test"])
    assert list(outputs) == ["test"] and {r["eval"] for r in rows} == {"test"}
    assert len(predictor.calls) == 2  # validation for the fit, then test
    assert any(r["metric"] == "temperature" for r in rows)


def test_fit_on_and_operating_points_errors():
    with pytest.raises(ValueError, match="operating_points needs fit_on"):
        _ham_evaluators(dict(data=dict(split="test"), operating_points=True))
    with pytest.raises(ValueError, match="fit_on='nope' names no eval"):
        _ham_evaluators(dict(data=dict(split="test"), fit_on="nope"))
    with pytest.raises(ValueError, match="names the eval itself"):
        _ham_evaluators(dict(data=dict(split="test"), fit_on="test"))
    with pytest.raises(ValueError, match="reads the same data"):
        _ham_evaluators(dict(data=dict(split="validation"), fit_on="validation"))
    with pytest.raises(ValueError, match=r"subgroups names \['view'\]"):
        _ham_evaluators(dict(data=dict(split="test"), subgroups=("sex", "view")))
    with pytest.raises(ValueError, match="unknown field"):
        _ham_evaluators(dict(data=dict(split="test"), calibrate=True))


def test_predictor_compiles_its_forward_pass_with_the_models_compiler_options(monkeypatch):
    # An option value XLA rejects fails the forward pass's compile only if the
    # predictor passes conv.compiler_options() to jit.
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, images, train=False):
            return {"logits": nn.Dense(2)(images.reshape(images.shape[0], -1))}

    model, images = Tiny(), np.zeros((8, 4, 4, 3), np.float32)
    variables = model.init(jax.random.key(0), images)
    batches = [{"image": images, "mask": np.ones(8, np.int32)}]
    mesh = sharding.make_mesh(config_lib.mesh_config())
    assert Predictor(model, mesh).predict(variables, batches, ("logits",))["logits"].shape == (8, 2)
    bad = {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"}
    monkeypatch.setattr(conv, "compiler_options", lambda: bad)
    with pytest.raises(jax.errors.JaxRuntimeError, match="NOT_A_FUSION_TYPE"):
        Predictor(model, mesh).predict(variables, batches, ("logits",))
