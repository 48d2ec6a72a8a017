"""Plans of DICOM input: a folder of DICOM files, or a CSV whose image paths are DICOM.

Each file's header is read once (values over 1 KiB, such as the pixel data,
stay on disk). What the header shows is wrong (not DICOM, no pixel data,
several frames, an unsupported photometric interpretation or compression, no
case tag, a second copy of an image) becomes a Problem naming the file,
reported with every other problem before anything is written; undecodable
pixel data is found when the converter decodes every image (images.py).

Case and image ids are keyed hashes (deidentify.py), and the --meta_tags
values become columns; the rows then go through inputs.cases_from_csv like a
CSV's, so grouping, splits and labels follow one set of rules.
"""

from __future__ import annotations

import dataclasses
import os
import string
from collections.abc import Sequence

import tqdm

from micle_jax.data.convert import deidentify, dicom
from micle_jax.data.convert.inputs import (
    ConversionError,
    Plan,
    Problem,
    cases_from_csv,
    check_columns,
    read_csv,
)

# Columns added to the rows; ':' keeps them apart from a CSV's own columns.
CASE_COLUMN = "dicom:case"
IMAGE_ID_COLUMN = "dicom:image"
FILE_COLUMN = "dicom:file"
BURNED_IN = "BurnedInAnnotation"
# Tags read to check a file, besides the pixel tags (for the report).
CHECK_TAGS = ["SOPClassUID", "TransferSyntaxUID", BURNED_IN]


@dataclasses.dataclass
class DicomSource:
    """How DICOM files become cases.

    key: the secret of the keyed-hash ids (deidentify.load_key).
    case_tag: the tag whose value is the case (PatientID; StudyInstanceUID
      for study-level cases), unless a CSV's case column is given.
    meta_tags: tags stored in clear in image/meta (deidentify.check_tag refuses
      identifying ones).
    skip_burned_in: leave out images whose BurnedInAnnotation is 'YES'.
    """

    key: bytes
    case_tag: str = "PatientID"
    meta_tags: Sequence[str] = ()
    skip_burned_in: bool = False

    def check(self) -> None:
        """Raises ConversionError for an unknown tag or an identifying meta tag."""
        deidentify.check_tag(self.case_tag, "--case_tag", meta=False)
        for keyword in self.meta_tags:
            deidentify.check_tag(keyword, "--meta_tags", meta=True)


def find_dicom_files(root: str) -> list[str]:
    """Every file under `root` (sorted relative paths) but hidden ones and DICOMDIR indexes."""
    if not os.path.isdir(root):
        raise ConversionError(f"--dicom_dir={root!r} is not a folder")
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.upper() != "DICOMDIR":
                found.append(os.path.relpath(os.path.join(folder, name), root))
    if not found:
        raise ConversionError(f"--dicom_dir={root!r} holds no files")
    return found


def _tag_columns(
    path: str, source: DicomSource, report: deidentify.Report, case_tag: bool, uid: bool
) -> dict[str, str]:
    """The columns a file adds: case (if `case_tag`), image id (if `uid`), meta tags.

    Raises:
      DicomProblem: the header shows the image cannot be used.
    """
    ds = dicom.read_header(path)
    problem = dicom.header_problem(ds)
    if problem:
        raise dicom.DicomProblem(problem)
    columns = {}
    if case_tag:
        columns[CASE_COLUMN] = deidentify.tag_text(ds.get(source.case_tag))
        if not columns[CASE_COLUMN]:
            raise dicom.DicomProblem(f"no {source.case_tag} (the --case_tag) in this file")
    if uid:
        columns[IMAGE_ID_COLUMN] = deidentify.tag_text(ds.get("SOPInstanceUID"))
    for keyword in source.meta_tags:
        value = deidentify.tag_text(ds.get(keyword))
        if keyword == "PatientAge" and value != deidentify.generalize_age(value):
            value = deidentify.generalize_age(value)
            report.generalized_ages += 1
        columns[keyword] = value
    burned_in = deidentify.tag_text(ds.get("BurnedInAnnotation")).upper()
    report.burned_in_unknown += not burned_in
    columns[BURNED_IN] = burned_in
    return columns


def _add_tag_columns(
    rows: list[tuple[int | None, dict]],
    source: DicomSource,
    report: deidentify.Report,
    case_column: str | None,
    image_id_column: str | None,
) -> tuple[list[tuple[int | None, dict]], list[Problem]]:
    """Reads each row's file (row[FILE_COLUMN]); (the rows with tag columns, problems)."""
    kept, problems, seen = [], [], set()
    for line, row in tqdm.tqdm(rows, "read headers", unit="file", disable=None):
        path = row[FILE_COLUMN]
        try:
            columns = _tag_columns(path, source, report, not case_column, not image_id_column)
        except dicom.DicomProblem as e:
            problems.append(Problem(str(e), file=path, line=line))
            continue
        case = columns.get(CASE_COLUMN) or row[case_column].strip()
        image = columns.get(IMAGE_ID_COLUMN) or (row[image_id_column] or "").strip()
        columns[CASE_COLUMN] = deidentify.keyed_id(source.key, case)
        columns[IMAGE_ID_COLUMN] = image_id = deidentify.keyed_id(source.key, image or path)
        where = dict(case_id=columns[CASE_COLUMN], image_id=image_id, file=path, line=line)
        if image_id in seen:  # (the first file's path stays out: it may name the patient)
            same = image_id_column or "SOPInstanceUID"
            problems.append(Problem(f"a second copy of an image (the same {same})", **where))
            continue
        seen.add(image_id)
        if columns.pop(BURNED_IN) == "YES":
            report.burned_in.append(image_id)
            report.burned_in_files.append(path)
            if source.skip_burned_in:
                continue
        kept.append((line, dict(row, **columns)))
    report.num_files += len(rows)
    return kept, problems


