r"""The converter's command line: a CSV of images, a MedMNIST-style npz, or DICOM, into records.

  python -m micle_jax.data.convert --csv=../shared/data/hannover-covid-cxr/data.csv \
    --image_root=../shared/data/hannover-covid-cxr --case_column=patient_id \
    --image_id_column=image_id --image_path_template='png/{image_id}.png' \
    --split_fractions=train=0.8,validation=0.1,test=0.1 --out=/tmp/hannover

  python -m micle_jax.data.convert --npz=pneumoniamnist.npz \
    --class_names=normal,pneumonia --out=/tmp/pneumoniamnist

  python -m micle_jax.data.convert --dicom_dir=/data/pacs_export \
    --key_file=~/secrets/cxr.key --meta_tags=ViewPosition,PatientSex \
    --split_fractions=train=0.8,validation=0.1,test=0.1 --out=/tmp/cxr

  # First review what would be read: the headers only, the report, no records.
  python -m micle_jax.data.convert --dicom_dir=/data/pacs_export \
    --key_file=~/secrets/cxr.key --meta_tags=ViewPosition,PatientSex \
    --deidentify=/tmp/cxr_deidentify_report.json

The flags become a Plan (inputs.py; dicom_cases.py for DICOM), image options
(images.py) and one call of write.convert, which checks, writes, verifies and
moves the dataset into place.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from micle_jax.data import records
from micle_jax.data.convert import deidentify
from micle_jax.data.convert.dicom_cases import (
    DicomSource,
    cases_from_dicom_csv,
    cases_from_dicom_dir,
)
from micle_jax.data.convert.images import SIXTEEN_BIT, ImageOptions
from micle_jax.data.convert.inputs import (
    ConversionError,
    Plan,
    cases_from_csv,
    cases_from_npz,
    read_case_list,
)
from micle_jax.data.convert.write import convert


def parse_num_shards(text: str) -> int | dict[str, int]:
    """'8' (every split) or 'train=16,validation=2,test=2' (per split)."""
    try:
        if "=" not in text:
            return int(text)
        pairs = (item.split("=") for item in text.split(",") if item.strip())
        shards = {split.strip(): int(n) for split, n in pairs}
    except ValueError:
        raise ConversionError(
            f"--num_shards={text!r}: give a number, or split=number pairs like train=16,test=2"
        ) from None
    unknown = set(shards) - set(records.SPLITS)
    if unknown:
        raise ConversionError(
            f"--num_shards: unknown splits {sorted(unknown)}; use {records.SPLITS}"
        )
    return shards


_CSV_ONLY = (
    "case_column image_root image_column image_path_template image_id_column label_column "
    "label_columns meta_columns split_column split_fractions seed"
).split()
_DICOM_ONLY = (
    "case_tag meta_tags key_file create_key_file skip_burned_in dicom_voi deidentify".split()
)


def define_flags() -> None:
    """The command's flags; defined only when it runs (__main__.py), so importing adds none."""
    flags.DEFINE_string("csv", None, "CSV with one row per image (or use --npz)")
    flags.DEFINE_string("npz", None, "MedMNIST-style npz: {split}_images, {split}_labels")
    flags.DEFINE_string("dicom_dir", None, "folder of DICOM files, one image each (no labels)")
    flags.DEFINE_bool("dicom", False, "the --csv image paths are DICOM files")
    flags.DEFINE_string("out", None, "destination dataset folder")
    flags.DEFINE_string("image_root", "", "folder the CSV's image paths are relative to")
    flags.DEFINE_string("image_column", None, "CSV column holding the image path")
    flags.DEFINE_string("image_path_template", None, "path from columns, e.g. 'png/{image_id}.png'")
    flags.DEFINE_string("image_id_column", None, "CSV column of the image id (default: its path)")
    flags.DEFINE_string(
        "case_column", None, "CSV column of the patient/case id (DICOM: default --case_tag)"
    )
    flags.DEFINE_string("label_column", None, "CSV column of a multiclass label")
    flags.DEFINE_list("label_columns", [], "multilabel CSV columns (1, 0, -1 uncertain, blank)")
    flags.DEFINE_list("class_names", [], "class names (default: sorted label values)")
    flags.DEFINE_list("meta_columns", [], "CSV columns stored in image/meta, e.g. projection")
    flags.DEFINE_string("split_column", None, "CSV column of the split (train/validation/test)")
    flags.DEFINE_string("split_fractions", None, "e.g. train=0.8,validation=0.1,test=0.1")
    flags.DEFINE_integer("seed", 0, "seed of the per-case split hash")
    flags.DEFINE_string("exclude_cases", None, "file of case ids (one a line) to leave out")
    flags.DEFINE_string("num_shards", "1", "shards per split: 8, or train=16,validation=2")
    flags.DEFINE_integer("resize_longer_side", 0, "shrink larger images to this many pixels")
    flags.DEFINE_enum(
        "sixteen_bit",
        "min_max",
        SIXTEEN_BIT,
        "scaling of 16-bit PNGs and of DICOM without a window: each image's range or the "
        "bit depth's",
    )
    flags.DEFINE_enum("bit_depth", "8", ["8", "16"], "16 keeps 16-bit gray images as 16-bit PNG")
    flags.DEFINE_string("case_tag", "PatientID", "DICOM tag of the case (or StudyInstanceUID)")
    flags.DEFINE_list("meta_tags", [], "DICOM tags stored in image/meta, e.g. ViewPosition")
    flags.DEFINE_string("key_file", None, "DICOM: secret key file of the hashed case ids")
    flags.DEFINE_bool("create_key_file", False, "create --key_file with a new key if missing")
    flags.DEFINE_bool("skip_burned_in", False, "leave out DICOM with BurnedInAnnotation YES")
    flags.DEFINE_string("dicom_voi", "0", "DICOM VOI LUT/window to apply: index, or 'none'")
    flags.DEFINE_string(
        "deidentify",
        None,
        "DICOM: read the headers only, print the de-identification report and write it "
        "(JSON) to this file, '-' for stdout; no records (--out not needed)",
    )
    flags.DEFINE_enum(
        "image_format",
        ImageOptions.image_format,
        records.IMAGE_FORMATS,
        "format of re-encoded images (files kept byte for byte keep theirs)",
    )
    flags.DEFINE_integer("jpeg_quality", ImageOptions.jpeg_quality, "quality of re-encoded JPEGs")
    flags.DEFINE_bool("grayscale", False, "store 8-bit single-channel images (X-rays saved as RGB)")
    flags.DEFINE_enum("on_error", "fail", ["fail", "skip"], "bad input: stop, or leave it out")
    flags.DEFINE_integer("num_workers", None, "image threads (default: CPU count)")
    flags.DEFINE_bool("overwrite", False, "replace an existing dataset at --out")
    flags.DEFINE_string("name", None, "dataset name (default: --out's folder name)")
    flags.DEFINE_string("source", "", "where the data comes from")
    flags.DEFINE_string("license", "", "the data's licence")
    flags.DEFINE_string("citation", "", "how to cite the data")
    flags.DEFINE_enum(
        "modality",
        None,
        records.MODALITIES,
        "what the images show; data.augment='auto' trains 'cxr' on cxr, 'simclr' on "
        "dermatology (default: chosen by whether the images are gray)",
    )


