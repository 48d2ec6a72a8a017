"""Frozen-feature evaluation: linear and k-NN protocols on a pre-trained (or random) backbone.

The protocols SSL papers use to see what pre-training learned, where full
fine-tuning at small scale is a blunt instrument:

  - 'linear': an L2-regularised multinomial logistic regression on the
    frozen backbone features (SimCLR's transfer protocol, Chen et al. 2020,
    appendix B.8: features of the un-augmented, centre-cropped images, no
    fine-tuning, the L2 weight chosen on a validation split);
  - 'knn': the weighted k-NN of Wu et al. 2018 (cosine similarity, votes
    exp(s / 0.07)), k chosen on the validation split.

The backbone comes from config.init.checkpoint (a pre-training run), or is
randomly initialised with config.seed when it is '' (the 'random' control:
the same protocol on features nobody trained). Features of the train,
validation and test splits are computed once; then for every label fraction
(training cases kept by `fractions.select_cases`, stratified, seeded by
config.seed) each protocol picks its hyper-parameter on the validation split
by `config.select_metric` and reports validation and test metrics of that
choice with 95% bootstrap intervals over cases. Test numbers never take part
in a choice.

WORKDIR/results.json rows carry `protocol`, `label_fraction` and the chosen
hyper-parameter (`l2` or `k`) besides the usual fields, so that one run
covers every fraction and both protocols.

The test rows also carry the clinical metrics of the fine-tuning evals
(evaluators/clinical.py), configured by config.clinical as a fine-tuning
config's test eval: calibration (ECE, adaptive ECE, Brier, NLL) before and
after a temperature fitted on the validation split's scores of the chosen
hyper-parameter, the thresholds chosen on those scores for target
specificities and sensitivities with sensitivity, specificity, PPV and NPV on
test, and every metric by metadata subgroup; in the same rows (tags
`calibration`, `target`, `subgroup`) as the fine-tuning evals'. Artifacts
'<protocol>_test/frozen/label_fraction=<f>' hold the reliability curves, drawn
as WORKDIR/plots/reliability_<protocol>_test_frozen_label_fraction=<f>.png.

  python -m micle_jax.main --config=configs/feature_eval.py:records=data/demo/ham10000,\
init=workdirs/demo/pretrain_micle --workdir=workdirs/demo/features_micle_s0
"""

from __future__ import annotations

import functools
import types

import jax
import ml_collections
import numpy as np
from absl import logging

from micle_jax import checkpoint, fs, models, report_plots, rundir, sharding
from micle_jax.data.stream import fractions, pipeline
from micle_jax.evaluators import metrics
from micle_jax.evaluators.classification import classification_metrics, classification_set
from micle_jax.evaluators.clinical import ClinicalMetrics
from micle_jax.evaluators.eval_data import Context, EvalData, eval_seed
from micle_jax.evaluators.knn import knn_scores, vote_log_shares
from micle_jax.evaluators.linear_probe import fit_linear_probe_path
from micle_jax.evaluators.outputs import EvalOutput, Predictions, metric_rows
from micle_jax.evaluators.predictor import Predictor
from micle_jax.task import TaskInfo
from micle_jax.trainers import train_state

