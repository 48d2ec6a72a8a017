"""Frozen-feature evaluation end to end (micle_jax/trainers/feature_eval.py) on tiny data.

The run's choices are checked against an independent recomputation: the
features of every split from a second Predictor, every grid value refitted
with fit_linear_probe / knn_scores on the cases fractions.select_cases keeps,
and every metric scored by scikit-learn; the test rows' clinical metrics
(calibration, operating points, subgroups by the records' metadata) from the
run's own scores by scikit-learn's calibration_curve, brier_score_loss and
roc_curve.
"""

import importlib.util
import json
import os
import pathlib
import re

import jax
import numpy as np
import pytest
import scipy.special
import tensorflow as tf
from sklearn import calibration as skc
from sklearn import metrics as skm

from micle_jax import checkpoint, models, recipes, report_plots, report_summary, rundir, sharding
from micle_jax.data import records, shards
from micle_jax.data.sources import synthetic
from micle_jax.data.stream import fractions, pipeline
from micle_jax.evaluators.eval_data import Context, EvalData
from micle_jax.evaluators.knn import knn_scores, vote_log_shares
from micle_jax.evaluators.linear_probe import fit_linear_probe, fit_linear_probe_path
from micle_jax.evaluators.predictor import Predictor
from micle_jax.task import TaskInfo
from micle_jax.trainers import feature_eval, pretrain

REPO = pathlib.Path(__file__).resolve().parents[1]
# 60 training cases (20 per class), 15 validation and 15 test cases.
SYNTHETIC = "synthetic:num_cases=60,num_classes=3,image_size=16,max_images_per_case=2"
FRACTIONS = (0.25, 1.0)
L2_GRID = (1e-4, 1e-2, 1.0, 100.0)
K_GRID = (1, 3, 9, 27)
LINEAR_STEPS = 100
SPLITS = ("validation", "test")
SEXES = ("female", "male")
# The clinical metrics of the random run: every column of the records' metadata,
# groups of 3 cases or more measured (the test split has 15 cases).
CLINICAL = dict(
    fit_on="validation",
    calibration=True,
    operating_points=True,
    subgroups=dict(by="auto", min_cases=3),
)


def write_records_with_meta(path):
    """SYNTHETIC's splits as records, each case with a made-up sex and age (as HAM10000's).

    Returns {split: {image id: meta}}.
    """
    info = records.DatasetInfo(
        name="synthetic_meta",
        label_type="multiclass",
        class_names=[f"class_{i}" for i in range(3)],
        splits={},
    )
    written = {}
    for split in ("train", "validation", "test"):
        table = synthetic.make_table(split, 60, 3, 16, 2)
        examples, sizes, written[split] = [], [], {}
        for c in range(table.num_cases):
            index = range(table.case_start[c], table.case_start[c] + table.case_size[c])
            ids = [table.image_ids[i].decode() for i in index]
            meta = {"sex": SEXES[c % 2], "age": f"{20 + 7 * c % 60:.1f}"}
            written[split].update(dict.fromkeys(ids, meta))
            example = records.make_case_example(
                table.case_ids[c],
                [tf.io.encode_png(table.image(i)).numpy() for i in index],
                ids,
                ["png"] * len(ids),
                meta=[meta] * len(ids),
                label_class=[int(table.label_class[i]) for i in index],
            )
            examples.append(example.SerializeToString())
            sizes.append(len(ids))
        info.splits[split] = shards.make_split_info(
            shards.write_split(path, split, examples, num_shards=2), sizes
        )
    records.write_info(path, info)
    return written