def _plan(f) -> tuple[Plan, bytes | None]:
    """(the Plan of the input flags, the DICOM key or None)."""
    if sum(map(bool, (f.csv, f.npz, f.dicom_dir))) != 1 or not (f.out or f.deidentify):
        raise ConversionError(
            "give --out (DICOM: or --deidentify) and exactly one of --csv, --npz and --dicom_dir"
        )
    if f.dicom and not f.csv:
        raise ConversionError("--dicom says the --csv image paths are DICOM; give --csv")
    if not (f.dicom or f.dicom_dir):
        given = [name for name in _DICOM_ONLY if f[name].present]
        if given:
            raise ConversionError(f"{given} are for DICOM input (--dicom_dir, or --csv --dicom)")
    if f.npz:
        given = [name for name in _CSV_ONLY if f[name].present]
        if given:
            raise ConversionError(f"--npz takes cases and splits from the file; drop {given}")
        return cases_from_npz(f.npz, f.class_names), None
    if f.csv and not f.dicom:
        if not f.case_column:
            raise ConversionError("--csv needs --case_column (the patient/case id column)")
        plan = cases_from_csv(
            f.csv, f.case_column, f.image_root, f.image_column, f.image_path_template,
            f.image_id_column, f.label_column, f.label_columns, f.class_names,
            f.meta_columns, f.split_column, f.split_fractions, f.seed,
        )  # fmt: skip
        return plan, None
    key = deidentify.load_key(f.key_file, f.create_key_file, out=f.out)
    source = DicomSource(key, f.case_tag, f.meta_tags, f.skip_burned_in)
    if f.dicom_dir:
        given = [n for n in _CSV_ONLY if f[n].present and n not in ("split_fractions", "seed")]
        if given:
            raise ConversionError(
                f"--dicom_dir takes cases from the files' tags; drop {given} (for labels, "
                "list the files in a CSV: --csv --dicom)"
            )
        return cases_from_dicom_dir(f.dicom_dir, source, f.split_fractions, f.seed), key
    plan = cases_from_dicom_csv(
        f.csv, source, f.case_column, f.image_root, f.image_column, f.image_path_template,
        f.image_id_column, f.meta_columns, label_column=f.label_column,
        label_columns=f.label_columns, class_names=f.class_names,
        split_column=f.split_column, split_fractions=f.split_fractions, seed=f.seed,
    )  # fmt: skip
    return plan, key


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    # pydicom logs each failed decoder plugin with a traceback; the converter
    # reports every undecodable file once, with the plugins' messages.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    try:
        plan, key = _plan(f)
        if f.deidentify:  # a review before converting: the headers are read, nothing written
            deidentify.review(plan.deidentify, plan.problems, f.deidentify)
            return
        excluded = read_case_list(f.exclude_cases) if f.exclude_cases else ()
        if key:  # the list names patients by their tag (or column) value
            excluded = {deidentify.keyed_id(key, case) for case in excluded}
        convert(
            plan,
            f.out,
            exclude_cases=excluded,
            num_shards=parse_num_shards(f.num_shards),
            options=ImageOptions(
                resize_longer_side=f.resize_longer_side,
                sixteen_bit=f.sixteen_bit,
                image_format=f.image_format,
                jpeg_quality=f.jpeg_quality,
                grayscale=f.grayscale,
                bit_depth=int(f.bit_depth),
                dicom_voi=f.dicom_voi,
            ),
            on_error=f.on_error,
            num_workers=f.num_workers,
            overwrite=f.overwrite,
            name=f.name,
            source=f.source,
            license=f.license,
            citation=f.citation,
            modality=f.modality or "",
        )
    except ConversionError as e:
        sys.exit(f"error: {e}")
