"""Subgroups (evaluators/subgroups.py, metric_set.py): metadata of the embedded HAM10000
records, age bands, per-group metrics and gaps against scikit-learn and a separate
bootstrap, and too-small groups."""

import collections
import functools
import json
import pathlib
import types
import zlib

import numpy as np
import pytest
import scipy.special
import tensorflow as tf
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from micle_jax.data import shards
from micle_jax.evaluators import bootstrap, clinical, metric_set, subgroups
from micle_jax.evaluators.classification import classification_set
from micle_jax.evaluators.outputs import Predictions

HAM10000 = pathlib.Path(__file__).resolve().parents[1] / "data" / "demo" / "ham10000"
SOURCE = f"records:{HAM10000}"


def _meta_by_hand(split):
    """({image id: meta}, {image id: case id}) read with tf.train.Example, not parse_case."""
    meta, cases = {}, {}
    for path in shards.shard_paths(str(HAM10000), split):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            feature = tf.train.Example.FromString(raw).features.feature
            case = feature["case/id"].bytes_list.value[0].decode()
            ids = [i.decode() for i in feature["image/id"].bytes_list.value]
            metas = feature["image/meta"].bytes_list.value
            meta.update({i: json.loads(m) for i, m in zip(ids, metas, strict=True)})
            cases.update(dict.fromkeys(ids, case))
    return meta, cases


def test_age_bands_dicom_ages_and_missing_values():
    assert subgroups.band_labels((30, 45, 60, 75)) == ["<30", "30-44", "45-59", "60-74", ">=75"]
    assert subgroups.band_labels((18.5, 25)) == ["<18.5", "[18.5, 25)", ">=25"]
    meta = {
        "a": {"age": "29.0"},
        "b": {"age": 30},
        "c": {"age": "44.9"},
        "d": {"age": "075Y"},  # DICOM Age String
        "e": {"age": "018M"},  # 1.5 years
        "f": {"age": ""},
        "g": {},
    }
    groups = subgroups.Subgroups("t", ("age",), meta, SOURCE)
    found = groups.groups(list(meta), np.ones(len(meta), bool), list(meta))
    by_value = {g.value: sorted(np.array(list(meta))[g.index]) for g in found}
    assert by_value == {
        "<30": ["a", "e"],
        "30-44": ["b", "c"],
        ">=75": ["d"],
        "unknown": ["f", "g"],
    }
    # Bands in their order, 'unknown' last.
    assert [g.value for g in found] == ["<30", "30-44", ">=75", "unknown"]
    # DICOM's PatientAge (de-identified from 90 on: '090Y+') is banded by default.
    dicom = {"a": {"PatientAge": "067Y"}, "b": {"PatientAge": "090Y+"}, "c": {"PatientSex": "F"}}
    groups = subgroups.Subgroups("t", "auto", dicom, SOURCE)
    assert [c.name for c in groups.columns] == ["PatientAge"]  # one sex value: no comparison
    found = groups.groups(list(dicom), np.ones(3, bool), list(dicom))
    assert [(g.value, g.num_images) for g in found] == [("60-74", 1), (">=75", 1), ("unknown", 1)]


def test_ham10000_metadata_gives_sex_age_site_and_diagnosis_groups():
    meta = subgroups.read_image_meta(SOURCE, "test")
    by_hand, case_of = _meta_by_hand("test")
    assert meta == by_hand
    groups = subgroups.Subgroups("test", "auto", meta, SOURCE)
    assert [c.name for c in groups.columns] == ["age", "dx_type", "localization", "sex"]
    ids = sorted(meta)
    found = groups.groups(ids, np.ones(len(ids), bool), [case_of[i] for i in ids])
    sizes = {(g.column, g.value): g.num_images for g in found}
    sexes = collections.Counter(m["sex"] for m in meta.values())
    assert {v: sizes[("sex", v)] for v in sexes} == dict(sexes)
    assert sexes["female"] == 759 and sexes["unknown"] == 10
    ages = [float(m["age"]) for m in meta.values() if m["age"]]
    assert sizes[("age", "60-74")] == sum(60 <= a < 75 for a in ages)
    assert sizes[("age", "unknown")] == sum(not m["age"] for m in meta.values())
    assert sum(n for (c, _), n in sizes.items() if c == "localization") == len(meta)
    # A case (lesion) counts once however many of its images a group has.
    women = {case_of[i] for i, m in meta.items() if m["sex"] == "female"}
    female = next(g for g in found if g.tags["subgroup"] == "sex=female")
    assert female.num_cases == len(women) < female.num_images


