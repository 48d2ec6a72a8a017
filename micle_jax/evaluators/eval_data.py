"""An eval's data: its config, checks done before training starts, and its predictions.

What every evaluator of a run shares (`Context`), the data config of one
eval (`eval_data_config`), its bootstrap seed (`eval_seed`) and its dataset
(`EvalData`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from micle_jax.data.stream import pipeline
from micle_jax.evaluators.labels import LabelMap
from micle_jax.evaluators.predictor import Predictor
from micle_jax.task import TaskInfo


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
    task: TaskInfo | None
    predictor: Predictor


def eval_seed(config: ml_collections.ConfigDict, name: str) -> int:
    """A seed for one eval's bootstrap: config.seed and the eval's name, stable across runs."""
    digest = hashlib.sha256(f"{config.seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def eval_data_config(
    train_data: ml_collections.ConfigDict, overrides: Mapping | None, name: str
) -> ml_collections.ConfigDict:
    """The data config of an eval: the run's config.data with `overrides` applied.

    Evaluation always sees every case (label_fraction 1.0) and, unless the
    eval says otherwise, ignores uncertain multilabel labels (masks them)
    whatever policy training used: a U-Ones training policy must not turn
    uncertain test labels into positives.

    Raises:
      ValueError: an override names a field config.data does not have.
    """
    data = train_data.copy_and_resolve_references()
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(data))
    if unknown:
        raise ValueError(
            f"config.evals.{name}.data has unknown field(s) {unknown}; accepted: {sorted(data)}"
        )
    with data.unlocked():
        data.label_fraction = 1.0
        data.uncertain_policy = "ignore"
        for key, value in overrides.items():
            data[key] = value
    return data


class EvalData:
    """One eval's dataset, opened once, checked up front and read in the pipeline's 'eval' mode.

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
        self.config = eval_data_config(ctx.config.data, overrides, name)
        self.data = pipeline.open_data(self.config, seed=0)
        self.info = self.data.info
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
        self.num_images = self.data.num_examples("eval")
        if self.num_images <= 0:
            raise ValueError(
                f"eval {name!r}: split {self.split!r} of {self.config.source} has no images; "
                f"point config.evals.{name}.data at a split with data"
            )
        self.label_type = self.info.label_type

    def check_labels(self, label_type: str, label_map: Mapping | None) -> LabelMap:
        """The label map onto the model's classes; errors if the label types differ."""
        task = self.ctx.task
        if self.label_type != label_type or task.label_type != label_type:
            raise ValueError(
                f"eval {self.name!r} is a {label_type} eval but the data "
                f"({self.config.source}) is {self.label_type!r} and the model "
                f"{task.label_type!r}; use type "
                f"{'classification' if task.label_type == 'multiclass' else 'multilabel'}"
            )
        return LabelMap(self.name, label_type, self.info.class_names, task.class_names, label_map)

    def batches(self):
        """One pass over the split: host batches with 'mask' (0 = padding)."""
        return self.data.dataset("eval", self.batch_size).as_numpy_iterator()

    def predict(self, variables: Mapping, outputs=("logits",)) -> dict[str, np.ndarray]:
        """Model outputs and labels of every real image (see Predictor.predict)."""
        result = self.ctx.predictor.predict(variables, self.batches(), outputs)
        if not len(result["case_id"]):
            raise ValueError(
                f"eval {self.name!r}: split {self.split!r} of {self.config.source} yielded "
                "no images"
            )
        return result
