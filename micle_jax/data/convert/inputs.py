"""Reads the converter's inputs into a Plan: cases, labels, splits, problems.

Two inputs: a CSV with one row per image (`cases_from_csv`) and a MedMNIST-style
npz of arrays (`cases_from_npz`); DICOM input (dicom_cases.py) adds columns
from the files' tags to a CSV's rows, or makes rows of a folder's files, and
goes through `cases_from_csv` too. Nothing here decodes images (images.py) or
writes records (write.py); every bad row becomes a `Problem` naming its CSV
line, so the converter can report all of them at once.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import string
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from micle_jax.data import records

# MedMNIST names its validation arrays 'val_images' / 'val_labels'.
NPZ_PREFIXES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
MULTILABEL_VALUES = {1.0: 1.0, 0.0: 0.0, -1.0: records.UNCERTAIN}  # CheXpert's 1 / 0 / -1


class ConversionError(Exception):
    """The input or the flags cannot be converted; the message says how to fix it."""


@dataclasses.dataclass
class Problem:
    """One bad input, located by CSV line (header = line 1) or npz entry."""

    problem: str
    case_id: str = ""
    image_id: str = ""
    file: str = ""
    line: int | None = None

    def __str__(self) -> str:
        where = [f"line {self.line}"] if self.line else []
        where += [f"{k} {v!r}" for k, v in (("case", self.case_id), ("file", self.file)) if v]
        return f"{', '.join(where)}: {self.problem}"


@dataclasses.dataclass
class ImageSpec:
    """One image to convert: a file on disk (PNG/JPEG, or DICOM if `dicom`) or an
    array (uint8/uint16 [h, w(, c)])."""

    image_id: str
    file: str = ""
    array: np.ndarray | None = None
    dicom: bool = False
    label_class: int = -1
    label_multi: list[float] | None = None
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    line: int | None = None


@dataclasses.dataclass
class CaseSpec:
    case_id: str
    split: str
    images: list[ImageSpec]


@dataclasses.dataclass
class Plan:
    """What to convert: the cases, their labels, and the problems found so far.

    `deidentify` is the de-identification report of DICOM input
    (deidentify.Report), written next to the records; None for other input.
    """

    cases: list[CaseSpec]
    label_type: str
    class_names: list[str]
    problems: list[Problem]
    args: dict[str, Any]
    deidentify: Any = None


def case_hash(seed: int, case_id: str) -> float:
    """A number in [0, 1) fixed by (seed, case_id) on every machine and Python run.

    SHA-256 rather than Python's hash(), which is salted per process.
    """
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def parse_split_fractions(text: str) -> dict[str, float]:
    """'train=0.8,validation=0.1,test=0.1' -> {split: fraction}, fractions summing to 1."""
    fractions = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        split, _, value = item.partition("=")
        try:
            fractions[split.strip()] = float(value)
        except ValueError:
            raise ConversionError(f"--split_fractions item {item!r} is not split=number") from None
    unknown = set(fractions) - set(records.SPLITS)
    if unknown or not fractions or any(f < 0 for f in fractions.values()):
        raise ConversionError(
            f"--split_fractions={text!r}: use non-negative fractions of {records.SPLITS}, "
            "e.g. train=0.8,validation=0.1,test=0.1"
        )
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ConversionError(
            f"--split_fractions={text!r} sums to {sum(fractions.values())}, not 1"
        )
    return {s: fractions[s] for s in records.SPLITS if fractions.get(s, 0) > 0}


def assign_split(case_id: str, seed: int, fractions: dict[str, float]) -> str:
    """The split of a case: deterministic in (seed, case_id), so never two splits."""
    u, total = case_hash(seed, case_id), 0.0
    for split, fraction in fractions.items():
        total += fraction
        if u < total:
            return split
    return list(fractions)[-1]  # u within rounding of 1.0


def check_columns(path: str, header: Sequence[str], columns: Iterable[str | None]) -> None:
    """Raises ConversionError naming the `columns` (None = not used) missing from `header`."""
    missing = [c for c in columns if c and c not in header]
    if missing:
        raise ConversionError(f"{path}: no column(s) {missing}; the columns are {list(header)}")


def _class_list(values: Iterable[str]) -> list[str]:
    values = sorted({v for v in values if v})
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)  # '2' before '10'
    return values


def read_csv(csv_path: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line of the record, row)]) of a CSV; line 1 is the header."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            # (line of the record, row): reader.line_num also counts quoted newlines.
            rows = [(reader.line_num, row) for row in reader]
    except OSError as e:
        raise ConversionError(f"cannot read --csv={csv_path!r}: {e}") from e
    return header, rows


def _read_labels(
    image: ImageSpec, row: dict, label_type: str, label_column: str | None, names: list[str]
) -> str | None:
    """Sets `image`'s labels from its CSV row; the problem (a message) if they are bad."""
    if label_type == "multiclass" and row[label_column]:
        value = row[label_column]
        if value in names:
            image.label_class = names.index(value)
        elif value.isdigit() and int(value) < len(names):
            image.label_class = int(value)
        else:
            return f"label {value!r} is not in the class list {names}"
    elif label_type == "multilabel":
        try:
            image.label_multi = [
                MULTILABEL_VALUES[float(row[c])] if row[c] else records.MISSING for c in names
            ]
        except (ValueError, KeyError):
            values = [row[c] for c in names]
            return f"labels {values} must each be 1, 0, -1 (uncertain) or blank"
    return None


