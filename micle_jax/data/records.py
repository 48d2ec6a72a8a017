"""The patient-grouped record format: one `tf.train.Example` per case.

A dataset folder holds `dataset_info.json` and TFRecord shards named
`{split}-{i:05d}-of-{n:05d}`. Each record is one patient CASE with all its
images, because MICLe (Azizi et al., ICCV 2021) draws its positive pair from two
different images of the same case; grouping by case on disk also makes a
patient-level train/test split the only possible split. Features:

  case/id           bytes    [1]
  image/encoded     bytes    [n]   PNG or JPEG bytes, n >= 1 (PNG: 8-bit, or 16-bit
                                   grayscale from --bit_depth=16)
  image/id          bytes    [n]   unique within the dataset
  image/format      bytes    [n]   'png' | 'jpeg'
  image/meta        bytes    [n]   JSON object per image ('{}' if none)
  label/class       int64    [n]   class index, -1 = no label (always present)
  label/multilabel  float32  [n * num_classes], row-major, only for 'multilabel':
                    1 positive, 0 negative, UNCERTAIN, MISSING

docs/data_format.md describes the format and the converter
(`python -m micle_jax.data.convert`) that writes it. A dataset folder may be a
gs:// URL (micle_jax/fs.py): tf.data reads the shards from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from micle_jax import fs

# CheXpert's label convention: -1 marks an uncertain finding, a blank cell a
# finding the report did not mention.
UNCERTAIN = -1.0
MISSING = -2.0

LABEL_TYPES = ("none", "multiclass", "multilabel")
SPLITS = ("train", "validation", "test")
IMAGE_FORMATS = ("png", "jpeg")
# An encoded image's first bytes, by format: how a reader tells PNG and JPEG
# (all that image/encoded holds, and what tf.io.decode_image reads) from anything else.
IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}
# What the images show, for choosing the augmentation (stream/pipeline.py Data.augment_policy):
# '' = not recorded (datasets converted before the field existed).
MODALITIES = ("cxr", "dermatology", "other")
INFO_FILE = "dataset_info.json"

CONVERT_HINT = "write one with `python -m micle_jax.data.convert` (see docs/data_format.md)"


@dataclasses.dataclass
class DatasetInfo:
    """The contents of `dataset_info.json`.

    `splits` maps a split name to {"num_cases", "num_images", "images_per_case":
    {"1": count, "2": count, ...}, "shards": [{"file", "num_cases", "sha256"}]}.
    `skipped` lists the inputs the converter left out with --on_error=skip.
    `modality` is one of MODALITIES, or '' when not recorded (convert
    --modality); written only when set, so older files stay byte-identical.
    """

    name: str
    label_type: str
    class_names: list[str]
    splits: dict[str, dict[str, Any]]
    converter: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""
    license: str = ""
    citation: str = ""
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    modality: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for label_type 'none')."""
        return len(self.class_names)

    def check(self) -> None:
        """Raises ValueError if the fields contradict the format."""
        if self.label_type not in LABEL_TYPES:
            raise ValueError(f"label_type {self.label_type!r} is not one of {LABEL_TYPES}")
        if self.modality and self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r} is not one of {MODALITIES} (or '')")
        if self.label_type != "none" and not self.class_names:
            raise ValueError(f"label_type {self.label_type!r} needs a non-empty class_names")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names has duplicates: {self.class_names}")
        for split, entry in self.splits.items():
            if split not in SPLITS:
                raise ValueError(f"split {split!r} is not one of {SPLITS}")
            missing = {"num_cases", "num_images", "images_per_case", "shards"} - set(entry)
            if missing:
                raise ValueError(f"split {split!r} lacks {sorted(missing)}")


def load_info(path: str) -> DatasetInfo:
    """Reads and checks `{path}/dataset_info.json`.

    Raises:
      FileNotFoundError: the folder or its dataset_info.json does not exist.
      ValueError: the JSON is corrupt or does not describe a dataset.
    """
    if not fs.isdir(path):
        raise FileNotFoundError(f"dataset folder {path!r} does not exist; {CONVERT_HINT}")
    info_path = os.path.join(path, INFO_FILE)
    if not fs.isfile(info_path):
        raise FileNotFoundError(
            f"{info_path!r} not found: {path!r} is not a converted dataset; {CONVERT_HINT}"
        )
    try:
        with fs.open(info_path) as f:
            raw = json.load(f)
        fields = {f.name for f in dataclasses.fields(DatasetInfo)}
        info = DatasetInfo(**{k: v for k, v in raw.items() if k in fields})
        info.check()
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"{info_path!r} is corrupt ({e}); convert the data again: {CONVERT_HINT}"
        ) from e
    return info


def write_info(path: str, info: DatasetInfo) -> None:
    """Writes `info` as `{path}/dataset_info.json` (after checking it)."""
    info.check()
    fs.makedirs(path)
    fields = dataclasses.asdict(info)
    if not fields["modality"]:
        del fields["modality"]
    with fs.open(os.path.join(path, INFO_FILE), "w") as f:
        json.dump(fields, f, indent=2)
        f.write("\n")