PROTOCOLS = ("linear", "knn")
SELECT_METRICS = ("balanced_accuracy", "accuracy", "auc_mean")
# config.clinical.fit_on: the split of config.splits whose scores fit the
# temperature and the thresholds ('' = none: uncalibrated values only).
FIT_ON = ("validation", "")
CHECKPOINT = "frozen"  # results.json's checkpoint label: the backbone is never trained


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks what the locked ConfigDict cannot (values, not names)."""
    unknown = sorted(set(config.protocols) - set(PROTOCOLS))
    if unknown or not config.protocols:
        raise ValueError(
            f"config.protocols={tuple(config.protocols)!r}: accepted protocols are "
            f"{', '.join(PROTOCOLS)} (at least one)"
        )
    if config.select_metric not in SELECT_METRICS:
        raise ValueError(
            f"config.select_metric={config.select_metric!r}; accepted: {', '.join(SELECT_METRICS)}"
        )
    for f in config.label_fractions:
        if not isinstance(f, int | float) or not 0 < f <= 1:
            raise ValueError(
                f"config.label_fractions has {f!r}; each fraction must be in (0, 1], e.g. "
                "(0.01, 0.1, 1.0)"
            )
    if not config.linear.l2_grid or min(config.linear.l2_grid) < 0:
        raise ValueError(
            f"config.linear.l2_grid={tuple(config.linear.l2_grid)!r} must be non-empty with "
            "values >= 0"
        )
    if not config.knn.k_grid or min(config.knn.k_grid) < 1:
        raise ValueError(
            f"config.knn.k_grid={tuple(config.knn.k_grid)!r} must be non-empty with values >= 1"
        )
    if config.clinical.fit_on not in FIT_ON:
        raise ValueError(
            f"config.clinical.fit_on={config.clinical.fit_on!r}; accepted: 'validation' (the "
            "split that chooses the hyper-parameters) or '' (no temperature, no thresholds): "
            "values fitted on the test split would flatter it"
        )


def select_value(metric: str, scores: np.ndarray, labels: np.ndarray) -> float:
    """The selection metric of class scores [n, C] against int labels [n] (higher is better)."""
    if metric == "accuracy":
        return float(np.mean(np.argmax(scores, axis=1) == labels))
    if metric == "balanced_accuracy":
        return metrics.balanced_accuracy(labels, np.argmax(scores, axis=1), scores.shape[1])
    return metrics.macro_auc(scores, labels)


def load_backbone(model, config: ml_collections.ConfigDict, image_size: int) -> tuple[dict, str]:
    """The model's variables: random with config.seed, the backbone from init if given.

    Returns:
      ({'params', 'batch_stats'} host arrays, a description for the log).
    """
    dummy = np.zeros((2, image_size, image_size, 3), np.float32)
    variables = jax.device_get(
        train_state.run_once(lambda: model.init(jax.random.key(config.seed), dummy, train=False))
    )
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    if not config.init.checkpoint:
        return variables, f"random initialisation (seed {config.seed})"
    loaded = checkpoint.load_variables(config.init.checkpoint)
    try:
        merged, copied = checkpoint.merge_variables(variables, loaded, ("backbone",))
    except ValueError as e:
        raise ValueError(
            f"config.init.checkpoint={config.init.checkpoint}: {e}\nis config.model (arch, "
            "width) the one of the pre-training run?"
        ) from e
    if not copied:
        raise ValueError(
            f"config.init.checkpoint={config.init.checkpoint}: no backbone array matched the "
            "model; is config.model (arch, width) the one of the pre-training run?"
        )
    return merged, f"{len(copied)} backbone arrays of {config.init.checkpoint}"


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates frozen features; writes WORKDIR/results.json; returns the test metrics."""
    # --- Set-up: everything is validated before anything is written. ---
    check_config(config)
    workdir = rundir.check_workdir(workdir)
    mesh = sharding.make_mesh(config.mesh)
    info = pipeline.open_data(config.data, seed=config.seed).info
    if info.label_type != "multiclass":
        raise ValueError(
            f"feature evaluation needs multiclass labels; {config.data.source} has "
            f"label_type {info.label_type!r}"
        )
    task = TaskInfo(
        label_type="multiclass",
        class_names=list(info.class_names),
        image_size=int(config.data.image_size),
        dataset=getattr(info, "name", "") or str(config.data.source),
    )
    model = models.build_model(config.model)
    ctx = Context(config=config, task=task, predictor=Predictor(model, mesh))
    splits = {
        name: EvalData(name, {"data": {"split": split}}, ctx)
        for name, split in config.splits.items()
    }
    # The test split's calibration, operating points and subgroups (its metadata read here).
    clinical = ClinicalMetrics(
        "test", config.clinical, splits["test"], task.class_names, field="config.clinical"
    )

    # --- Features of every split, once. ---
    variables, where = load_backbone(model, config, task.image_size)
    shardings = sharding.tree_shardings(variables, mesh, config.mesh.shard_min_size)
    variables = jax.device_put(variables, shardings)
    logging.info("Frozen features from %s", where)
    feats = {
        name: _labelled(data.predict(variables, ("features",))) for name, data in splits.items()
    }
    # Every fraction's training cases, before anything is written: a fraction
    # that leaves a class without a case is a config error, not a failed run.
    kept_cases = _kept_cases(config, feats["train"], task.class_names)
    rundir.write_status(workdir, "running", step=0)

    # --- Every label fraction x protocol: choose on validation, report both splits. ---
    rows, summary, artifacts = [], {}, {}
    for fraction in config.label_fractions:
        kept = kept_cases[fraction]
        for protocol in config.protocols:
            outputs, new_rows = _evaluate_protocol(
                config, protocol, fraction, kept, feats, splits, task, clinical
            )
            rows += new_rows
            test = outputs["test"]
            for m in test.metrics:
                if "subgroup" not in m.tags:  # as evaluators.scalars: the population's
                    summary[f"{protocol}/{fraction:g}/{m.key}"] = float(m.value)
            if test.artifacts:
                key = f"{protocol}_test/{CHECKPOINT}/label_fraction={fraction:g}"
                artifacts[key] = test.artifacts

    # --- Results. ---
    fs.makedirs(workdir)
    path = rundir.write_results(workdir, config, rows, artifacts)
    if jax.process_index() == 0:
        report_plots.write_run_plots(workdir, artifacts)
    rundir.write_status(workdir, "finished", step=0, results=path)
    logging.info("Feature evaluation done; results in %s", path)
    return summary


