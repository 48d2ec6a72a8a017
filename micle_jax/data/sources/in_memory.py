"""The in-memory sources: synthetic images and arrays (an npz file or `from_arrays`).

Each split is one ImageTable, built on first use; a process share takes
every count-th case. registry.py picks these by `data.source`
('synthetic[:...]', 'arrays:PATH.npz'); see interface.py for the interface.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os

import numpy as np

from micle_jax import config_lib, fs
from micle_jax.data import records
from micle_jax.data.sources import image_table, interface, synthetic
from micle_jax.data.sources.image_table import ImageTable


class TableSource(interface.Source):
    """In-memory source: one ImageTable per split; shares take every count-th case."""

    def __init__(self, info: records.DatasetInfo, tables: dict):
        self.info = info
        self._tables = tables  # split -> ImageTable or a function building it

    def table(self, split: str, share: interface.Share, num_parallel_calls: int = -1) -> ImageTable:
        if split not in self._tables:
            raise interface.split_error(split, self._tables)
        if callable(self._tables[split]):
            self._tables[split] = self._tables[split]()
        full = self._tables[split]
        if share.count == 1:
            return full
        return full.take_cases(np.arange(share.index, full.num_cases, share.count))

    def counts(self, split: str, share: interface.Share) -> interface.CaseCounts:
        full = self.table(split, interface.Share())
        cases = np.arange(share.index, full.num_cases, share.count)
        return interface.table_counts(full, cases, self.info.label_type)


def from_arrays(
    images,
    labels=None,
    case_ids=None,
    *,
    split: str = "train",
    class_names=None,
    name: str = "arrays",
) -> TableSource:
    """An in-memory source from arrays (for tests, notebooks and npz files).

    Args:
      images: uint8 [n, h, w] (gray) or [n, h, w, 1 or 3].
      labels: None (unlabeled), int [n] or [n, 1] class indices (multiclass), or
        float [n, num_classes] with C > 1 (multilabel: 1, 0, records.UNCERTAIN,
        records.MISSING).
      case_ids: None (every image its own case) or [n] ids; images with the same
        id form one case (MICLe pairs), in order of first appearance.
      split: the split name these arrays are.
      class_names: names of the classes; default '0', '1', ...
      name: the dataset's name in logs.
    """
    return _arrays_source({split: (images, labels, case_ids)}, class_names, name)


def _arrays_source(splits: dict, class_names, name: str) -> TableSource:
    label_type, num_classes = "none", 0
    for split, (images, labels, _) in splits.items():
        if np.asarray(images).ndim not in (3, 4) or np.asarray(images).dtype != np.uint8:
            raise ValueError(
                f"{name} {split}: images must be uint8 [n, h, w] or [n, h, w, c], got "
                f"{np.asarray(images).dtype} {np.asarray(images).shape}"
            )
        if labels is None:
            continue
        labels = np.asarray(labels)
        if labels.dtype.kind in "iu":
            labels = labels.astype(np.int64)
        if labels.shape[0] != len(images):
            raise ValueError(f"{name} {split}: {len(labels)} labels for {len(images)} images")
        if labels.ndim == 2 and labels.shape[1] > 1:
            label_type, num_classes = "multilabel", labels.shape[1]
        else:
            label_type = "multiclass"
            num_classes = max(num_classes, int(labels.max(initial=-1)) + 1)
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if label_type != "none" and len(names) != num_classes:
        raise ValueError(f"{name}: {len(names)} class_names for {num_classes} classes")
    info = records.DatasetInfo(
        name=name,
        label_type=label_type,
        class_names=names if label_type != "none" else [],
        splits={},
    )
    tables = {
        split: functools.partial(_arrays_table, split, *arrays, label_type, num_classes)
        for split, arrays in splits.items()
    }
    return TableSource(info, tables)


def _arrays_table(split, images, labels, case_ids, label_type, num_classes) -> ImageTable:
    images = np.asarray(images)
    n = len(images)
    label_class = np.full([n], -1, np.int32)
    label_multi = np.zeros([n, 0], np.float32)
    if label_type == "multiclass" and labels is not None:
        label_class = np.asarray(labels).reshape(n).astype(np.int32)
    elif label_type == "multilabel":
        label_multi = np.asarray(labels, np.float32).reshape(n, num_classes)
    if case_ids is None:
        case_ids = [f"{split}-{i:07d}" for i in range(n)]
    unique, first, inverse = np.unique(np.asarray(case_ids), return_index=True, return_inverse=True)
    # Cases in order of first appearance; a case's images keep their input order.
    by_appearance = np.argsort(first)
    rank = np.empty_like(by_appearance)
    rank[by_appearance] = np.arange(len(unique))
    image_rank = rank[inverse.reshape(-1)]
    order = np.argsort(image_rank, kind="stable")
    return image_table.pack(
        list(images[order]),
        image_ids=[f"{split}-{i:07d}" for i in order],
        label_class=label_class[order],
        label_multi=label_multi[order],
        case_ids=unique[by_appearance],
        case_size=np.bincount(image_rank, minlength=len(unique)),
    )


def from_npz(path: str) -> TableSource:
    """The source of a MedMNIST-style npz: {split}_images and {split}_labels arrays."""
    if not fs.isfile(path):
        raise FileNotFoundError(
            f"arrays source: {path!r} not found (expected a MedMNIST-style npz)"
        )
    # np.load needs a seekable file: a URL's bytes are read into memory first.
    with np.load(io.BytesIO(fs.read_bytes(path)) if fs.is_url(path) else path) as data:
        arrays = {k: data[k] for k in data.files}
    splits = {}
    # MedMNIST names the validation split 'val'.
    for split, stem in (("train", "train"), ("validation", "val"), ("test", "test")):
        for key in (split, stem):
            if f"{key}_images" in arrays:
                splits[split] = (arrays[f"{key}_images"], arrays.get(f"{key}_labels"), None)
                break
    if not splits:
        raise ValueError(f"{path!r} has no {{split}}_images arrays; keys: {sorted(arrays)}")
    return _arrays_source(splits, None, os.path.basename(path))


def from_synthetic(arg: str) -> TableSource:
    """The synthetic source; `arg` is the part after 'synthetic:' (registry.py lists its keys)."""
    parsed = config_lib.parse_arg(arg, **synthetic.DEFAULTS, multilabel=False)
    options = config_lib.parse_arg(None, **{k: parsed[k] for k in synthetic.DEFAULTS})
    synthetic.check_options(options)
    info = records.DatasetInfo(
        name="synthetic",
        label_type="multilabel" if parsed.multilabel else "multiclass",
        class_names=[f"class_{i}" for i in range(options.num_classes)],
        splits={},
    )
    make = _synthetic_multilabel_table if parsed.multilabel else synthetic.make_table
    tables = {
        split: functools.partial(make, split=split, **options.to_dict()) for split in records.SPLITS
    }
    return TableSource(info, tables)


def _synthetic_multilabel_table(split: str, **options) -> ImageTable:
    """The synthetic split with multilabel targets: each image is positive for its class.

    For CPU smoke runs of multilabel tasks (configs/finetune_chexpert.py with
    runlocal): one positive per image, the other findings negative, and some
    labels UNCERTAIN or MISSING (CheXpert's conventions) so that the
    uncertain-label policies and the label masks are exercised.
    """
    table = synthetic.make_table(split=split, **options)
    num_classes = options["num_classes"]
    multi = np.eye(num_classes, dtype=np.float32)[table.label_class]
    index = np.arange(table.num_images)
    multi[index % 5 == 0, (index[index % 5 == 0] + 1) % num_classes] = records.UNCERTAIN
    multi[index % 7 == 0, (index[index % 7 == 0] + 2) % num_classes] = records.MISSING
    return dataclasses.replace(
        table, label_multi=multi, label_class=np.full_like(table.label_class, -1)
    )
