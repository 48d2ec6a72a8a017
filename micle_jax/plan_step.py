"""The trainers' update step, built for the planner without data or devices.

`build_step` makes the model, optimizer and step of a config exactly as
trainers/pretrain.py and trainers/finetune.py make them; `batch_spec` is the
global batch the train loop feeds the step (pipeline.Data.dataset's keys,
strings dropped), as abstract arrays. The labels the head is built for come
from the data, as in the trainers (`data_label_info`, which imports
TensorFlow), or from the planner's flags (`label_info`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from micle_jax import optim

TRAINERS = ("pretrain", "finetune")
LABEL_TYPES = ("multiclass", "multilabel")
# The learning-rate schedule is a constant of the compiled step; its length
# changes neither its memory nor its FLOPs, so the planner needs no epoch size.
SCHEDULE_STEPS, SCHEDULE_WARMUP = 1000, 100


@dataclasses.dataclass(frozen=True)
class LabelInfo:
    """The labels the head is built for, as the trainers read them from the data.

    Has the fields of data.records.DatasetInfo that the trainers use, so
    `task.make_task` accepts it.
    """

    label_type: str  # 'none', 'multiclass' or 'multilabel'
    class_names: tuple[str, ...]
    name: str = "planned"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def label_info(num_classes: int, label_type: str = "multiclass") -> LabelInfo:
    """LabelInfo for `num_classes` classes (0: no labels, so no probe head)."""
    if num_classes < 0:
        raise ValueError(f"num_classes={num_classes} must be >= 0")
    if label_type not in LABEL_TYPES:
        raise ValueError(f"label_type={label_type!r}; accepted: {', '.join(LABEL_TYPES)}")
    if num_classes == 0:
        return LabelInfo("none", ())
    return LabelInfo(label_type, tuple(f"class_{i}" for i in range(num_classes)))


def data_label_info(config: ml_collections.ConfigDict) -> LabelInfo:
    """The labels of config.data's source, opened as the trainers open it (imports TF)."""
    from micle_jax.data.stream import pipeline

    try:
        info = pipeline.open_data(config.data, seed=config.seed).info
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ValueError(
            f"cannot read the labels of config.data.source={config.data.source!r} ({e}); pass "
            "--num_classes=N (the data's classes, e.g. 1000 for ImageNet; 0 = no label head)"
        ) from e
    return LabelInfo(info.label_type, tuple(info.class_names), info.name)


def batch_spec(trainer: str, batch: int, image_size: int, info: LabelInfo) -> dict:
    """The arrays a step takes for `batch` examples, as host_to_global makes them.

    Keys, shapes and dtypes of pipeline.Data.dataset's batches ('simclr' /
    'micle' for pre-training, 'supervised' for fine-tuning), strings dropped.
    """
    image = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    if trainer == "pretrain":
        return {
            "view1": image,
            "view2": image,
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
            "multi_instance": jax.ShapeDtypeStruct((batch,), jnp.bool_),
        }
    if info.label_type == "multilabel":
        labels = jax.ShapeDtypeStruct((batch, info.num_classes), jnp.float32)
        return {"image": image, "label": labels, "label_mask": labels}
    return {"image": image, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}


def build_step(config: ml_collections.ConfigDict, info: LabelInfo):
    """The trainer's model, optimizer and (unjitted) step for `config`.

    Returns:
      (model, tx, step_fn, head_classes).
    """
    trainer = config.get("trainer", "pretrain")
    if trainer not in TRAINERS:
        raise ValueError(f"config.trainer={trainer!r} cannot be planned; accepted: {TRAINERS}")
    batch = config.batch_size
    schedule = optim.make_schedule(config.optim, SCHEDULE_STEPS, SCHEDULE_WARMUP, batch)
    if trainer == "pretrain":
        from micle_jax.trainers import contrastive_step

        model, probe = contrastive_step.build_model(config, info)
        tx = optim.make_optimizer(config.optim, schedule)
        step = contrastive_step.make_train_step(model, tx, schedule, config.loss.temperature, probe)
        return model, tx, step, info.num_classes if probe else 0
    # As finetune.main's "Task", "Model" and "Optimizer and state" sections;
    # class weights ('balanced') are a [C] constant whose values do not matter here.
    from micle_jax import task as task_lib
    from micle_jax.trainers import supervised_step

    task = task_lib.make_task(config, info)
    model = task_lib.build_model(config, task)
    tx = supervised_step.make_optimizer(config, model, task.image_size, schedule)
    weights = np.ones(task.num_classes, np.float32) if config.class_weight == "balanced" else None
    step = supervised_step.make_train_step(model, tx, schedule, task.label_type, weights)
    return model, tx, step, task.num_classes
