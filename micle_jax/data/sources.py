"""Where images come from, chosen by `data.source`:

  'synthetic[:num_cases=256,num_classes=10,image_size=64,max_images_per_case=3]'
      generated in memory: class-dependent colour, stripes and a disk, plus
      noise; 1..max images per case so MICLe runs without any data.
      ',multilabel=True' gives multilabel targets (for multilabel smoke runs).
  'records:PATH'          the case records of micle_jax.data.records.
  'tfds:NAME[?data_dir=DIR]'  a prepared TFDS dataset, one image per case.
  'arrays:PATH.npz'       MedMNIST-style {split}_images / {split}_labels.
  or a Source object, e.g. `from_arrays(images, labels, case_ids)`.

A source is either in memory (`table()` gives an ImageTable) or streamed
(stream_sources.py: `cases()` gives a finite tf.data stream of encoded cases;
`table()` decodes it all when the config asks for `cache_decoded`). Both know exactly how many
cases and images each process share holds, which the pipeline needs to map a
step to an epoch and position (exact resume).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf

from micle_jax import config_lib
from micle_jax.data import image_table, records, synthetic
from micle_jax.data.image_table import ImageTable


@dataclasses.dataclass(frozen=True)
class Share:
    """The part of a split that process `index` of `count` reads."""

    index: int = 0
    count: int = 1


@dataclasses.dataclass
class CaseCounts:
    """Per case of a share, in the share's canonical order.

    images: int [num_cases] usable images; labeled: int [num_cases] those with a
    label usable for supervised training; case_ids: object (bytes) [num_cases],
    or None where the source cannot list them cheaply (TFDS).
    """

    images: np.ndarray
    labeled: np.ndarray
    case_ids: np.ndarray | None = None


class Source:
    """Base class: `info`, plus in-memory (`table`) or streaming (`cases`) access."""

    info: records.DatasetInfo
    in_memory: bool = True
    # Whether cases() reads its files in a new order each epoch (order_seed).
    file_order_per_epoch: bool = False

    def table(self, split: str, share: Share, num_parallel_calls: int = -1) -> ImageTable:
        """Decoded images of `share` of `split`."""
        raise NotImplementedError

    def counts(self, split: str, share: Share) -> CaseCounts:
        """Usable images per case of `share` of `split`."""
        table = self.table(split, share)
        return _table_counts(table, np.arange(table.num_cases), self.info.label_type)

    def image_labels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(case id, label_class) of every usable image of `split`: object [n], int32 [n]."""
        table = self.table(split, Share())
        return np.repeat(table.case_ids, table.case_size), table.label_class

    def cases(self, split: str, share: Share, order_seed=None) -> tf.data.Dataset:
        """Finite stream of encoded cases (streaming sources only); see RecordsSource."""
        raise NotImplementedError(f"{type(self).__name__} is in memory; use table()")


# Largest mean spread (max - min over an image's channels, in 8-bit levels) of a
# 3-channel image that still counts as gray: X-rays saved as RGB have 0, JPEG
# rounding adds about 1; skin photographs have tens.
GRAY_SPREAD = 2.0


def is_gray(image: np.ndarray) -> bool:
    """Whether uint8 [h, w, c] `image` is gray: one channel, or channels equal within GRAY_SPREAD.

    The spread is averaged over pixels, so a coloured marker on an X-ray
    does not make it a colour image.
    """
    if image.shape[-1] == 1:
        return True
    spread = image.max(axis=-1).astype(np.float64) - image.min(axis=-1)
    return float(spread.mean()) <= GRAY_SPREAD


def first_images(source: Source, split: str, max_images: int = 16) -> list[np.ndarray]:
    """Up to `max_images` decoded images (uint8 [h, w, c]) of the first cases of `split`.

    In the split's canonical order, whole split (not a process's share), so
    every process sees the same images. A streamed source decodes only these
    (never the whole split, whatever data.cache_decoded says); images that
    fail to decode are skipped.
    """
    if source.in_memory:
        table = source.table(split, Share())
        return [table.image(i) for i in range(min(max_images, table.num_images))]
    images = []
    for case in source.cases(split, Share()).take(max_images).as_numpy_iterator():
        for encoded in case["images"]:
            try:
                images.append(image_table.decode_image(tf.constant(encoded)).numpy())
            except tf.errors.InvalidArgumentError:
                continue
            if len(images) == max_images:
                return images
    return images


