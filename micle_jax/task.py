"""A fine-tuned model's task: what it predicts, and the model built for it.

Fine-tuning takes the task from its training data (`make_task`), writes it
to WORKDIR/task_info.json (`TaskInfo.save`) and builds the model with one
logit per class (`build_model`); the evaluators map their data's labels onto
the task's classes, and `predict` rebuilds the same model from the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections

from micle_jax import fs, models, rundir

LABEL_TYPES = ("multiclass", "multilabel")


@dataclasses.dataclass
class TaskInfo:
    """What a fine-tuned model predicts; WORKDIR/task_info.json, read by predict.py.

    Attributes:
      label_type: 'multiclass' (softmax) or 'multilabel' (sigmoid).
      class_names: the model's classes, in logit order.
      image_size: the side of the model's input images.
      dataset: name of the training dataset.
    """

    label_type: str
    class_names: list[str]
    image_size: int
    dataset: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def save(self, workdir: str) -> None:
        """Writes WORKDIR/task_info.json (process 0 only)."""
        if jax.process_index() == 0:
            rundir.write_json_atomic(
                os.path.join(workdir, rundir.TASK_FILE), dataclasses.asdict(self)
            )

    @classmethod
    def load(cls, workdir: str) -> TaskInfo:
        """Reads WORKDIR/task_info.json; a clear error if the run wrote none."""
        path = os.path.join(workdir, rundir.TASK_FILE)
        if not fs.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: {workdir} is not a fine-tuning workdir (run "
                "`python -m micle_jax.main --config=configs/finetune_*.py` first)"
            )
        with fs.open(path) as f:
            return cls(**json.load(f))


def make_task(config: ml_collections.ConfigDict, info) -> TaskInfo:
    """The model's task from the training data; errors on a mismatch with the config."""
    if info.label_type not in LABEL_TYPES:
        raise ValueError(
            f"fine-tuning needs labels, but {config.data.source} has label_type "
            f"{info.label_type!r}; use a labelled dataset (multiclass or multilabel)"
        )
    wanted = config.model.num_classes
    if wanted and wanted != info.num_classes:
        raise ValueError(
            f"config.model.num_classes={wanted} but {config.data.source} has "
            f"{info.num_classes} classes ({list(info.class_names)}); set "
            "config.model.num_classes=0 to take the count from the data"
        )
    return TaskInfo(
        label_type=info.label_type,
        class_names=list(info.class_names),
        image_size=int(config.data.image_size),
        dataset=getattr(info, "name", "") or str(config.data.source),
    )


def build_model(config: ml_collections.ConfigDict, task: TaskInfo):
    """The model of a fine-tuning config: its model block with the task's head."""
    model_config = config.model.copy_and_resolve_references()
    with model_config.unlocked():
        model_config.num_classes = task.num_classes
    return models.build_model(model_config)
