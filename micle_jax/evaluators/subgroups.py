"""Subgroups of an eval's images by their metadata: sex, age band, body site, view, ...

The records keep a JSON object of metadata per image (`image/meta`,
micle_jax/data/records.py; `convert --meta_columns`), e.g. HAM10000's
{"sex": "female", "age": "45.0", "localization": "back", "dx_type": "histo"}.
An eval's `subgroups` field names the columns to split by:

  subgroups='auto'                      every column that makes groups: categorical
                                        ones with 2..max_groups values, and numeric
                                        ones that have bands (age by default)
  subgroups=('sex', 'age')              these columns (an error if the data lacks one)
  subgroups=dict(by='auto', bands={'age': (40, 60)}, min_cases=50, max_groups=20,
                 metrics=('accuracy', 'ece', 'sensitivity/*'))

Numeric columns are binned into bands: edges (30, 45, 60, 75) give '<30',
'30-44', '45-59', '60-74', '>=75' (DEFAULT_BANDS, for 'age' and DICOM's
'PatientAge'; DICOM age strings such as '065Y' or '090Y+' are read as
years). A missing value ('', null, 'nan') is its own group, 'unknown'.
metric_set.evaluate computes every metric per group, with its gap to the
whole population; groups of fewer than `min_cases` cases are reported by
size only. `metrics` (fnmatch patterns, default every metric) limits the
metrics reported per group: a 27-class eval has 27 x 4 targets x 4 rates
operating-point metrics alone.

Only 'records:PATH' sources carry metadata; with another source 'auto' finds
no column and a named column is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from micle_jax.data import records, shards

# Age bands of the clinical readers: <30, 30-44, 45-59, 60-74, >=75; for a
# CSV's 'age' column and DICOM's PatientAge (micle_jax/data/convert/dicom_cases.py).
AGE_BANDS = (30, 45, 60, 75)
DEFAULT_BANDS = {"age": AGE_BANDS, "PatientAge": AGE_BANDS}
DEFAULT_MIN_CASES = 30
DEFAULT_MAX_GROUPS = 20
UNKNOWN = "unknown"
_MISSING = {"", "nan", "none", "null", "unknown", "n/a", "na"}
# DICOM Age String (AS): '065Y', '018M'; '090Y+' is a de-identified age of 90 or more.
_DICOM_AGE = re.compile(r"^(\d{3})([DWMY])\+?$")
_DICOM_AGE_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
SPEC_FIELDS = ("by", "bands", "min_cases", "max_groups", "metrics")


@dataclasses.dataclass
class Group:
    """The images of one subgroup: column=value."""

    column: str
    value: str
    index: np.ndarray  # [k] int, into the eval's predictions
    num_cases: int  # cases with a labelled image in the group
    num_images: int  # labelled images in the group

    @property
    def tags(self) -> dict[str, str]:
        """Its results.json tags: {'subgroup_by': 'sex', 'subgroup': 'sex=female'}."""
        return {"subgroup_by": self.column, "subgroup": f"{self.column}={self.value}"}


def read_image_meta(source, split: str) -> dict[str, dict] | None:
    """{image id: metadata dict} of every image of a records split; None if the source has none.

    Args:
      source: the eval's data.source ('records:PATH'; anything else has no metadata).
      split: 'train', 'validation' or 'test'.
    """
    if not isinstance(source, str) or not source.startswith("records:"):
        return None
    path = source.partition(":")[2]
    info = records.load_info(path)

    def parse(serialized):
        case = records.parse_case(serialized, info.num_classes, info.label_type)
        return {"ids": case["image_ids"], "meta": case["meta"]}

    files = shards.shard_paths(path, split)
    meta = {}
    cases = tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    for case in cases.as_numpy_iterator():
        for image_id, text in zip(case["ids"], case["meta"], strict=True):
            try:
                value = json.loads(text.decode() or "{}")
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path} split {split!r}: image {image_id.decode()!r} has image/meta that is "
                    f"not JSON ({e}); convert the data again"
                ) from e
            meta[image_id.decode()] = value if isinstance(value, dict) else {}
    return meta


def _as_number(value) -> float | None:
    """A metadata value as a number (None if it is not one); DICOM ages in years."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return None if math.isnan(value) else float(value)
    text = str(value).strip()
    match = _DICOM_AGE.match(text)
    if match:
        return int(match.group(1)) * _DICOM_AGE_UNIT[match.group(2)]
    try:
        number = float(text)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING


def band_labels(edges: Sequence[float]) -> list[str]:
    """Labels of the bands of `edges`: (30, 45) -> ['<30', '30-44', '>=45'].

    Integer edges name integer ranges ('30-44': 30 <= age < 45); others '[a, b)'.
    """
    edges = [float(e) for e in edges]
    whole = all(e.is_integer() for e in edges)
    labels = [f"<{edges[0]:g}"]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        labels.append(f"{lo:g}-{hi - 1:g}" if whole else f"[{lo:g}, {hi:g})")
    return labels + [f">={edges[-1]:g}"]


def _band(value: float, edges: Sequence[float], labels: Sequence[str]) -> str:
    return labels[int(np.searchsorted(np.asarray(edges, np.float64), value, side="right"))]


@dataclasses.dataclass
class _Column:
    """One subgroup column: its name, bands (numeric) and the order of its groups."""

    name: str
    edges: tuple[float, ...] | None = None

    def label(self, value) -> str:
        if _is_missing(value):
            return UNKNOWN
        if self.edges is None:
            return str(value).strip()
        number = _as_number(value)
        return UNKNOWN if number is None else _band(number, self.edges, band_labels(self.edges))

    def order(self, labels) -> list[str]:
        known = band_labels(self.edges) if self.edges is not None else sorted(set(labels))
        return [v for v in known if v in labels and v != UNKNOWN] + (
            [UNKNOWN] if UNKNOWN in labels else []
        )