def usable_labels(label_type: str, label_class: np.ndarray) -> np.ndarray:
    """int64 [n]: 1 where an image (label_class int [n]) can train a supervised model."""
    if label_type == "multilabel":
        return np.ones_like(label_class, np.int64)
    if label_type == "multiclass":
        return (label_class >= 0).astype(np.int64)
    return np.zeros_like(label_class, np.int64)


def _table_counts(table: ImageTable, cases: np.ndarray, label_type: str) -> CaseCounts:
    """Counts of the cases `cases` (int [k]) of `table`."""
    labeled = usable_labels(label_type, table.label_class)
    per_case = np.add.reduceat(labeled, table.case_start) if table.num_cases else labeled
    return CaseCounts(
        table.case_size[cases].astype(np.int64),
        per_case[cases].astype(np.int64),
        table.case_ids[cases],
    )


def split_error(split: str, available) -> ValueError:
    """The error for a split that does not exist, listing the ones that do."""
    return ValueError(f"split {split!r} not found; available splits: {sorted(available)}")


class TableSource(Source):
    """In-memory source: one ImageTable per split; shares take every count-th case."""

    def __init__(self, info: records.DatasetInfo, tables: dict):
        self.info = info
        self._tables = tables  # split -> ImageTable or a function building it

    def table(self, split: str, share: Share, num_parallel_calls: int = -1) -> ImageTable:
        if split not in self._tables:
            raise split_error(split, self._tables)
        if callable(self._tables[split]):
            self._tables[split] = self._tables[split]()
        full = self._tables[split]
        if share.count == 1:
            return full
        return full.take_cases(np.arange(share.index, full.num_cases, share.count))

    def counts(self, split: str, share: Share) -> CaseCounts:
        full = self.table(split, Share())
        cases = np.arange(share.index, full.num_cases, share.count)
        return _table_counts(full, cases, self.info.label_type)


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


def _npz_source(path: str) -> TableSource:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"arrays source: {path!r} not found (expected a MedMNIST-style npz)"
        )
    with np.load(path) as data:
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


def _synthetic_source(arg: str) -> TableSource:
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


def get_source(spec) -> Source:
    """The Source named by `spec` (a string as in this module's docstring) or `spec` itself."""
    if isinstance(spec, Source):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"data.source must be a string or a sources.Source, got {type(spec)}")
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return _synthetic_cached(arg)
    if kind in ("records", "tfds") and arg:
        # Imported here: the streamed sources subclass this module's Source.
        from micle_jax.data import stream_sources

        if kind == "records":
            return stream_sources.RecordsSource(arg)
        name, _, query = arg.partition("?")
        options = config_lib.parse_arg(query.replace("&", ","), data_dir="")
        return stream_sources.TfdsSource(name, options.data_dir or None)
    if kind == "arrays" and arg:
        mtime = os.stat(arg).st_mtime_ns if os.path.isfile(arg) else None
        return _npz_cached(arg, mtime)
    raise ValueError(
        f"data.source={spec!r} is not understood; use one of 'synthetic[:key=value,...]', "
        "'records:PATH', 'tfds:NAME[?data_dir=DIR]', 'arrays:PATH.npz'"
    )


# Cached so num_examples() and make_dataset() share one table (a rewritten npz,
# with a new mtime, is read again).
@functools.lru_cache(maxsize=8)
def _synthetic_cached(arg: str) -> TableSource:
    return _synthetic_source(arg)


@functools.lru_cache(maxsize=8)
def _npz_cached(path: str, mtime_ns: int | None) -> TableSource:
    del mtime_ns  # Only part of the cache key.
    return _npz_source(path)