def test_subgroup_columns_are_checked_when_the_eval_is_built():
    meta = {"a": {"sex": "male", "bmi": "21.5"}, "b": {"sex": "female", "bmi": "31"}}
    with pytest.raises(ValueError, match=r"names \['view'\].*available columns: \['bmi', 'sex'\]"):
        subgroups.Subgroups("test", ("sex", "view"), meta, SOURCE)
    with pytest.raises(ValueError, match="'bmi' is numeric; give its band edges"):
        subgroups.Subgroups("test", ("bmi",), meta, SOURCE)
    banded = subgroups.Subgroups("test", dict(by=("bmi",), bands={"bmi": (25, 30)}), meta, SOURCE)
    assert banded.columns[0].edges == (25.0, 30.0)
    assert [c.name for c in subgroups.Subgroups("test", "auto", meta, SOURCE).columns] == ["sex"]
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['min_case'\]"):
        subgroups.Subgroups("test", dict(min_case=5), meta, SOURCE)
    with pytest.raises(ValueError, match="must be increasing"):
        subgroups.Subgroups("test", dict(bands={"age": (60, 30)}), meta, SOURCE)
    # A source without metadata: 'auto' finds nothing, a named column is an error.
    assert subgroups.read_image_meta("synthetic:num_cases=8", "test") is None
    assert subgroups.Subgroups("test", "auto", None, "synthetic").columns == []
    with pytest.raises(ValueError, match="--meta_columns"):
        subgroups.Subgroups("test", ("sex",), None, "synthetic")


