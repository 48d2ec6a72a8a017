"""The common protocol of the evaluators and what they share.

An evaluator is configured as `config.evals.NAME = dict(type=..., data=...)`
and built once per run; `evaluate(variables, step)` returns an `EvalOutput`
(metrics with bootstrap confidence intervals, plus artifacts such as a
confusion matrix). Every evaluator reads its data through the same path:

  - `data`: overrides of the run's `config.data` (e.g. dict(split='test') or
    dict(source='records:/data/nih', split='test')), read in the pipeline's
    'eval' mode (fixed order, evaluation crop, padded with mask=0 rows);
  - predictions from the jitted model on the training mesh (`Predictor`),
    gathered to every process, padding rows dropped exactly;
  - labels mapped onto the model's classes (`LabelMap`): identical class lists,
    or for a shifted dataset an explicit `label_map` {its class: model class}.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from micle_jax import sharding

TASK_FILE = "task_info.json"
LABEL_TYPES = ("multiclass", "multilabel")
# Fields every eval accepts; each evaluator type adds its own (EXTRA_FIELDS).
COMMON_FIELDS = ("type", "data", "label_map", "every_steps", "in_results", "batch_size")


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
            write_json_atomic(os.path.join(workdir, TASK_FILE), dataclasses.asdict(self))

    @classmethod
    def load(cls, workdir: str) -> TaskInfo:
        """Reads WORKDIR/task_info.json; a clear error if the run wrote none."""
        path = os.path.join(workdir, TASK_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: {workdir} is not a fine-tuning workdir (run "
                "`python -m micle_jax.main --config=configs/finetune_*.py` first)"
            )
        with open(path) as f:
            return cls(**json.load(f))


@dataclasses.dataclass
class Metric:
    """One evaluated number with its 95% bootstrap confidence interval."""

    name: str  # 'accuracy', 'top3', 'auc_mean', 'auc/<class>', 'per_class_accuracy/<class>'
    value: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")


@dataclasses.dataclass
class EvalOutput:
    """What an evaluator returns: metrics, plus artifacts (e.g. a confusion matrix)."""

    metrics: list[Metric]
    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def get(self, name: str) -> float:
        """The value of metric `name`; KeyError naming the available ones."""
        for metric in self.metrics:
            if metric.name == name:
                return metric.value
        raise KeyError(f"no metric {name!r}; available: {[m.name for m in self.metrics]}")


class Evaluator(Protocol):
    """The protocol: built from a config entry, then `evaluate` at any step."""

    name: str  # the key in config.evals
    split: str  # the data split it reads
    dataset: str  # the name of the dataset it reads
    every_steps: int  # 0: only at the end of training
    in_results: bool  # written to results.json

    def evaluate(self, variables: Mapping, step: int) -> EvalOutput:
        """Evaluates {'params', 'batch_stats'} (sharded like the train state)."""
        ...


def write_json_atomic(path: str, data: Any) -> None:
    """Writes JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def check_fields(name: str, entry: Mapping, extra: Iterable[str]) -> None:
    """Errors naming any field of config.evals.NAME that its type does not accept."""
    accepted = set(COMMON_FIELDS) | set(extra)
    unknown = sorted(set(entry) - accepted)
    if unknown:
        raise ValueError(
            f"config.evals.{name} has unknown field(s) {unknown} (misspelled?); accepted for "
            f"type {entry.get('type')!r}: {sorted(accepted)}"
        )


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


