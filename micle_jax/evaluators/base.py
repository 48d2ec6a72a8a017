"""The evaluators' common protocol (`Evaluator`) and base class (`EvaluatorFields`).

An evaluator is configured as `config.evals.NAME = dict(type=..., data=...)`
and built once per run; `evaluate(variables, step)` returns an `EvalOutput`
(outputs.py: metrics with bootstrap confidence intervals, plus artifacts
such as a confusion matrix). Every evaluator reads its data through the same
path (eval_data.py):

  - `data`: overrides of the run's `config.data` (e.g. dict(split='test') or
    dict(source='records:/data/nih', split='test')), read in the pipeline's
    'eval' mode (fixed order, evaluation crop, padded with mask=0 rows);
  - predictions from the jitted model on the training mesh (predictor.py),
    gathered to every process, padding rows dropped exactly;
  - labels mapped onto the model's classes (labels.py): identical class lists,
    or for a shifted dataset an explicit `label_map` {its class: model class}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from micle_jax.evaluators.eval_data import Context, EvalData, eval_seed
from micle_jax.evaluators.outputs import EvalOutput

# Fields every eval accepts; each evaluator type adds its own (EXTRA_FIELDS).
COMMON_FIELDS = ("type", "data", "label_map", "every_steps", "in_results", "batch_size")


class Evaluator(Protocol):
    """The protocol: built from a config entry, then `evaluate` at any step."""

    name: str  # the key in config.evals
    split: str  # the data split it reads
    dataset: str  # the name of the dataset it reads
    every_steps: int  # 0: only at the end of training
    in_results: bool  # written to results.json
    fit_on: str  # '' or the eval whose predictions it fits on (clinical.py)

    def evaluate(self, variables: Mapping, step: int) -> EvalOutput:
        """Evaluates {'params', 'batch_stats'} (sharded like the train state).

        An evaluator with `fit_on` also takes `fit=`, the Predictions of that eval.
        """
        ...


def check_fields(name: str, entry: Mapping, extra: Iterable[str]) -> None:
    """Errors naming any field of config.evals.NAME that its type does not accept."""
    accepted = set(COMMON_FIELDS) | set(extra)
    unknown = sorted(set(entry) - accepted)
    if unknown:
        raise ValueError(
            f"config.evals.{name} has unknown field(s) {unknown} (misspelled?); accepted for "
            f"type {entry.get('type')!r}: {sorted(accepted)}"
        )


class EvaluatorFields:
    """The evaluators' base class: `Evaluator`'s attributes, read from a config entry.

    Checks the entry's fields, builds its EvalData and sets name, data, split,
    dataset, every_steps, in_results, samples (bootstrap resamples: the
    entry's, else config.bootstrap_samples, else `default_samples`) and seed.
    """

    def __init__(
        self,
        name: str,
        entry: Mapping,
        ctx: Context,
        extra_fields: tuple[str, ...],
        default_samples: int,
    ):
        check_fields(name, entry, extra_fields)
        self.name = name
        self.data = EvalData(name, entry, ctx)
        self.split, self.dataset = self.data.split, self.data.dataset
        self.every_steps = int(entry.get("every_steps") or 0)
        self.in_results = bool(entry.get("in_results", True))
        self.samples = int(
            entry.get("bootstrap_samples", ctx.config.get("bootstrap_samples", default_samples))
        )
        self.seed = eval_seed(ctx.config, name)
        self.fit_on = ""  # the types that fit on another eval set it (clinical.py)

    def train_data(self, entry: Mapping, ctx: Context, accepted, kind: str) -> EvalData:
        """The features' training data (train_data overrides on the train split).

        Both it and the evaluated data must have a label type in `accepted`,
        and the same classes and label type.
        """
        overrides = {"split": "train", **dict(entry.get("train_data") or {})}
        train = EvalData(self.name, entry, ctx, data_override=overrides)
        for part in (self.data, train):
            if part.label_type not in accepted:
                raise ValueError(
                    f"eval {self.name!r} ({kind}) needs {' or '.join(accepted)} labels; "
                    f"{part.config.source} split {part.split!r} is {part.label_type!r}"
                )
        if (train.info.class_names, train.label_type) != (
            self.data.info.class_names,
            self.data.label_type,
        ):
            raise ValueError(
                f"eval {self.name!r}: train_data classes {train.info.class_names} differ from "
                f"the evaluated data's {self.data.info.class_names}"
            )
        return train