def _parse_spec(field: str, spec) -> dict:
    """The subgroups field as dict(by, bands, min_cases, max_groups); `field` for messages."""
    if isinstance(spec, str):
        spec = {"by": spec}
    elif isinstance(spec, Sequence):
        spec = {"by": tuple(spec)}
    spec = dict(spec)
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(
            f"{field}.subgroups has unknown field(s) {unknown}; accepted: {list(SPEC_FIELDS)}"
        )
    by = spec.get("by", "auto")
    by = by if by == "auto" else ((by,) if isinstance(by, str) else tuple(by))
    bands = {**DEFAULT_BANDS, **dict(spec.get("bands") or {})}
    for column, edges in bands.items():
        edges = tuple(float(e) for e in edges)
        if not edges or any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=True)):
            raise ValueError(
                f"{field}.subgroups.bands[{column!r}]={edges} must be increasing "
                "band edges, e.g. (30, 45, 60, 75)"
            )
        bands[column] = edges
    min_cases = int(spec.get("min_cases", DEFAULT_MIN_CASES))
    max_groups = int(spec.get("max_groups", DEFAULT_MAX_GROUPS))
    if min_cases < 1 or max_groups < 2:
        raise ValueError(
            f"{field}.subgroups: min_cases={min_cases} must be >= 1 and "
            f"max_groups={max_groups} >= 2"
        )
    metrics = spec.get("metrics", ("*",))
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not metrics:
        raise ValueError(f"{field}.subgroups.metrics names no metric pattern")
    return dict(by=by, bands=bands, min_cases=min_cases, max_groups=max_groups, metrics=metrics)


class Subgroups:
    """The subgroup columns of one eval and each image's group in them, read when it is built.

    Args:
      name: the eval's name (for messages).
      spec: the eval's `subgroups` field (module docstring).
      meta: {image id: metadata} of the eval's images (read_image_meta), None if
        the source has no metadata.
      source: the eval's data source (for messages).
      field: the config entry, for messages (default 'config.evals.<name>').
    """

    def __init__(
        self,
        name: str,
        spec,
        meta: Mapping[str, dict] | None,
        source: str,
        field: str | None = None,
    ):
        field = field or f"config.evals.{name}"
        parsed = _parse_spec(field, spec)
        self.min_cases = parsed["min_cases"]
        self.metrics = parsed["metrics"]
        meta = meta or {}
        values: dict[str, list] = {}
        for row in meta.values():
            for column, value in row.items():
                values.setdefault(column, []).append(value)
        self.columns = self._choose(name, field, parsed, values, source)
        self._labels = {
            image_id: tuple(c.label(row.get(c.name)) for c in self.columns)
            for image_id, row in meta.items()
        }
        logging.info("Eval %r: subgroups by %s", name, [c.name for c in self.columns] or "nothing")

    @staticmethod
    def _choose(name, field, parsed, values, source) -> list[_Column]:
        bands, max_groups = parsed["bands"], parsed["max_groups"]

        def numeric(column):
            present = [v for v in values[column] if not _is_missing(v)]
            return bool(present) and all(_as_number(v) is not None for v in present)

        if parsed["by"] == "auto":
            chosen = []
            for column in sorted(values):
                if numeric(column):
                    if column in bands:
                        chosen.append(_Column(column, bands[column]))
                    else:
                        logging.info("Eval %r: numeric %r has no bands: skipped", name, column)
                    continue
                distinct = {str(v).strip() for v in values[column] if not _is_missing(v)}
                if 2 <= len(distinct) <= max_groups:
                    chosen.append(_Column(column))
            return chosen
        missing = [c for c in parsed["by"] if c not in values]
        if missing:
            available = sorted(values) or "none: only records converted with --meta_columns have it"
            raise ValueError(
                f"{field}.subgroups names {missing}, which the images of {source} do "
                f"not have in their metadata (available columns: {available}); name existing "
                "columns or use subgroups='auto'"
            )
        chosen = []
        for column in parsed["by"]:
            if numeric(column) and column not in bands:
                raise ValueError(
                    f"{field}.subgroups: column {column!r} is numeric; give its band "
                    f"edges, e.g. subgroups=dict(by=..., bands={{{column!r}: (30, 45, 60, 75)}})"
                )
            chosen.append(_Column(column, bands[column] if numeric(column) else None))
        return chosen

    def groups(self, image_ids: Sequence[str], labelled: np.ndarray, case_ids) -> list[Group]:
        """The groups of an evaluation's images, column by column, in band / name order.

        Args:
          image_ids: [n] the evaluated images.
          labelled: [n] bool, whether the image has a label that counts.
          case_ids: [n] their cases.
        """
        unknown = (UNKNOWN,) * len(self.columns)
        labels = [self._labels.get(str(i), unknown) for i in image_ids]
        case_ids = np.asarray(case_ids, dtype=object)
        labelled = np.asarray(labelled, bool)
        out = []
        for j, column in enumerate(self.columns):
            per_image = np.array([row[j] for row in labels], dtype=object)
            for value in column.order(set(per_image.tolist())):
                index = np.flatnonzero(per_image == value)
                counted = index[labelled[index]]
                cases = len(set(case_ids[counted].tolist()))
                out.append(Group(column.name, value, index, cases, len(counted)))
        return out