class LabelMap:
    """Maps an evaluation dataset's labels onto the model's classes.

    Without `label_map` the two class lists must be identical. With one
    (distribution shift, e.g. ChestX-ray14 onto CheXpert's five findings),
    every class of the dataset must be a key, mapped to a model class name or
    to '' (dropped: multiclass examples of that class are left out; multilabel
    columns are ignored). Model classes that nothing maps to get no labels
    (multilabel: no AUC for them).
    """

    def __init__(
        self,
        name: str,
        label_type: str,
        data_classes: Sequence[str],
        model_classes: Sequence[str],
        label_map: Mapping[str, str] | None,
    ):
        self.label_type = label_type
        self.num_model = len(model_classes)
        model_index = {c: i for i, c in enumerate(model_classes)}
        if not label_map:
            if list(data_classes) != list(model_classes):
                raise ValueError(
                    f"eval {name!r}: the data's classes {list(data_classes)} differ from the "
                    f"model's {list(model_classes)}; evaluate data with the same classes or set "
                    f"config.evals.{name}.label_map = {{data class: model class}}"
                )
            self.index = np.arange(len(model_classes))
            return
        label_map = dict(label_map)
        missing = [c for c in data_classes if c not in label_map]
        if missing:
            raise ValueError(
                f"config.evals.{name}.label_map does not say where the data's classes "
                f"{missing} go; map each to a model class {list(model_classes)} or to '' "
                "to leave it out"
            )
        extra = sorted(set(label_map) - set(data_classes))
        if extra:
            raise ValueError(
                f"config.evals.{name}.label_map names {extra}, which are not classes of the "
                f"data {list(data_classes)}"
            )
        bad = sorted({v for v in label_map.values() if v and v not in model_index})
        if bad:
            raise ValueError(
                f"config.evals.{name}.label_map maps onto {bad}, which are not model classes "
                f"{list(model_classes)}"
            )
        targets = [label_map[c] for c in data_classes if label_map[c]]
        if label_type == "multilabel" and len(set(targets)) != len(targets):
            raise ValueError(
                f"config.evals.{name}.label_map maps several data classes onto one model "
                "class; a multilabel column needs exactly one source"
            )
        if not targets:
            raise ValueError(f"config.evals.{name}.label_map maps no class onto the model's")
        self.index = np.array([model_index.get(label_map[c], -1) for c in data_classes])

    def multiclass(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n] data class indices -> ([n] model class indices, [n] keep weights 0/1).

        Unlabelled images (-1) and classes mapped to '' get weight 0.

        Raises:
          ValueError: a label is outside the data's class list.
        """
        labels = np.asarray(labels)
        bad = labels[(labels < -1) | (labels >= len(self.index))]
        if bad.size:
            raise ValueError(
                f"label {int(bad[0])} is outside the class list of the evaluation data "
                f"({len(self.index)} classes); the records and dataset_info.json disagree"
            )
        mapped = np.where(labels >= 0, self.index[np.maximum(labels, 0)], -1)
        return np.maximum(mapped, 0), (mapped >= 0).astype(np.float64)

    def multilabel(self, labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n, data classes] targets and mask -> [n, model classes] targets and mask."""
        labels, mask = np.asarray(labels), np.asarray(mask)
        if labels.shape[1] != len(self.index):
            raise ValueError(
                f"evaluation labels have {labels.shape[1]} columns but the data lists "
                f"{len(self.index)} classes"
            )
        out = np.zeros((labels.shape[0], self.num_model), np.float32)
        out_mask = np.zeros_like(out)
        for source, target in enumerate(self.index):
            if target >= 0:
                out[:, target] = labels[:, source]
                out_mask[:, target] = mask[:, source]
        return out, out_mask


def _gather_strings(values: np.ndarray) -> np.ndarray:
    """All processes' [n_p] strings, concatenated in process order."""
    encoded = [str(v.decode() if isinstance(v, bytes) else v).encode() for v in values]
    width = max([len(e) for e in encoded] + [1])
    width = int(np.max(multihost_utils.process_allgather(np.array([width]))))
    codes = np.zeros((len(encoded), width), np.uint8)
    for i, e in enumerate(encoded):
        codes[i, : len(e)] = np.frombuffer(e, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(codes, tiled=True))
    return np.array([bytes(row).rstrip(b"\0").decode() for row in gathered], dtype=object)