def _bytes_feature(values: Sequence[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def make_case_example(
    case_id: str | bytes,
    images: Sequence[bytes],
    image_ids: Sequence[str | bytes],
    formats: Sequence[str],
    meta: Sequence[dict | str] | None = None,
    label_class: Sequence[int] | None = None,
    label_multi: Any = None,
) -> tf.train.Example:
    """Builds the record of one case with n images.

    Args:
      case_id: the patient/case identifier.
      images: n encoded images (PNG or JPEG bytes).
      image_ids: n identifiers, unique within the dataset.
      formats: n strings, 'png' or 'jpeg'.
      meta: n dicts (or JSON object strings) of per-image metadata; None = '{}'.
      label_class: n class indices (-1 = no label); None = all -1.
      label_multi: [n, num_classes] float array with 1, 0, UNCERTAIN, MISSING;
        None for datasets whose label_type is not 'multilabel'.
    """
    n = len(images)
    if n < 1:
        raise ValueError(f"case {case_id!r} has no images; every case needs at least one")
    lengths = {"image_ids": len(image_ids), "formats": len(formats)}
    if meta is not None:
        lengths["meta"] = len(meta)
    if label_class is not None:
        lengths["label_class"] = len(label_class)
    for name, length in lengths.items():
        if length != n:
            raise ValueError(f"case {case_id!r}: {name} has {length} entries for {n} images")
    bad = [f for f in formats if f not in IMAGE_FORMATS]
    if bad:
        raise ValueError(f"case {case_id!r}: image formats {bad} are not in {IMAGE_FORMATS}")
    meta_json = [
        m if isinstance(m, str) else json.dumps(m, sort_keys=True)
        for m in (meta if meta is not None else [{}] * n)
    ]
    classes = [-1] * n if label_class is None else [int(c) for c in label_class]
    feature = {
        "case/id": _bytes_feature([_as_bytes(case_id)]),
        "image/encoded": _bytes_feature(list(images)),
        "image/id": _bytes_feature([_as_bytes(i) for i in image_ids]),
        "image/format": _bytes_feature([_as_bytes(f) for f in formats]),
        "image/meta": _bytes_feature([_as_bytes(m) for m in meta_json]),
        "label/class": tf.train.Feature(int64_list=tf.train.Int64List(value=classes)),
    }
    if label_multi is not None:
        multi = np.asarray(label_multi, np.float32)
        if multi.ndim != 2 or multi.shape[0] != n:
            raise ValueError(
                f"case {case_id!r}: label_multi shape {multi.shape} is not [{n}, num_classes]"
            )
        feature["label/multilabel"] = tf.train.Feature(
            float_list=tf.train.FloatList(value=multi.reshape(-1).tolist())
        )
    return tf.train.Example(features=tf.train.Features(feature=feature))


def parse_case(serialized: tf.Tensor, num_classes: int, label_type: str) -> dict[str, tf.Tensor]:
    """Parses one serialized case; works eagerly and inside `Dataset.map`.

    Args:
      serialized: tf.string [] scalar, one record.
      num_classes: `DatasetInfo.num_classes`.
      label_type: `DatasetInfo.label_type`.

    Returns:
      {'case_id': tf.string [], 'images': tf.string [n], 'image_ids': tf.string [n],
       'formats': tf.string [n], 'meta': tf.string [n], 'label_class': tf.int32 [n],
       'label_multi': tf.float32 [n, num_classes] ([n, 0] unless 'multilabel')}.
    """
    if label_type not in LABEL_TYPES:
        raise ValueError(f"label_type {label_type!r} is not one of {LABEL_TYPES}")
    if label_type == "multilabel" and num_classes < 1:
        raise ValueError(f"label_type 'multilabel' needs num_classes >= 1, got {num_classes}")
    spec = {
        "case/id": tf.io.FixedLenFeature([], tf.string),
        "image/encoded": tf.io.VarLenFeature(tf.string),
        "image/id": tf.io.VarLenFeature(tf.string),
        "image/format": tf.io.VarLenFeature(tf.string),
        "image/meta": tf.io.VarLenFeature(tf.string),
        "label/class": tf.io.VarLenFeature(tf.int64),
    }
    if label_type == "multilabel":
        spec["label/multilabel"] = tf.io.VarLenFeature(tf.float32)
    parsed = tf.io.parse_single_example(serialized, spec)
    dense = {k: tf.sparse.to_dense(v) for k, v in parsed.items() if k != "case/id"}
    images = dense["image/encoded"]
    n = tf.shape(images)[0]
    checks = [
        tf.debugging.assert_equal(
            tf.shape(dense[key])[0], n, message=f"record: {key} and image/encoded differ in length"
        )
        for key in ("image/id", "image/format", "image/meta", "label/class")
    ]
    if label_type == "multilabel":
        checks.append(
            tf.debugging.assert_equal(
                tf.size(dense["label/multilabel"]),
                n * num_classes,
                message=f"record: label/multilabel needs n_images * {num_classes} values",
            )
        )
    with tf.control_dependencies(checks):
        n = tf.identity(n)
    if label_type == "multilabel":
        label_multi = tf.reshape(dense["label/multilabel"], [n, num_classes])
    else:
        label_multi = tf.zeros([n, 0], tf.float32)
    return {
        "case_id": parsed["case/id"],
        "images": images,
        "image_ids": dense["image/id"],
        "formats": dense["image/format"],
        "meta": dense["image/meta"],
        "label_class": tf.cast(dense["label/class"], tf.int32),
        "label_multi": label_multi,
    }