def _data(n=240, c=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.2 * np.eye(c)[labels]
    cases = np.array([f"p{i // 2}" for i in range(n)], dtype=object)  # two images a case
    ids = np.array([f"img{i}" for i in range(n)], dtype=object)
    sex = np.where(np.arange(n) // 2 % 3 == 0, "female", "male").astype(object)
    sex[:8] = "unknown"  # 4 cases: too small
    # Women are predicted worse: their logits carry less signal.
    logits[sex == "female"] = rng.normal(size=((sex == "female").sum(), c))
    meta = {i: {"sex": s} for i, s in zip(ids, sex, strict=True)}
    pred = Predictions(logits.astype(np.float32), labels, np.ones(n), cases, ids, "multiclass")
    return pred, meta, sex


def test_subgroup_metrics_gaps_and_intervals_against_a_separate_computation():
    pred, meta, sex = _data()
    groups = subgroups.Subgroups("test", ("sex",), meta, SOURCE)
    found = groups.groups(pred.image_ids, np.ones(len(sex), bool), pred.case_ids)
    make = functools.partial(classification_set, class_names=["a", "b", "c"])
    samples, seed = 200, 7
    alone = metric_set.evaluate(pred, make, samples, seed)
    metrics = metric_set.evaluate(pred, make, samples, seed, found, min_cases=10)
    # The whole population is as without subgroups, value and interval.
    assert metrics[: len(alone)] == alone
    rows = {(m.name, m.tags.get("subgroup")): m for m in metrics}
    predicted = np.argmax(pred.logits, 1)
    overall = skm.accuracy_score(pred.labels, predicted)
    for value in ("female", "male"):
        inside = sex == value
        want = skm.accuracy_score(pred.labels[inside], predicted[inside])
        got = rows[("accuracy", f"sex={value}")]
        assert got.value == pytest.approx(want)
        assert got.tags == {"subgroup_by": "sex", "subgroup": f"sex={value}"}
        assert rows[("gap/accuracy", f"sex={value}")].value == pytest.approx(want - overall)
        assert rows[("num_cases", f"sex={value}")].value == len(set(pred.case_ids[inside]))
    assert rows[("gap/accuracy", "sex=female")].value < -0.2
    # The gap's interval: percentiles of the paired difference over the same case
    # resamples (bootstrap.bootstrap_weights with the same seed), computed here.
    index, num_cases = bootstrap.case_index(pred.case_ids)
    correct = (predicted == pred.labels).astype(float)
    female = sex == "female"
    diffs = []
    for w in bootstrap.bootstrap_weights(index, num_cases, samples, seed):
        diffs.append(
            np.sum(w * female * correct) / np.sum(w * female) - np.sum(w * correct) / w.sum()
        )
    gap = rows[("gap/accuracy", "sex=female")]
    np.testing.assert_allclose([gap.ci_low, gap.ci_high], np.percentile(diffs, [2.5, 97.5]))
    # 'unknown' has 4 cases < 10: its size and nothing else, marked too small.
    unknown = [m for m in metrics if m.tags.get("subgroup") == "sex=unknown"]
    assert [(m.name, m.value) for m in unknown] == [("num_cases", 4.0), ("num_images", 8.0)]
    assert all(m.info == {"too_small": True, "min_cases": 10} for m in unknown)
    assert all(np.isnan(m.ci_low) for m in unknown)
    # `metrics` patterns keep only some metrics per group; the population keeps all.
    some = metric_set.evaluate(pred, make, samples, seed, found, 10, ("accuracy", "per_class*"))
    assert some[: len(alone)] == alone
    female = {m.name for m in some if m.tags.get("subgroup") == "sex=female"}
    assert female == {"num_cases", "num_images", "accuracy", "gap/accuracy"} | {
        f"{prefix}per_class_accuracy/{c}" for prefix in ("", "gap/") for c in "abc"
    }


HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _ham_predictions(split):
    """Predictions of a made-up over-confident model on HAM10000's `split`, labels and ids
    read with tf.train.Example; from age 60 the logits carry less signal."""
    meta, case_of = _meta_by_hand(split)
    labels = {}
    for path in shards.shard_paths(str(HAM10000), split):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            feature = tf.train.Example.FromString(raw).features.feature
            ids = [i.decode() for i in feature["image/id"].bytes_list.value]
            labels.update(zip(ids, feature["label/class"].int64_list.value, strict=True))
    ids = np.array(sorted(labels), dtype=object)
    y = np.array([labels[i] for i in ids])
    logits = []
    for image_id, label in zip(ids, y, strict=True):
        rng = np.random.default_rng(zlib.crc32(image_id.encode()))
        age = meta[image_id]["age"]
        signal = 0.8 if age and float(age) >= 60 else 2.0
        logits.append(3.0 * (rng.normal(size=7) + signal * np.eye(7)[label]))
    cases = np.array([case_of[i] for i in ids], dtype=object)
    pred = Predictions(np.array(logits), y, np.ones(len(y)), cases, ids, "multiclass")
    return pred, meta


def _ece_by_sklearn(logits, labels, temperature=1.0):
    """15-bin ECE of the top-1 confidence from calibration_curve's bins (share-weighted)."""
    probs = scipy.special.softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    confidence, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=15)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], confidence), minlength=15)
    return np.sum(counts[counts > 0] / len(labels) * np.abs(prob_true - prob_pred))