def _labelled(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The images of a split's features that have a label (label >= 0)."""
    if np.any(features["label"] < 0):
        keep = features["label"] >= 0
        return {k: v[keep] for k, v in features.items()}
    return features


def _kept_cases(config, train: dict, class_names) -> dict[float, set[str]]:
    """{fraction: the training cases it keeps} for every config.label_fractions."""
    kept_cases = {}
    for fraction in config.label_fractions:
        try:
            kept_cases[fraction] = set(
                fractions.select_cases(
                    train["case_id"],
                    train["label"],
                    float(fraction),
                    config.seed,
                    stratify=True,
                    class_names=class_names,
                )
            )
        except ValueError as e:
            raise ValueError(f"config.label_fractions has {fraction!r}: {e}") from e
    return kept_cases


def _scorer(config, protocol: str, x: np.ndarray, y: np.ndarray, num_classes: int):
    """(grid, hyper-parameter name, features [n, d] -> {value: class scores [n, C]})."""
    if protocol == "linear":
        grid = list(config.linear.l2_grid)

        def score_grid(feats_eval):
            scores = fit_linear_probe_path(
                x,
                y,
                feats_eval,
                num_classes,
                grid,
                steps=config.linear.steps,
                balanced=config.linear.balanced,
            )
            return dict(zip(grid, scores, strict=True))

        return grid, "l2", score_grid

    grid = list(config.knn.k_grid)

    def score_grid(feats_eval):
        # Log vote shares, not the raw votes (up to exp(1/0.07) each): the
        # metrics' softmax of raw votes is one-hot, and its AUC that of
        # the hard predictions.
        return {
            k: vote_log_shares(
                knn_scores(x, y, feats_eval, num_classes, int(k), config.knn.temperature), k
            )
            for k in grid
        }

    return grid, "k", score_grid


def _evaluate_protocol(
    config, protocol, fraction, kept, feats, splits, task, clinical
) -> tuple[dict[str, EvalOutput], list[dict]]:
    """One protocol on one label fraction: choose on validation, rows for both splits.

    Returns:
      ({'validation', 'test': EvalOutput}, their results.json rows). The test
      output has the clinical metrics (`clinical`, fitted on the validation
      scores of the chosen hyper-parameter).
    """
    train, val, test = feats["train"], feats["validation"], feats["test"]
    sub = np.array([c in kept for c in train["case_id"]])
    x, y = train["features"][sub], train["label"][sub]
    grid, key, score_grid = _scorer(config, protocol, x, y, task.num_classes)
    both = np.concatenate([val["features"], test["features"]])
    scored = score_grid(both)
    choice = {
        v: select_value(config.select_metric, s[: len(val["label"])], val["label"])
        for v, s in scored.items()
    }
    best = max(grid, key=lambda v: (choice[v], -grid.index(v)))
    logging.info(
        "%s, %g of the labels (%d cases, %d images): validation %s by %s: %s -> %s=%g",
        protocol,
        fraction,
        len(kept),
        int(sub.sum()),
        config.select_metric,
        key,
        ", ".join(f"{v:g}: {choice[v]:.4f}" for v in grid),
        key,
        best,
    )
    n_val = len(val["label"])
    pred = {
        "validation": _predictions(scored[best][:n_val], val),
        "test": _predictions(scored[best][n_val:], test),
    }
    outputs = {
        "validation": classification_metrics(
            pred["validation"].logits,
            val["label"],
            val["case_id"],
            task.class_names,
            topk=(),
            bootstrap_samples=config.bootstrap_samples,
            seed=eval_seed(config, f"{protocol}_validation/{fraction}"),
        ),
        # The same metrics and bootstrap as classification_metrics, plus the clinical ones.
        "test": clinical.evaluate(
            pred["test"],
            functools.partial(classification_set, class_names=task.class_names, topk=()),
            config.bootstrap_samples,
            eval_seed(config, f"{protocol}_test/{fraction}"),
            fit=pred["validation"] if clinical.fit_on else None,
        ),
    }
    rows = []
    for split_name, output in outputs.items():
        evaluated = types.SimpleNamespace(
            name=f"{protocol}_{split_name}", split=splits[split_name].split, dataset=task.dataset
        )
        for row in metric_rows(output, evaluated, 0, CHECKPOINT):
            row.update(protocol=protocol, label_fraction=float(fraction))
            row[key] = float(best)
            rows.append(row)
    return outputs, rows


def _predictions(scores: np.ndarray, part: dict) -> Predictions:
    """A split's class scores [n, C] (logits, or k-NN log vote shares) as Predictions."""
    return Predictions(
        np.asarray(scores, np.float32),
        np.asarray(part["label"]),
        np.ones(len(part["label"])),
        np.asarray(part["case_id"], dtype=object),
        np.asarray(part["image_id"], dtype=object),
        "multiclass",
    )