class Predictor:
    """Runs the model over an eval dataset on the training mesh; gathers the outputs.

    One jitted forward pass per batch (BatchNorm on running averages), the
    batch sharded over the data axis as in training. Outputs are taken back
    to each process's own rows, joined with the host-side fields (labels,
    case and image ids), gathered across processes, and the padding rows
    (mask 0) dropped, so every process returns every real image exactly once.
    """

    def __init__(self, model, mesh: Mesh):
        self.mesh = mesh

        def forward(variables, images):
            return model.apply(variables, images, train=False)

        self._forward = jax.jit(forward, out_shardings=sharding.batch_sharding(mesh))

    def predict(
        self, variables: Mapping, batches: Iterable[Mapping[str, np.ndarray]], outputs: Sequence
    ) -> dict[str, np.ndarray]:
        """Model outputs and host fields for every real image.

        Args:
          variables: {'params', 'batch_stats'} of the model.
          batches: host batches of the pipeline's 'eval' mode: 'image'
            [b, s, s, 3], 'mask' [b], 'label', optional 'label_mask',
            'case_id', 'image_id'.
          outputs: model outputs to keep, e.g. ('logits',) or ('features',).

        Returns:
          {output: [n, ...] float32, 'label', 'label_mask' (if present),
           'case_id', 'image_id': [n] str} for the n real (mask 1) images.
        """
        local: dict[str, list] = {}
        for batch in batches:
            images = sharding.host_to_global({"image": batch["image"]}, self.mesh)["image"]
            out = self._forward(dict(variables), images)
            missing = [k for k in outputs if k not in out]
            if missing:
                raise ValueError(
                    f"the model has no output {missing} (available: {sorted(out)}); a "
                    "classification eval needs a model with a head (num_classes > 0)"
                )
            host = multihost_utils.global_array_to_host_local_array(
                {k: out[k] for k in outputs}, self.mesh, P(sharding.DATA_AXIS)
            )
            for key in outputs:
                local.setdefault(key, []).append(np.asarray(host[key]))
            for key in ("mask", "label", "label_mask", "case_id", "image_id"):
                if key in batch:
                    local.setdefault(key, []).append(np.asarray(batch[key]))
        if "mask" not in local:
            raise ValueError("the evaluation data is empty: it yielded no batch")
        result = {k: np.concatenate(v, axis=0) for k, v in local.items()}
        if jax.process_count() > 1:
            for key, value in list(result.items()):
                if value.dtype.kind in "OSU":
                    result[key] = _gather_strings(value)
                else:
                    result[key] = np.asarray(multihost_utils.process_allgather(value, tiled=True))
        keep = result.pop("mask") > 0
        result = {k: v[keep] for k, v in result.items()}
        for key in ("case_id", "image_id"):
            if key in result:
                result[key] = np.array(
                    [v.decode() if isinstance(v, bytes) else str(v) for v in result[key]],
                    dtype=object,
                )
        return result


def metric_rows(
    output: EvalOutput, evaluator: Evaluator, step: int, checkpoint: str
) -> list[dict[str, Any]]:
    """results.json rows of one evaluation (the format the sweep report reads)."""
    return [
        {
            "eval": evaluator.name,
            "metric": m.name,
            "value": float(m.value),
            "ci_low": float(m.ci_low),
            "ci_high": float(m.ci_high),
            "split": evaluator.split,
            "dataset": evaluator.dataset,
            "step": int(step),
            "checkpoint": checkpoint,
        }
        for m in output.metrics
    ]


def write_results(
    workdir: str,
    config: ml_collections.ConfigDict,
    rows: list[dict[str, Any]],
    artifacts: Mapping[str, Any] | None = None,
) -> str:
    """Atomically writes WORKDIR/results.json (process 0 only); returns its path.

    Format: {"workdir", "config": the full config, "results": rows,
    "artifacts": {"<eval>/<checkpoint>": {...}}} (artifacts such as confusion
    matrices, which are not single numbers).
    """
    path = os.path.join(workdir, "results.json")
    if jax.process_index() == 0:
        data = {
            "workdir": workdir,
            "config": json.loads(config.to_json_best_effort()),
            "results": rows,
            "artifacts": dict(artifacts or {}),
        }
        write_json_atomic(path, data)
    return path