def cases_from_csv(
    csv_path: str,
    case_column: str,
    image_root: str = "",
    image_column: str | None = None,
    image_path_template: str | None = None,
    image_id_column: str | None = None,
    label_column: str | None = None,
    label_columns: Sequence[str] = (),
    class_names: Sequence[str] = (),
    meta_columns: Sequence[str] = (),
    split_column: str | None = None,
    split_fractions: str | None = None,
    seed: int = 0,
    table: tuple[list[str], list[tuple[int | None, dict]]] | None = None,
) -> Plan:
    """Reads a CSV with one row per image into a Plan.

    The image file is `image_root/row[image_column]` or
    `image_root/image_path_template.format(**row)`; its id is `row[image_id_column]`,
    else that relative path. Labels: `label_column` (multiclass; values are class
    names or indices into `class_names`, blank = -1 no label), `label_columns`
    (multilabel as CheXpert: 1, 0, -1 uncertain, blank missing), or neither.
    Splits: `split_column`, else `split_fractions` by `assign_split` (default all train).
    `table`: the CSV's (header, [(line, row)]) when already read (`read_csv`),
    e.g. with columns added from DICOM tags; `csv_path` then only names it.
    """
    if (image_column is None) == (image_path_template is None):
        raise ConversionError("give exactly one of --image_column and --image_path_template")
    if label_column and label_columns:
        raise ConversionError("give --label_column (multiclass) or --label_columns, not both")
    if split_column and split_fractions:
        raise ConversionError("give --split_column or --split_fractions, not both")
    fractions = parse_split_fractions(split_fractions or "train=1")
    header, rows = table if table is not None else read_csv(csv_path)
    template_fields = [f for _, f, _, _ in string.Formatter().parse(image_path_template or "") if f]
    check_columns(
        csv_path,
        header,
        [case_column, image_column, image_id_column, label_column, split_column]
        + list(label_columns)
        + list(meta_columns)
        + template_fields,
    )
    if label_columns:
        label_type, names = "multilabel", list(label_columns)
    elif label_column:
        label_type = "multiclass"
        names = list(class_names) or _class_list((r[label_column] or "").strip() for _, r in rows)
    else:
        label_type, names = "none", []
    problems, cases, first_line, id_lines, conflicted = [], {}, {}, {}, set()
    for line, row in rows:
        row = {k: (v or "").strip() for k, v in row.items() if k is not None}
        case_id = row[case_column]
        if not case_id:
            problems.append(Problem(f"column {case_column!r} is blank", line=line))
            continue
        split = row[split_column] if split_column else assign_split(case_id, seed, fractions)
        if split not in records.SPLITS:
            problems.append(
                Problem(f"split {split!r} is not one of {records.SPLITS}", case_id, line=line)
            )
            continue
        case = cases.setdefault(case_id, CaseSpec(case_id, split, []))
        first_line.setdefault(case_id, line)
        if case.split != split:
            conflicted.add(case_id)
            problems.append(
                Problem(
                    f"split {split!r}, but line {first_line[case_id]} puts the case in "
                    f"{case.split!r}; the whole case is left out",
                    case_id,
                    line=line,
                )
            )
            continue
        if any(not row[f] for f in template_fields) or (image_column and not row[image_column]):
            problems.append(Problem("no image path in this row", case_id, line=line))
            continue
        relative = row[image_column] if image_column else image_path_template.format(**row)
        image = ImageSpec(
            image_id=row[image_id_column] if image_id_column else relative,
            file=os.path.join(image_root, relative),
            meta={c: row[c] for c in meta_columns},
            line=line,
        )
        where = dict(case_id=case_id, image_id=image.image_id, file=image.file, line=line)
        if not image.image_id:
            problems.append(Problem(f"column {image_id_column!r} (image id) is blank", **where))
            continue
        if image.image_id in id_lines:
            problems.append(
                Problem(f"duplicate image id, first on line {id_lines[image.image_id]}", **where)
            )
            continue
        id_lines[image.image_id] = line
        problem = _read_labels(image, row, label_type, label_column, names)
        if problem:
            problems.append(Problem(problem, **where))
            continue
        case.images.append(image)
    args = dict(
        csv=csv_path,
        case_column=case_column,
        image_root=image_root,
        seed=seed,
        image_column=image_column,
        image_path_template=image_path_template,
        image_id_column=image_id_column,
        label_column=label_column,
        label_columns=list(label_columns),
        class_names=names,
        meta_columns=list(meta_columns),
        split_column=split_column,
        split_fractions=fractions if not split_column else None,
    )
    kept = [c for c in cases.values() if c.case_id not in conflicted]
    return Plan(kept, label_type, names, problems, args)