def feature_config(init="", arch="r18x0.25", source=SYNTHETIC, **overrides):
    """configs/feature_eval.py:runlocal=True on a tiny source (SYNTHETIC by default)."""
    spec = importlib.util.spec_from_file_location(
        "feature_eval_config", REPO / "configs/feature_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"arch={arch},runlocal=True")
    config.data.source = source
    config.data.image_size = 16
    config.eval_batch_size = 16
    config.batch_size = 16
    config.bootstrap_samples = 20
    config.label_fractions = FRACTIONS
    config.linear.l2_grid = L2_GRID
    config.linear.steps = LINEAR_STEPS
    config.knn.k_grid = K_GRID
    config.init.checkpoint = init
    for key, value in overrides.items():
        parent = config
        *path, leaf = key.split(".")
        for part in path:
            parent = parent[part]
        parent[leaf] = value
    config.lock()
    return config


def split_features(config, variables):
    """{split: Predictor outputs with 'features'} of every split, for `variables`."""
    model = models.build_model(config.model)
    info = pipeline.open_data(config.data, seed=config.seed).info
    task = TaskInfo("multiclass", list(info.class_names), int(config.data.image_size))
    ctx = Context(config, task, Predictor(model, sharding.make_mesh(config.mesh)))
    return {
        name: EvalData(name, {"data": {"split": name}}, ctx).predict(variables, ("features",))
        for name in ("train", "validation", "test")
    }


def checkpoint_backbone_variables(config, workdir):
    """A fresh model's variables with the backbone replaced by the checkpoint's (by hand)."""
    model = models.build_model(config.model)
    size = int(config.data.image_size)
    fresh = jax.device_get(
        model.init(jax.random.key(123), np.zeros((2, size, size, 3), np.float32), train=False)
    )
    loaded = checkpoint.load_variables(workdir)
    out = {}
    for collection in ("params", "batch_stats"):
        out[collection] = dict(fresh[collection])
        out[collection]["backbone"] = loaded[collection]["backbone"]
    return out


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Spy:
    """Wraps the trainer's fit_linear_probe_path / knn_scores to record their training data
    and what they return (the scores of validation, then test)."""

    def __init__(self):
        self.calls = []

    def wrap(self, protocol, fn):
        def wrapped(train_features, train_labels, *args, **kwargs):
            out = fn(train_features, train_labels, *args, **kwargs)
            x, y = np.array(train_features), np.array(train_labels)
            self.calls.append((protocol, x, y, out))
            return out

        return wrapped


def run_spied(config, workdir):
    spy = Spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(feature_eval, "fit_linear_probe_path", spy.wrap("linear", fit_linear_probe_path))
        mp.setattr(feature_eval, "knn_scores", spy.wrap("knn", knn_scores))
        summary = feature_eval.main(config, str(workdir))
    with open(os.path.join(workdir, "results.json")) as f:
        return summary, json.load(f)["results"], spy


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """The random-init control: both protocols at two label fractions, on SYNTHETIC's
    images as records with metadata, with the clinical metrics."""
    path = str(tmp_path_factory.mktemp("records") / "synthetic_meta")
    meta = write_records_with_meta(path)
    config = feature_config(source=f"records:{path}")
    with config.unlocked():
        config.clinical = CLINICAL
    workdir = tmp_path_factory.mktemp("features") / "random"
    summary, rows, spy = run_spied(config, workdir)
    model = models.build_model(config.model)
    variables, _ = feature_eval.load_backbone(model, config, int(config.data.image_size))
    return dict(
        config=config,
        workdir=workdir,
        summary=summary,
        rows=rows,
        spy=spy,
        meta=meta,
        feats=split_features(config, variables),
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Workdir of a 2-step tiny SimCLR pre-training run (r18x0.25, 16 px)."""
    workdir = tmp_path_factory.mktemp("pretrain")
    config = recipes.pretrain_config("r18x0.25")
    recipes.runlocal_pretrain(config)
    config.total_steps = 2
    config.batch_size = 8
    config.checkpoint_every_steps = 2
    config.linear_probe = False
    config.data.source = SYNTHETIC
    config.data.image_size = 16
    config.lock()
    pretrain.main(config, str(workdir))
    return str(workdir)


def _kept(feats, fraction, seed):
    train = feats["train"]
    kept = fractions.select_cases(train["case_id"], train["label"], fraction, seed, stratify=True)
    return kept, np.isin(train["case_id"], kept)


def _rows(rows, protocol, fraction, split, **tags):
    """{metric: row} of one protocol, fraction and split with exactly these facet tags."""
    return {
        r["metric"]: r
        for r in rows
        if (r["protocol"], r["label_fraction"], r["split"]) == (protocol, fraction, split)
        and {t: r[t] for t in rundir.RESULT_TAGS if t in r} == tags
    }


@pytest.mark.slow
def test_rows_for_every_protocol_fraction_and_split_with_their_tags(random_run):
    rows = random_run["rows"]
    assert rundir.read_status(str(random_run["workdir"]))["status"] == "finished"
    dataset = "synthetic_meta"
    keys = {(r["protocol"], r["label_fraction"], r["split"]) for r in rows}
    assert keys == {(p, f, s) for p in ("linear", "knn") for f in FRACTIONS for s in SPLITS}
    for protocol, key in (("linear", "l2"), ("knn", "k")):
        for fraction in FRACTIONS:
            chosen = set()
            for split in SPLITS:
                metrics = _rows(rows, protocol, fraction, split)
                assert {"accuracy", "balanced_accuracy", "auc_mean"} <= set(metrics)
                for r in metrics.values():
                    assert r["eval"] == f"{protocol}_{split}" and r["checkpoint"] == "frozen"
                    assert r["step"] == 0 and r["dataset"] == dataset
                    assert ("k" if key == "l2" else "l2") not in r
                    chosen.add(r[key])
            # One choice per protocol and fraction, used for both splits.
            assert len(chosen) == 1
            grid = L2_GRID if protocol == "linear" else K_GRID
            assert chosen.pop() in grid
    # The returned summary is the test split's numbers (the whole population's, keyed
    # with their facet tags as TensorBoard's: 'ece[calibration=after_temperature]').
    expected = {}
    for r in rows:
        if r["split"] == "test" and "subgroup" not in r:
            tags = ",".join(f"{t}={r[t]}" for t in sorted(rundir.RESULT_TAGS) if t in r)
            metric = f"{r['metric']}[{tags}]" if tags else r["metric"]
            expected[f"{r['protocol']}/{r['label_fraction']:g}/{metric}"] = r["value"]
    assert random_run["summary"] == expected
    assert "linear/1/ece[calibration=after_temperature]" in expected


@pytest.mark.slow
def test_each_fraction_trains_on_the_cases_select_cases_keeps(random_run):
    feats, spy, seed = random_run["feats"], random_run["spy"], random_run["config"].seed
    train = feats["train"]
    # In fraction order: one linear call for the whole L2 grid (the
    # regularisation path), then one k-NN call per k.
    expected_calls = [
        (protocol, fraction)
        for fraction in FRACTIONS
        for protocol, calls in (("linear", 1), ("knn", len(K_GRID)))
        for _ in range(calls)
    ]
    assert [c[0] for c in spy.calls] == [p for p, _ in expected_calls]
    for (_, fraction), (_, x, y, _) in zip(expected_calls, spy.calls, strict=True):
        kept, mask = _kept(feats, fraction, seed)
        # 20 cases per class: round(fraction * 20) of each of the 3 classes.
        assert len(kept) == 3 * round(fraction * 20)
        np.testing.assert_allclose(x, train["features"][mask], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(y, train["label"][mask])


@pytest.mark.slow
def test_the_chosen_value_maximises_validation_balanced_accuracy(random_run):
    """Every grid value refitted here and scored by scikit-learn; test never chooses."""
    feats, rows, config = random_run["feats"], random_run["rows"], random_run["config"]
    val, test = feats["validation"], feats["test"]
    num_classes = 3
    exercised = 0
    for fraction in FRACTIONS:
        _, mask = _kept(feats, fraction, config.seed)
        x, y = feats["train"]["features"][mask], feats["train"]["label"][mask]
        for protocol, key, grid in (("linear", "l2", L2_GRID), ("knn", "k", K_GRID)):

            def scores(value, part, x=x, y=y, protocol=protocol):
                if protocol == "linear":
                    logits = fit_linear_probe(
                        x,
                        y,
                        part["features"],
                        num_classes,
                        l2=value,
                        steps=LINEAR_STEPS,
                        balanced=config.linear.get("balanced", False),
                    )
                    return softmax(logits)
                votes = knn_scores(x, y, part["features"], num_classes, value, 0.07)
                return votes / votes.sum(axis=1, keepdims=True)  # the k-NN's class shares

            on_val = {
                v: skm.balanced_accuracy_score(val["label"], scores(v, val).argmax(1)) for v in grid
            }
            best = max(grid, key=lambda v: (on_val[v], -grid.index(v)))  # first of equals
            exercised += min(grid, key=lambda v: on_val[v]) != best
            val_rows = _rows(rows, protocol, fraction, "validation")
            test_rows = _rows(rows, protocol, fraction, "test")
            assert val_rows["balanced_accuracy"][key] == best, (protocol, fraction, on_val)
            assert val_rows["balanced_accuracy"]["value"] == pytest.approx(on_val[best])

            # The test rows are the chosen value's, recomputed.
            probs = scores(best, test)
            want = {
                "accuracy": skm.accuracy_score(test["label"], probs.argmax(1)),
                "balanced_accuracy": skm.balanced_accuracy_score(test["label"], probs.argmax(1)),
                "auc_mean": skm.roc_auc_score(test["label"], probs, multi_class="ovr"),
            }
            for metric, value in want.items():
                assert test_rows[metric]["value"] == pytest.approx(value, abs=1e-5), (
                    protocol,
                    fraction,
                    metric,
                )
                assert test_rows[metric][key] == best
    # The grids are wide enough that the worst and best values differ somewhere.
    assert exercised >= 2


def _chosen_logits(run, protocol, fraction, best):
    """The run's own class scores of the chosen value: ([n_val, C], [n_test, C]) logits.

    The spy's calls, per fraction: the linear path (every L2), then k-NN per k.
    """
    base = FRACTIONS.index(fraction) * (1 + len(K_GRID))
    if protocol == "linear":
        scores = run["spy"].calls[base][3][L2_GRID.index(best)]
    else:
        scores = vote_log_shares(run["spy"].calls[base + 1 + K_GRID.index(best)][3], best)
    n_val = len(run["feats"]["validation"]["label"])
    return np.asarray(scores[:n_val], np.float64), np.asarray(scores[n_val:], np.float64)


def _probs(logits, temperature=1.0):
    """softmax(logits / temperature) as exp(log_softmax): k-NN shares tie (2/3 for two
    images), and the quantile bins' edges fall on the ties; the same rounding as the
    evaluator's keeps equal shares equal."""
    return np.exp(scipy.special.log_softmax(np.asarray(logits) / temperature, axis=1))


def _ece(probs, labels, strategy):
    """ECE of the top-1 confidence from calibration_curve's 15 bins, weighted by their images."""
    confidence, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    prob_true, prob_pred = skc.calibration_curve(correct, confidence, n_bins=15, strategy=strategy)
    if strategy == "uniform":
        edges = np.linspace(0, 1, 16)
    else:
        edges = np.percentile(confidence, np.linspace(0, 1, 16) * 100)  # calibration_curve's
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=15)
    return np.sum(counts[counts > 0] / len(labels) * np.abs(prob_true - prob_pred))


def _roc_threshold(scores, positives, kind, target):
    """The validation ROC point: the most sensitive with specificity >= target (ties: the
    most specific), or the most specific with sensitivity >= target (ties: most sensitive)."""
    fpr, tpr, thresholds = skm.roc_curve(positives, scores, drop_intermediate=False)
    if kind == "specificity":
        ok = np.flatnonzero(1 - fpr >= target - 1e-12)
        return thresholds[ok[np.lexsort((fpr[ok], -tpr[ok]))[0]]]
    ok = np.flatnonzero(tpr >= target - 1e-12)
    return thresholds[ok[np.lexsort((-tpr[ok], fpr[ok]))[0]]]


@pytest.mark.slow
def test_test_rows_have_calibration_and_operating_points_fitted_on_validation(random_run):
    """Every protocol and fraction: ECE (15 bins, adaptive), Brier before and after the
    temperature that minimises the validation NLL of the chosen scores, and the thresholds
    chosen on validation with their test rates, all by scikit-learn from the run's scores."""
    rows, feats = random_run["rows"], random_run["feats"]
    val_labels, test_labels = feats["validation"]["label"], feats["test"]["label"]
    targets = [("specificity", 0.9), ("specificity", 0.95), ("sensitivity", 0.9)]
    targets.append(("sensitivity", 0.95))
    for protocol, key in (("linear", "l2"), ("knn", "k")):
        for fraction in FRACTIONS:
            test = _rows(rows, protocol, fraction, "test")
            best = test["accuracy"][key]
            val_logits, test_logits = _chosen_logits(random_run, protocol, fraction, best)
            where = (protocol, fraction)
            # The temperature: the validation NLL's minimum over [0.05, 20].
            after = _rows(rows, protocol, fraction, "test", calibration="after_temperature")
            temperature = after["temperature"]["value"]
            assert after["temperature"]["fit_on"] == "validation"

            def nll(t, logits=val_logits):
                logp = scipy.special.log_softmax(logits / t, axis=1)
                return -np.mean(logp[np.arange(len(val_labels)), val_labels])

            grid_min = min(nll(t) for t in np.geomspace(0.05, 20, 2001))
            assert nll(temperature) <= grid_min + 1e-6, where
            for tag, t in (("before_temperature", 1.0), ("after_temperature", temperature)):
                got = _rows(rows, protocol, fraction, "test", calibration=tag)
                probs = _probs(test_logits, t)
                assert got["ece"]["value"] == pytest.approx(
                    _ece(probs, test_labels, "uniform"), abs=1e-9
                ), (where, tag)
                assert got["ece_adaptive"]["value"] == pytest.approx(
                    _ece(probs, test_labels, "quantile"), abs=1e-9
                ), (where, tag)
                brier = skm.brier_score_loss(test_labels, probs, labels=range(3))
                assert got["brier"]["value"] == pytest.approx(brier, abs=1e-9), (where, tag)
            # Thresholds on the validation scores, sensitivity ... NPV on test.
            val_probs = _probs(val_logits)
            test_probs = _probs(test_logits)
            for kind, target in targets:
                point = _rows(rows, protocol, fraction, "test", target=f"{kind}={target:g}")
                for c in range(3):
                    name = f"class_{c}"
                    want = _roc_threshold(val_probs[:, c], val_labels == c, kind, target)
                    threshold = point[f"threshold/{name}"]["value"]
                    assert threshold == pytest.approx(want, rel=1e-9), (where, kind, target, c)
                    predicted = test_probs[:, c] >= threshold
                    tn, fp, fn, tp = skm.confusion_matrix(
                        test_labels == c, predicted, labels=[False, True]
                    ).ravel()
                    for rate, (num, den) in {
                        "sensitivity": (tp, tp + fn),
                        "specificity": (tn, tn + fp),
                        "ppv": (tp, tp + fp),
                        "npv": (tn, tn + fn),
                    }.items():
                        row = point.get(f"{rate}/{name}")
                        if den == 0:
                            assert row is None, (where, rate, name)
                            continue
                        assert row["value"] == pytest.approx(num / den), (where, rate, name)
                        assert row["threshold"] == threshold and row["fit_on"] == "validation"
    # The reliability diagram: calibration_curve's bins, and its PNG.
    workdir = random_run["workdir"]
    artifacts = json.load(open(workdir / "results.json"))["artifacts"]
    curve = artifacts["knn_test/frozen/label_fraction=0.25"]["reliability"][0]
    assert curve["calibration"] == "before_temperature"
    best = _rows(rows, "knn", 0.25, "test")["accuracy"]["k"]
    probs = _probs(_chosen_logits(random_run, "knn", 0.25, best)[1])
    correct = probs.argmax(1) == test_labels
    prob_true, prob_pred = skc.calibration_curve(correct, probs.max(1), n_bins=15)
    outcome, score = np.array(curve["outcome"]), np.array(curve["score"])
    np.testing.assert_allclose(outcome[~np.isnan(outcome)], prob_true)
    np.testing.assert_allclose(score[~np.isnan(score)], prob_pred)
    assert sorted(os.listdir(workdir / "plots")) == [
        f"reliability_{p}_test_frozen_label_fraction={f:g}.png"
        for p in ("knn", "linear")
        for f in FRACTIONS
    ]


@pytest.mark.slow
def test_test_rows_by_the_records_metadata_and_the_report_plots_them(random_run, tmp_path):
    """Subgroups by sex and age band of the records' metadata: accuracy and ECE of the
    group's test images by scikit-learn, the gap to the population; then the report's
    calibration and subgroup figures of the run."""
    rows, feats, meta = random_run["rows"], random_run["feats"], random_run["meta"]["test"]
    test = feats["test"]
    sex = np.array([meta[i]["sex"] for i in test["image_id"]])
    for protocol in ("linear", "knn"):
        for fraction in FRACTIONS:
            whole = _rows(rows, protocol, fraction, "test")
            key = "l2" if protocol == "linear" else "k"
            probs = _probs(
                _chosen_logits(random_run, protocol, fraction, whole["accuracy"][key])[1]
            )
            for value in SEXES:
                group = {"subgroup_by": "sex", "subgroup": f"sex={value}"}
                got = _rows(rows, protocol, fraction, "test", **group)
                inside = sex == value
                cases = set(np.asarray(test["case_id"])[inside])
                assert got["num_cases"]["value"] == len(cases) >= 3
                assert got["num_images"]["value"] == inside.sum()
                accuracy = skm.accuracy_score(test["label"][inside], probs[inside].argmax(1))
                assert got["accuracy"]["value"] == pytest.approx(accuracy)
                assert got["gap/accuracy"]["value"] == pytest.approx(
                    accuracy - whole["accuracy"]["value"]
                )
                calibrated = _rows(
                    rows, protocol, fraction, "test", calibration="before_temperature", **group
                )
                ece = _ece(probs[inside], test["label"][inside], "uniform")
                assert calibrated["ece"]["value"] == pytest.approx(ece, abs=1e-9)
    # Age bands of the made-up ages (20 + 7 c mod 60 for case c): every image in one band.
    bands = [r for r in rows if r.get("subgroup_by") == "age" and r["metric"] == "num_images"]
    bands = [r for r in bands if (r["protocol"], r["label_fraction"]) == ("linear", 1.0)]
    assert sum(r["value"] for r in bands) == len(test["label"])
    assert {r["subgroup"] for r in bands} <= {
        f"age={b}" for b in ("<30", "30-44", "45-59", "60-74", ">=75")
    }
    # The report reads the rows as the fine-tuning evals': the calibration figure and a
    # figure per subgroup column (of one protocol and fraction: each figure costs ~1 s).
    summary, params = report_summary.aggregate(report_summary.collect(workdir_root(random_run))[0])
    summary = [r for r in summary if (r["protocol"], r["label_fraction"]) == ("knn", 0.25)]
    calibration = report_plots.plot_calibration(summary, params, str(tmp_path))
    subgroups = report_plots.plot_subgroups(summary, params, str(tmp_path))
    assert sorted(os.path.basename(p) for p in calibration + subgroups) == [
        "calibration_knn_test.png",
        "subgroups_knn_test_age.png",
        "subgroups_knn_test_sex.png",
    ]


def workdir_root(run):
    """The folder holding the run's workdir (the report's ROOT)."""
    return str(pathlib.Path(run["workdir"]).parent)


@pytest.mark.slow
def test_init_checkpoint_loads_the_pretrained_backbone(pretrained, random_run, tmp_path):
    from micle_jax import main as entry  # config.trainer='feature_eval' dispatch

    config = feature_config(
        init=pretrained,
        label_fractions=(1.0,),
        protocols=("knn",),
        **{"knn.k_grid": (3,)},
    )
    spy = Spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(feature_eval, "knn_scores", spy.wrap("knn", knn_scores))
        summary = entry.run(config, str(tmp_path / "run"))
    assert set(summary) >= {"knn/1/accuracy", "knn/1/balanced_accuracy"}
    [(_, used, _, _)] = spy.calls
    pretrained_feats = split_features(config, checkpoint_backbone_variables(config, pretrained))
    np.testing.assert_allclose(used, pretrained_feats["train"]["features"], rtol=1e-5, atol=1e-6)
    random_feats = random_run["feats"]["train"]["features"]
    assert used.shape == random_feats.shape
    assert not np.allclose(used, random_feats, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"protocols": ("linear", "svm")}, "config.protocols"),
        ({"protocols": ()}, "config.protocols"),
        ({"label_fractions": (0.0, 1.0)}, "config.label_fractions"),
        ({"label_fractions": (1.5,)}, "config.label_fractions"),
        ({"select_metric": "f1"}, "config.select_metric"),
        ({"linear.l2_grid": ()}, "config.linear.l2_grid"),
        ({"knn.k_grid": ()}, "config.knn.k_grid"),
        ({"knn.k_grid": (0, 5)}, "config.knn.k_grid"),
        ({"clinical.fit_on": "test"}, "config.clinical.fit_on"),
        ({"clinical.fit_on": ""}, "config.clinical.operating_points needs fit_on"),
        ({"clinical.subgroups": "sex"}, "config.clinical.subgroups names ['sex']"),
    ],
)
def test_config_errors_name_the_field_and_write_nothing(overrides, field, tmp_path):
    config = feature_config(**overrides)
    with pytest.raises(ValueError, match=re.escape(field)):
        feature_eval.main(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_init_of_another_arch_is_an_error_naming_the_field(pretrained, tmp_path):
    config = feature_config(init=pretrained, **{"model.width": 0.5})  # r18x0.5
    with pytest.raises(ValueError, match=r"(?s)config\.init\.checkpoint=.*backbone/"):
        feature_eval.main(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_fraction_that_leaves_a_class_empty_is_an_error_before_writing(tmp_path):
    # 20 training cases per class: 1% keeps round(0.2) = 0 of each.
    config = feature_config(label_fractions=(0.01, 1.0))
    with pytest.raises(ValueError, match=r"config\.label_fractions has 0\.01.*without a case"):
        feature_eval.main(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
