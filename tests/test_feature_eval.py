"""Frozen-feature evaluation end to end (micle_jax/trainers/feature_eval.py) on tiny data.

The run's choices are checked against an independent recomputation: the
features of every split from a second Predictor, every grid value refitted
with fit_linear_probe / knn_scores on the cases fractions.select_cases keeps,
and every metric scored by scikit-learn.
"""

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from micle_jax import checkpoint, models, recipes, rundir, sharding
from micle_jax.data.stream import fractions, pipeline
from micle_jax.evaluators.eval_data import Context, EvalData
from micle_jax.evaluators.knn import knn_scores
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


def feature_config(init="", arch="r18x0.25", **overrides):
    """configs/feature_eval.py:runlocal=True on the tiny synthetic source."""
    spec = importlib.util.spec_from_file_location(
        "feature_eval_config", REPO / "configs/feature_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"arch={arch},runlocal=True")
    config.data.source = SYNTHETIC
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
    """Wraps the trainer's fit_linear_probe_path / knn_scores to record their training data."""

    def __init__(self):
        self.calls = []

    def wrap(self, protocol, fn):
        def wrapped(train_features, train_labels, *args, **kwargs):
            self.calls.append((protocol, np.array(train_features), np.array(train_labels)))
            return fn(train_features, train_labels, *args, **kwargs)

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
    """The random-init control: both protocols at two label fractions."""
    config = feature_config()
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


def _rows(rows, protocol, fraction, split):
    return {
        r["metric"]: r
        for r in rows
        if (r["protocol"], r["label_fraction"], r["split"]) == (protocol, fraction, split)
    }


@pytest.mark.slow
def test_rows_for_every_protocol_fraction_and_split_with_their_tags(random_run):
    rows = random_run["rows"]
    assert rundir.read_status(str(random_run["workdir"]))["status"] == "finished"
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
                    assert r["step"] == 0 and r["dataset"] == "synthetic"
                    assert ("k" if key == "l2" else "l2") not in r
                    chosen.add(r[key])
            # One choice per protocol and fraction, used for both splits.
            assert len(chosen) == 1
            grid = L2_GRID if protocol == "linear" else K_GRID
            assert chosen.pop() in grid
    # The returned summary is the test split's numbers.
    for r in rows:
        if r["split"] == "test":
            name = f"{r['protocol']}/{r['label_fraction']:g}/{r['metric']}"
            assert random_run["summary"][name] == r["value"]


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
    for (_, fraction), (_, x, y) in zip(expected_calls, spy.calls, strict=True):
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
    [(_, used, _)] = spy.calls
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
    ],
)
def test_config_errors_name_the_field_and_write_nothing(overrides, field, tmp_path):
    config = feature_config(**overrides)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
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