def cases_from_npz(npz_path: str, class_names: Sequence[str] = ()) -> Plan:
    """Reads MedMNIST-style arrays {split}_images [N, h, w(, c)] and {split}_labels.

    One image per case, case and image id '{split}-{index:05d}'. Labels [N] or
    [N, 1] are multiclass indices into `class_names`; [N, C] with C > 1 are
    multilabel 0/1 (as ChestMNIST).
    """
    try:
        data = np.load(npz_path)
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read --npz={npz_path!r}: {e}") from e
    with data:
        found = [(p, s) for p, s in NPZ_PREFIXES.items() if f"{p}_images" in data.files]
        if not found:
            raise ConversionError(
                f"{npz_path}: no '{{split}}_images' arrays; keys are {data.files}, expected "
                f"some of {[p + '_images' for p in NPZ_PREFIXES]}"
            )
        arrays = {s: (data[f"{p}_images"], data.get(f"{p}_labels")) for p, s in found}
    for split, (images, labels) in arrays.items():
        if labels is not None and len(labels) != len(images):
            raise ConversionError(
                f"{npz_path}: {len(images)} {split} images but {len(labels)} labels"
            )
    widths = {1 if y is None or y.ndim == 1 else y.shape[1] for _, y in arrays.values()}
    label_type = "multilabel" if max(widths) > 1 else "multiclass"
    if all(y is None for _, y in arrays.values()):
        label_type = "none"
    names = list(class_names)
    if not names and label_type != "none":
        top = (
            max(widths)
            if label_type == "multilabel"
            else max(int(y.max()) + 1 for _, y in arrays.values() if y is not None)
        )
        names = [str(i) for i in range(top)]
    if label_type == "multilabel" and len(names) != max(widths):
        raise ConversionError(
            f"{npz_path}: labels have {max(widths)} columns, --class_names {len(names)}"
        )
    cases, problems = [], []
    for split, (images, labels) in arrays.items():
        for i, image in enumerate(images):
            case_id = f"{split}-{i:05d}"
            spec = ImageSpec(image_id=case_id, array=image)
            if labels is not None and label_type == "multilabel":
                spec.label_multi = [float(v) for v in labels[i]]
            elif labels is not None:
                spec.label_class = int(np.reshape(labels[i], [-1])[0])
                if not 0 <= spec.label_class < len(names):
                    problems.append(
                        Problem(
                            f"label {spec.label_class} is not in the class list {names}",
                            case_id,
                            case_id,
                            f"{npz_path}:{split}_labels[{i}]",
                        )
                    )
                    continue
            cases.append(CaseSpec(case_id, split, [spec]))
    return Plan(cases, label_type, names, problems, dict(npz=npz_path, class_names=names))


def read_case_list(path: str) -> set[str]:
    """Case ids in a text file, one per line; blank lines and '#' comments ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            return {s for s in (line.split("#")[0].strip() for line in f) if s}
    except OSError as e:
        raise ConversionError(f"cannot read the case list {path!r}: {e}") from e
