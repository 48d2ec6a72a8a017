"""Evaluators: one module per kind, one protocol (base.Evaluator), built from config.evals.

  config.evals.validation = dict(type='classification', data=dict(split='validation'),
                                 every_steps=500)
  config.evals.test = dict(type='classification', data=dict(split='test'))
  config.evals.shift_nih = dict(type='multilabel', data=dict(source=..., split='test'),
                                label_map={...})

  config.evals.test = dict(type='classification', data=dict(split='test'),
                           fit_on='validation', calibration=True,
                           operating_points=True, subgroups='auto')

Types (TYPES): 'classification' (top-1/3/5, per-class accuracy, confusion
matrix), 'multilabel' (per-class ROC AUC and their mean), 'knn' and
'linear_probe' (frozen features, for monitoring pre-training). Common fields
(base.COMMON_FIELDS): `data` (overrides of config.data), `label_map`
(distribution shift: the data's class -> the model's class), `every_steps` (0
= only at the end), `in_results` (write to results.json), `batch_size`.
Every type also takes `fit_on`, `calibration`, `operating_points` and
`subgroups` (clinical.py: calibration, thresholds chosen on another eval's
predictions, every metric by metadata subgroup); the frozen-feature monitors
score their k-NN vote shares or probe logits as 'classification' and
'multilabel' score the model's logits.
Every number comes with a 95% bootstrap interval over cases (bootstrap.py).

A trainer builds them once (`build_evaluators`: every check happens here,
before training writes anything) and calls `run_evaluators` to get
results.json rows; an eval with `fit_on` gets that eval's predictions of the
same variables.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections
from absl import logging

from micle_jax import rundir
from micle_jax.evaluators.base import Evaluator
from micle_jax.evaluators.classification import ClassificationEvaluator
from micle_jax.evaluators.clinical import check_fit_on
from micle_jax.evaluators.eval_data import Context
from micle_jax.evaluators.knn import KnnEvaluator
from micle_jax.evaluators.linear_probe import LinearProbeEvaluator
from micle_jax.evaluators.multilabel import MultilabelEvaluator
from micle_jax.evaluators.outputs import EvalOutput, Metric, metric_rows
from micle_jax.evaluators.predictor import Predictor
from micle_jax.task import TaskInfo

TYPES = {
    "classification": ClassificationEvaluator,
    "multilabel": MultilabelEvaluator,
    "knn": KnnEvaluator,
    "linear_probe": LinearProbeEvaluator,
}


def build_evaluators(
    config: ml_collections.ConfigDict, task: TaskInfo | None, model, mesh
) -> dict[str, Evaluator]:
    """Builds (and so checks) every entry of config.evals, in name order.

    Args:
      config: the run's config; its `evals` (may be absent or empty).
      task: the model's task (classes); None for a model without a head
        (pre-training: only 'knn' and 'linear_probe' make sense).
      model: the Flax model; mesh: the training mesh.

    Returns:
      {name: evaluator}.
    """
    evals = config.get("evals") or {}
    ctx = Context(config=config, task=task, predictor=Predictor(model, mesh))
    built = {}
    for name in sorted(evals):
        entry = evals[name]
        if not isinstance(entry, Mapping | ml_collections.ConfigDict):
            raise ValueError(f"config.evals.{name} must be a dict(type=..., data=...)")
        kind = entry.get("type")
        if kind not in TYPES:
            raise ValueError(
                f"config.evals.{name}.type={kind!r} is unknown; accepted: {', '.join(TYPES)}"
            )
        if task is None and kind in ("classification", "multilabel"):
            raise ValueError(
                f"config.evals.{name}: type {kind!r} needs a model with a classification "
                "head (a fine-tuning run); use 'knn' or 'linear_probe' in pre-training"
            )
        built[name] = TYPES[kind](name, entry, ctx)
        logging.info(
            "Eval %r: %s on %s split %r", name, kind, built[name].dataset, built[name].split
        )
    check_fit_on(built)
    return built


def run_evaluators(
    evaluators: Mapping[str, Evaluator],
    variables: Mapping,
    step: int,
    checkpoint: str = "final",
    names=None,
) -> tuple[dict[str, EvalOutput], list[dict], dict]:
    """Runs evaluators on one set of variables.

    An eval with `fit_on` runs after the eval it names and gets its
    predictions; when that eval is not among `names` (a periodic evaluation)
    it is only predicted, not evaluated.

    Args:
      evaluators: from `build_evaluators`.
      variables: {'params', 'batch_stats'} on the devices.
      step: the training step of the variables.
      checkpoint: 'final' or 'best' (the results.json label).
      names: the evaluators to run (default: all).

    Returns:
      ({name: EvalOutput}, results.json rows of the `in_results` ones,
       {'<name>/<checkpoint>': artifacts}).
    """
    names = list(names if names is not None else evaluators)
    fitted_on = {getattr(evaluators[n], "fit_on", "") for n in names} - {""}
    order = [n for n in names if n in fitted_on] + [n for n in names if n not in fitted_on]
    outputs, rows, artifacts, fit_only = {}, [], {}, {}
    for name in order:
        evaluator = evaluators[name]
        fit_on = getattr(evaluator, "fit_on", "")
        if fit_on:
            if fit_on in outputs:
                fit = outputs[fit_on].predictions
            else:
                if fit_on not in fit_only:
                    fit_only[fit_on] = evaluators[fit_on].predict(variables)
                fit = fit_only[fit_on]
            output = evaluator.evaluate(variables, step, fit=fit)
        else:
            output = evaluator.evaluate(variables, step)
        outputs[name] = output
        summary = ", ".join(f"{m.name}={m.value:.4f}" for m in output.metrics[:4])
        logging.info("Eval %s (%s, step %d): %s", name, checkpoint, step, summary)
        if evaluator.in_results:
            rows += metric_rows(output, evaluator, step, checkpoint)
            artifacts[f"{name}/{checkpoint}"] = output.artifacts
    return {n: outputs[n] for n in names}, rows, artifacts


def scalars(outputs: Mapping[str, EvalOutput], prefix: str = "") -> dict[str, float]:
    """TensorBoard scalars {'<prefix><eval>/<metric key>': value} of some eval outputs.

    The key has the metric's tags ('test/ece[calibration=after_temperature]');
    subgroup metrics stay in results.json only.
    """
    return {
        f"{prefix}{name}/{m.key}": float(m.value)
        for name, output in outputs.items()
        for m in output.metrics
        if "subgroup" not in m.tags
    }


def row_scalars(rows, prefix: str = "") -> dict[str, float]:
    """TensorBoard scalars of results.json rows, keyed as `scalars` keys their metrics."""
    out = {}
    for row in rows:
        if "subgroup" in row:
            continue
        tags = {k: row[k] for k in rundir.RESULT_TAGS if k in row}
        key = Metric(row["metric"], row["value"], tags=tags).key
        out[f"{prefix}{row['eval']}/{key}"] = float(row["value"])
    return out
