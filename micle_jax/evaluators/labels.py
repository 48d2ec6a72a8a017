"""Maps an evaluation dataset's labels onto a model's classes (`LabelMap`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


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
