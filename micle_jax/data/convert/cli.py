r"""The converter's command line: a CSV of images, or a MedMNIST-style npz, into case records.

  python -m micle_jax.data.convert --csv=../shared/data/hannover-covid-cxr/data.csv \
    --image_root=../shared/data/hannover-covid-cxr --case_column=patient_id \
    --image_id_column=image_id --image_path_template='png/{image_id}.png' \
    --split_fractions=train=0.8,validation=0.1,test=0.1 --out=/tmp/hannover

  python -m micle_jax.data.convert --npz=pneumoniamnist.npz \
    --class_names=normal,pneumonia --out=/tmp/pneumoniamnist

The flags become a Plan (inputs.py), image options (images.py) and one call of
write.convert, which checks, writes, verifies and moves the dataset into place.
"""

from __future__ import annotations

import sys

from absl import app, flags

from micle_jax.data import records
from micle_jax.data.convert.images import SIXTEEN_BIT, ImageOptions
from micle_jax.data.convert.inputs import (
    ConversionError,
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


def define_flags() -> None:
    """The command's flags; defined only when it runs (__main__.py), so importing adds none."""
    flags.DEFINE_string("csv", None, "CSV with one row per image (or use --npz)")
    flags.DEFINE_string("npz", None, "MedMNIST-style npz: {split}_images, {split}_labels")
    flags.DEFINE_string("out", None, "destination dataset folder")
    flags.DEFINE_string("image_root", "", "folder the CSV's image paths are relative to")
    flags.DEFINE_string("image_column", None, "CSV column holding the image path")
    flags.DEFINE_string("image_path_template", None, "path from columns, e.g. 'png/{image_id}.png'")
    flags.DEFINE_string("image_id_column", None, "CSV column of the image id (default: its path)")
    flags.DEFINE_string("case_column", None, "CSV column of the patient/case id")
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
    flags.DEFINE_enum("sixteen_bit", "min_max", SIXTEEN_BIT, "16-bit to 8-bit scaling")
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        if bool(f.csv) == bool(f.npz) or not f.out:
            raise ConversionError("give --out and exactly one of --csv and --npz")
        if f.csv:
            if not f.case_column:
                raise ConversionError("--csv needs --case_column (the patient/case id column)")
            plan = cases_from_csv(
                f.csv, f.case_column, f.image_root, f.image_column, f.image_path_template,
                f.image_id_column, f.label_column, f.label_columns, f.class_names,
                f.meta_columns, f.split_column, f.split_fractions, f.seed,
            )  # fmt: skip
        else:
            given = [name for name in _CSV_ONLY if f[name].present]
            if given:
                raise ConversionError(f"--npz takes cases and splits from the file; drop {given}")
            plan = cases_from_npz(f.npz, f.class_names)
        convert(
            plan,
            f.out,
            exclude_cases=read_case_list(f.exclude_cases) if f.exclude_cases else (),
            num_shards=parse_num_shards(f.num_shards),
            options=ImageOptions(
                resize_longer_side=f.resize_longer_side,
                sixteen_bit=f.sixteen_bit,
                image_format=f.image_format,
                jpeg_quality=f.jpeg_quality,
                grayscale=f.grayscale,
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