def _report(source: DicomSource, case_column: str | None, image_id_column: str | None):
    """The de-identification report of `source`, its counts still zero."""
    return deidentify.Report(
        key_fingerprint=deidentify.key_fingerprint(source.key),
        hashed=([] if case_column else [source.case_tag])
        + ([] if image_id_column else ["SOPInstanceUID"]),
        hashed_columns=[c for c in (case_column, image_id_column) if c],
        in_clear=list(source.meta_tags),
        not_stored=[*dicom.PIXEL_TAGS, *CHECK_TAGS],
        skipped_burned_in=source.skip_burned_in,
    )


def cases_from_dicom_dir(
    root: str, source: DicomSource, split_fractions: str | None = None, seed: int = 0
) -> Plan:
    """Every file under `root` is one DICOM image; cases by `source.case_tag`, no labels.

    Splits by `split_fractions` of the hashed case ids (inputs.assign_split).
    """
    source.check()
    report = _report(source, None, None)
    files = find_dicom_files(root)
    rows = [(None, {FILE_COLUMN: os.path.join(root, name), "path": name}) for name in files]
    rows, problems = _add_tag_columns(rows, source, report, None, None)
    header = [FILE_COLUMN, "path", CASE_COLUMN, IMAGE_ID_COLUMN, *source.meta_tags]
    plan = cases_from_csv(
        root,
        CASE_COLUMN,
        image_root=root,
        image_column="path",
        image_id_column=IMAGE_ID_COLUMN,
        meta_columns=list(source.meta_tags),
        split_fractions=split_fractions,
        seed=seed,
        table=(header, rows),
    )
    args = dict(dicom_dir=root, seed=seed, split_fractions=plan.args["split_fractions"])
    return _finish(plan, problems, report, source, args)


def cases_from_dicom_csv(
    csv_path: str,
    source: DicomSource,
    case_column: str | None = None,
    image_root: str = "",
    image_column: str | None = None,
    image_path_template: str | None = None,
    image_id_column: str | None = None,
    meta_columns: Sequence[str] = (),
    **labels_and_splits,
) -> Plan:
    """A CSV with one row per DICOM image, as inputs.cases_from_csv reads one.

    The case is `case_column`'s value if given, else the file's `source.case_tag`;
    the image id is `image_id_column`'s value if given, else the SOPInstanceUID;
    both are hashed. `labels_and_splits`: cases_from_csv's label_column,
    label_columns, class_names, split_column, split_fractions and seed.
    """
    source.check()
    if (image_column is None) == (image_path_template is None):
        raise ConversionError("give exactly one of --image_column and --image_path_template")
    header, rows = read_csv(csv_path)
    fields = [f for _, f, _, _ in string.Formatter().parse(image_path_template or "") if f]
    check_columns(csv_path, header, [case_column, image_column, image_id_column, *fields])
    clash = sorted(set(source.meta_tags) & set(header))
    if clash:
        raise ConversionError(f"{csv_path}: columns {clash} are also --meta_tags; rename them")
    with_paths, problems = [], []
    for line, row in rows:
        row = {k: v for k, v in row.items() if k is not None}
        blank = [f for f in fields + [image_column] if f and not (row[f] or "").strip()]
        if blank:
            problems.append(Problem("no image path in this row", line=line))
            continue
        relative = row[image_column] if image_column else image_path_template.format(**row)
        path = os.path.join(image_root, relative.strip())
        if not os.path.isfile(path):
            problems.append(Problem("image file not found", file=path, line=line))
            continue
        if case_column and not (row[case_column] or "").strip():
            problems.append(Problem(f"column {case_column!r} is blank", file=path, line=line))
            continue
        with_paths.append((line, dict(row, **{FILE_COLUMN: path})))
    report = _report(source, case_column, image_id_column)
    rows, more = _add_tag_columns(with_paths, source, report, case_column, image_id_column)
    header = [*header, FILE_COLUMN, CASE_COLUMN, IMAGE_ID_COLUMN, *source.meta_tags]
    plan = cases_from_csv(
        csv_path,
        CASE_COLUMN,
        image_root=image_root,
        image_column=image_column,
        image_path_template=image_path_template,
        image_id_column=IMAGE_ID_COLUMN,
        meta_columns=[*meta_columns, *source.meta_tags],
        table=(header, rows),
        **labels_and_splits,
    )
    args = dict(plan.args, case_column=case_column, image_id_column=image_id_column)
    args["meta_columns"] = list(meta_columns)
    return _finish(plan, problems + more, report, source, args)


def _finish(plan, problems, report, source, args) -> Plan:
    """Marks the images DICOM and records the report, problems and DICOM arguments."""
    for case in plan.cases:
        for image in case.images:
            image.dicom = True
    plan.problems = problems + plan.problems
    plan.deidentify = report
    plan.args = dict(
        args,
        case_tag=source.case_tag,
        meta_tags=list(source.meta_tags),
        key_fingerprint=report.key_fingerprint,
        skip_burned_in=source.skip_burned_in,
    )
    return plan