def test_ham10000_calibration_and_operating_points_by_sex_age_and_site():
    """The issue's first real use: HAM10000's sex, age and localization, every clinical
    metric per subgroup against scikit-learn on the group's images, the gap to the whole
    population, and the ECE's interval over resampled lesions computed here."""
    validation, _ = _ham_predictions("validation")
    test, meta = _ham_predictions("test")
    entry = dict(
        fit_on="validation",
        calibration=True,
        operating_points=dict(specificity=(0.9,), classes=("mel",)),
        subgroups=("sex", "age", "localization"),
    )
    data = types.SimpleNamespace(config=types.SimpleNamespace(source=SOURCE), split="test")
    clinical_metrics = clinical.ClinicalMetrics("test", entry, data, HAM_CLASSES)
    base = functools.partial(classification_set, class_names=HAM_CLASSES)
    samples, seed = 40, 5
    output = clinical_metrics.evaluate(test, base, samples, seed, fit=validation)
    rows = {
        (m.name, m.tags.get("calibration"), m.tags.get("target"), m.tags.get("subgroup")): m
        for m in output.metrics
    }
    temperature = rows[("temperature", "after_temperature", None, None)].value
    assert temperature > 1.5  # the made-up model is over-confident
    threshold = rows[("threshold/mel", None, "specificity=0.9", None)].value
    val_probs = scipy.special.softmax(validation.logits, axis=1)[:, HAM_CLASSES.index("mel")]
    fpr, tpr, thresholds = skm.roc_curve(validation.labels == 4, val_probs, drop_intermediate=False)
    ok = np.flatnonzero(1 - fpr >= 0.9 - 1e-12)
    assert threshold == thresholds[ok[np.lexsort((fpr[ok], -tpr[ok]))[0]]]
    test_probs = scipy.special.softmax(test.logits, axis=1)
    onehot = np.eye(7)[test.labels]
    overall_ece = _ece_by_sklearn(test.logits, test.labels)
    checked = set()
    for column, value in [("sex", "female"), ("sex", "male"), ("age", "60-74"), ("age", "<30")]:
        group = f"{column}={value}"
        inside = np.array([str(meta[i][column]) for i in test.image_ids]) == value
        if column == "age":
            ages = np.array([float(meta[i]["age"] or "nan") for i in test.image_ids])
            low, high = {"60-74": (60, 75), "<30": (-1, 30)}[value]
            inside = (ages >= low) & (ages < high)
        logits, labels = test.logits[inside], test.labels[inside]
        ece = _ece_by_sklearn(logits, labels)
        assert rows[("ece", "before_temperature", None, group)].value == pytest.approx(ece)
        assert rows[("gap/ece", "before_temperature", None, group)].value == pytest.approx(
            ece - overall_ece
        )
        after = _ece_by_sklearn(logits, labels, temperature)
        assert rows[("ece", "after_temperature", None, group)].value == pytest.approx(after)
        brier = skm.brier_score_loss(labels, test_probs[inside], labels=range(7))
        assert rows[("brier", "before_temperature", None, group)].value == pytest.approx(brier)
        assert np.sum((test_probs[inside] - onehot[inside]) ** 2, 1).mean() == pytest.approx(brier)
        predicted = test_probs[inside, 4] >= threshold
        sensitivity = rows[("sensitivity/mel", None, "specificity=0.9", group)]
        assert sensitivity.value == pytest.approx(skm.recall_score(labels == 4, predicted))
        assert sensitivity.info["threshold"] == threshold
        checked.add(group)
    assert len(checked) == 4
    # The older patients' weaker logits show as a negative accuracy gap.
    assert rows[("gap/accuracy", None, None, "age=60-74")].value < -0.2
    # The women's ECE interval: the same lesion resamples, the ECE of the women's images
    # (repeated as drawn) by calibration_curve.
    women = np.flatnonzero([meta[i]["sex"] == "female" for i in test.image_ids])
    index, num_cases = bootstrap.case_index(test.case_ids)
    eces = []
    for w in bootstrap.bootstrap_weights(index, num_cases, samples, seed):
        rep = np.repeat(women, w[women].astype(int))
        eces.append(_ece_by_sklearn(test.logits[rep], test.labels[rep]))
    ece = rows[("ece", "before_temperature", None, "sex=female")]
    np.testing.assert_allclose([ece.ci_low, ece.ci_high], np.percentile(eces, [2.5, 97.5]))
    # Every site is a group; those with fewer than 30 lesions are reported by size only.
    sites = [g for g in output.artifacts["subgroups"] if g["subgroup_by"] == "localization"]
    assert sum(g["num_images"] for g in sites) == len(test)
    for site in sites:
        has_metrics = ("accuracy", None, None, site["subgroup"]) in rows
        assert has_metrics == (not site["too_small"]) == (site["num_cases"] >= 30), site
    assert {"localization=genital", "localization=back"} <= {g["subgroup"] for g in sites}
