"""Evaluators: one module per kind, one protocol (base.Evaluator), built from config.evals.

  config.evals.validation = dict(type='classification', data=dict(split='validation'),
                                 every_steps=500)
  config.evals.test = dict(type='classification', data=dict(split='test'))
  config.evals.shift_nih = dict(type='multilabel', data=dict(source=..., split='test'),
                                label_map={...})

Types (TYPES): 'classification' (top-1/3/5, per-class accuracy, confusion
matrix), 'multilabel' (per-class ROC AUC and their mean), 'knn' and
'linear_probe' (frozen features, for monitoring pre-training). Common fields
(base.COMMON_FIELDS): `data` (overrides of config.data), `label_map`
(distribution shift: the data's class -> the model's class), `every_steps` (0
= only at the end), `in_results` (write to results.json), `batch_size`.
Every number comes with a 95% bootstrap interval over cases (bootstrap.py).

A trainer builds them once (`build_evaluators`: every check happens here,
before training writes anything) and calls `run_evaluators` to get
results.json rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections
from absl import logging

from micle_jax.evaluators.base import Evaluator
from micle_jax.evaluators.classification import ClassificationEvaluator
from micle_jax.evaluators.eval_data import Context
from micle_jax.evaluators.knn import KnnEvaluator
from micle_jax.evaluators.linear_probe import LinearProbeEvaluator
from micle_jax.evaluators.multilabel import MultilabelEvaluator
from micle_jax.evaluators.outputs import EvalOutput, metric_rows
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
    return built


def run_evaluators(
    evaluators: Mapping[str, Evaluator],
    variables: Mapping,
    step: int,
    checkpoint: str = "final",
    names=None,
) -> tuple[dict[str, EvalOutput], list[dict], dict]:
    """Runs evaluators on one set of variables.

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
    outputs, rows, artifacts = {}, [], {}
    for name in names if names is not None else list(evaluators):
        evaluator = evaluators[name]
        output = evaluator.evaluate(variables, step)
        outputs[name] = output
        summary = ", ".join(f"{m.name}={m.value:.4f}" for m in output.metrics[:4])
        logging.info("Eval %s (%s, step %d): %s", name, checkpoint, step, summary)
        if evaluator.in_results:
            rows += metric_rows(output, evaluator, step, checkpoint)
            artifacts[f"{name}/{checkpoint}"] = output.artifacts
    return outputs, rows, artifacts


def scalars(outputs: Mapping[str, EvalOutput], prefix: str = "") -> dict[str, float]:
    """TensorBoard scalars {'<prefix><eval>/<metric>': value} of some eval outputs."""
    return {
        f"{prefix}{name}/{m.name}": float(m.value)
        for name, output in outputs.items()
        for m in output.metrics
    }
