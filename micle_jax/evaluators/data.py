"""An eval's data: config, checks done before training starts, and mapped predictions."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from micle_jax.data import pipeline
from micle_jax.evaluators import base


@dataclasses.dataclass
class Context:
    """What every evaluator of a run shares.

    Attributes:
      config: the run's config (config.data is the base of every eval's data).
      task: the model's task (label type, class names, image size); None for a
        model without a head (pre-training: only 'knn' and 'linear_probe').
      predictor: the jitted forward pass on the run's mesh.
    """

    config: ml_collections.ConfigDict
    task: base.TaskInfo | None
    predictor: base.Predictor


def eval_seed(config: ml_collections.ConfigDict, name: str) -> int:
    """A seed for one eval's bootstrap: config.seed and the eval's name, stable across runs."""
    digest = hashlib.sha256(f"{config.seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class EvalData:
    """One eval's dataset, checked up front and read in the pipeline's 'eval' mode.

    Everything that can be wrong with an eval (unknown data fields, a missing
    split, an empty split, classes that do not match the model's, a batch size
    the devices cannot split) is found here, when the evaluators are built,
    before the trainer writes anything.
    """

    def __init__(
        self, name: str, entry: Mapping, ctx: Context, data_override: Mapping | None = None
    ):
        self.name = name
        self.ctx = ctx
        overrides = dict(entry.get("data") or {})
        overrides.update(data_override or {})
        self.config = base.eval_data_config(ctx.config.data, overrides, name)
        self.info = pipeline.get_info(self.config)
        self.split = self.config.split
        self.dataset = getattr(self.info, "name", "") or str(self.config.source)
        self.batch_size = int(
            entry.get("batch_size") or ctx.config.get("eval_batch_size") or ctx.config.batch_size
        )
        if self.batch_size <= 0 or self.batch_size % jax.device_count():
            raise ValueError(
                f"eval {name!r}: batch size {self.batch_size} must be a positive multiple of the "
                f"{jax.device_count()} devices (set config.eval_batch_size or "
                f"config.evals.{name}.batch_size)"
            )
        self.num_images = pipeline.num_examples(self.config, "eval")
        if self.num_images <= 0:
            raise ValueError(
                f"eval {name!r}: split {self.split!r} of {self.config.source} has no images; "
                f"point config.evals.{name}.data at a split with data"
            )
        self.label_type = self.info.label_type

    def check_labels(self, label_type: str, label_map: Mapping | None) -> base.LabelMap:
        """The label map onto the model's classes; errors if the label types differ."""
        task = self.ctx.task
        if self.label_type != label_type or task.label_type != label_type:
            raise ValueError(
                f"eval {self.name!r} is a {label_type} eval but the data "
                f"({self.config.source}) is {self.label_type!r} and the model "
                f"{task.label_type!r}; use type "
                f"{'classification' if task.label_type == 'multiclass' else 'multilabel'}"
            )
        return base.LabelMap(
            self.name, label_type, self.info.class_names, task.class_names, label_map
        )

    def batches(self):
        """One pass over the split: host batches with 'mask' (0 = padding)."""
        dataset = pipeline.make_dataset(
            self.config, mode="eval", global_batch_size=self.batch_size, seed=0
        )
        return dataset.as_numpy_iterator()

    def predict(self, variables: Mapping, outputs=("logits",)) -> dict[str, np.ndarray]:
        """Model outputs and labels of every real image (see base.Predictor.predict)."""
        result = self.ctx.predictor.predict(variables, self.batches(), outputs)
        if not len(result["case_id"]):
            raise ValueError(
                f"eval {self.name!r}: split {self.split!r} of {self.config.source} yielded "
                "no images"
            )
        return result


class EvaluatorFields:
    """What every evaluator reads from its config entry (base.Evaluator's attributes).

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
        base.check_fields(name, entry, extra_fields)
        self.name = name
        self.data = EvalData(name, entry, ctx)
        self.split, self.dataset = self.data.split, self.data.dataset
        self.every_steps = int(entry.get("every_steps") or 0)
        self.in_results = bool(entry.get("in_results", True))
        self.samples = int(
            entry.get("bootstrap_samples", ctx.config.get("bootstrap_samples", default_samples))
        )
        self.seed = eval_seed(ctx.config, name)

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
