r"""Converts a CSV of images, or a MedMNIST-style npz, into case records.

  python -m micle_jax.data.convert --csv=../shared/data/hannover-covid-cxr/data.csv \
    --image_root=../shared/data/hannover-covid-cxr --case_column=patient_id \
    --image_id_column=image_id --image_path_template='png/{image_id}.png' \
    --split_fractions=train=0.8,validation=0.1,test=0.1 --out=/tmp/hannover

  python -m micle_jax.data.convert --npz=pneumoniamnist.npz \
    --class_names=normal,pneumonia --out=/tmp/pneumoniamnist

Five steps, so that bad input never leaves a half-written dataset that looks
complete: plan (read the table, group rows into cases, assign splits), check
(decode every image; with --on_error=fail any problem stops here, before
anything is written), write into a temporary folder next to --out, verify what
was written (no case in two splits, no excluded case), rename into place.
convert_inputs.py does the planning, convert_images.py the decoding and
re-encoding; docs/data_format.md shows the commands with their output.
"""

from __future__ import annotations

import os

# Keep TensorFlow's C++ info logs out of the converter's report.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import collections
import concurrent.futures
import dataclasses
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator

import tensorflow as tf
import tqdm
from absl import app, flags

from micle_jax.data import records
from micle_jax.data.convert_images import SIXTEEN_BIT, ImageOptions, check_image, encode_image
from micle_jax.data.convert_inputs import (
    CaseSpec,
    ConversionError,
    Plan,
    Problem,
    case_hash,
    cases_from_csv,
    cases_from_npz,
    read_case_list,
)

VERSION = "1.0.0"


def _ordered_map(pool, fn: Callable, items: Iterable, window: int) -> Iterator:
    """pool.map in input order, keeping at most `window` results in memory."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _check_destination(out: str, overwrite: bool) -> None:
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise ConversionError(f"--out={out!r} exists and is not a folder; choose another --out")
    if not os.listdir(out):
        return
    if not overwrite:
        raise ConversionError(
            f"--out={out!r} exists and is not empty; pass --overwrite to replace it "
            "or choose another --out"
        )
    if not os.path.isfile(os.path.join(out, records.INFO_FILE)):
        raise ConversionError(
            f"--out={out!r} is not a converted dataset (no {records.INFO_FILE}); --overwrite "
            "only replaces datasets: delete it yourself or choose another --out"
        )


def _check_cases(plan: Plan, options, pool, problems: list[Problem]) -> list[CaseSpec]:
    """Decodes every image once; returns the cases that keep at least one image."""
    specs = [(case, image) for case in plan.cases for image in case.images]
    bad = set()
    checks = _ordered_map(pool, lambda item: check_image(item[1], options), specs, window=256)
    for (case, image), problem in zip(
        specs, tqdm.tqdm(checks, "check", len(specs), unit="image", disable=None), strict=True
    ):
        if problem:
            problem.case_id = case.case_id
            problems.append(problem)
            bad.add(id(image))
    kept = []
    for case in plan.cases:
        images = [image for image in case.images if id(image) not in bad]
        if images:
            kept.append(dataclasses.replace(case, images=images))
        else:
            problems.append(Problem("case has no usable images", case.case_id))
    return kept


def verify_dataset(path: str, info: records.DatasetInfo, excluded: Iterable[str] = ()) -> None:
    """Reads every record back and checks the converter's guarantees.

    Raises:
      ValueError: a case is in two splits, an excluded case is present, an image
        id repeats, or the case / image counts differ from `info`.
    """
    spec = {
        "case/id": tf.io.FixedLenFeature([], tf.string),
        "image/id": tf.io.RaggedFeature(tf.string),
    }
    excluded, split_of, image_ids = set(excluded), {}, set()
    for split, entry in info.splits.items():
        # Batched parsing of the two id features only: ~100x faster than parse_case.
        dataset = tf.data.TFRecordDataset(records.shard_paths(path, split)).batch(1024)
        num_cases = num_images = 0
        for batch in dataset.map(lambda s: tf.io.parse_example(s, spec)):
            for case_id, ids in zip(
                batch["case/id"].numpy(), batch["image/id"].to_list(), strict=True
            ):
                case_id = case_id.decode()
                if case_id in split_of:
                    raise ValueError(
                        f"case {case_id!r} is in splits {split_of[case_id]!r} and {split!r}"
                    )
                if case_id in excluded:
                    raise ValueError(f"excluded case {case_id!r} is in split {split!r}")
                split_of[case_id] = split
                if len(set(ids)) < len(ids) or image_ids.intersection(ids):
                    raise ValueError(f"case {case_id!r} repeats an image id")
                image_ids.update(ids)
                num_cases, num_images = num_cases + 1, num_images + len(ids)
        if (num_cases, num_images) != (entry["num_cases"], entry["num_images"]):
            raise ValueError(
                f"split {split!r}: read {num_cases} cases / {num_images} images, "
                f"info says {entry['num_cases']} / {entry['num_images']}"
            )


def summary_table(info: records.DatasetInfo) -> str:
    """Split, cases, images and the images-per-case histogram ('images:cases')."""
    lines = [f"{'split':<11}{'cases':>7}{'images':>8}  images per case (images:cases)"]
    for split, entry in info.splits.items():
        histogram = sorted(entry["images_per_case"].items(), key=lambda kv: int(kv[0]))
        lines.append(
            f"{split:<11}{entry['num_cases']:>7}{entry['num_images']:>8}  "
            + " ".join(f"{k}:{v}" for k, v in histogram)
        )
    return "\n".join(lines)


def convert(
    plan: Plan,
    out: str,
    exclude_cases: Iterable[str] = (),
    num_shards: int | dict[str, int] = 1,
    options: ImageOptions | None = None,
    on_error: str = "fail",
    num_workers: int | None = None,
    overwrite: bool = False,
    name: str | None = None,
    source: str = "",
    license: str = "",  # noqa: A002 - the dataset_info.json field
    citation: str = "",
    modality: str = "",
) -> records.DatasetInfo:
    """Checks, writes, verifies and moves into place the dataset of `plan`.

    Args:
      plan: from `cases_from_csv` or `cases_from_npz`.
      out: destination folder; must not exist or be empty, unless `overwrite`
        (which only replaces an existing converted dataset).
      exclude_cases: case ids kept out of every split (e.g. evaluation patients).
      num_shards: shards per split (int for all, or {split: n}); at most one per case.
      on_error: 'fail' raises ConversionError before writing anything if any input
        is bad; 'skip' leaves bad images / cases out and lists them in info.skipped.
      modality: what the images show, one of records.MODALITIES or '' (not
        recorded); it chooses the augmentation of data.augment='auto'.

    Returns:
      The DatasetInfo written to `out/dataset_info.json`.
    """
    if on_error not in ("fail", "skip"):
        raise ConversionError(f"--on_error={on_error!r}: use 'fail' or 'skip'")
    if modality and modality not in records.MODALITIES:
        raise ConversionError(f"--modality={modality!r}: use one of {records.MODALITIES}")
    options = options or ImageOptions()
    options.check()
    _check_destination(out, overwrite)
    excluded = set(exclude_cases)
    kept = [c for c in plan.cases if c.case_id not in excluded]
    print(
        f"excluded {len(plan.cases) - len(kept)} cases "
        f"({len(excluded)} listed); {len(kept)} cases to check"
    )
    problems = list(plan.problems)
    with concurrent.futures.ThreadPoolExecutor(num_workers or os.cpu_count()) as pool:
        cases = _check_cases(dataclasses.replace(plan, cases=kept), options, pool, problems)
        problems.sort(key=lambda p: (p.line is None, p.line or 0))  # CSV order first
        if problems:
            listing = "\n  ".join(map(str, problems[:50]))
            more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
            if on_error == "fail":
                raise ConversionError(
                    f"{len(problems)} problem(s) in the input; nothing was written. Fix them or "
                    f"pass --on_error=skip to leave them out:\n  {listing}{more}"
                )
            print(f"skipping {len(problems)} problem(s):\n  {listing}{more}")
        if not cases:
            raise ConversionError("no case is left to write; nothing was written")
        parent, base = os.path.split(os.path.abspath(out))
        temporary = os.path.join(parent, f".{base}.incomplete-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            info = _write(plan, cases, temporary, num_shards, options, pool, name or base)
            info.skipped = [dataclasses.asdict(p) for p in problems]
            info.source, info.license, info.citation = source, license, citation
            info.modality = modality
            info.converter = dict(
                version=VERSION,
                args=dict(
                    plan.args,
                    num_shards=num_shards,
                    on_error=on_error,
                    excluded_cases=len(plan.cases) - len(kept),
                    **options.as_args(),
                ),
            )
            records.write_info(temporary, info)
            verify_dataset(temporary, info, excluded)
            _move_into_place(temporary, out)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    print(
        f"verified: {sum(e['num_cases'] for e in info.splits.values())} cases, each in one "
        f"split; none of the {len(excluded)} excluded cases present"
    )
    print(summary_table(info))
    print(f"wrote {out}")
    return info


def _move_into_place(temporary: str, out: str) -> None:
    """Renames `temporary` to `out`, replacing (and then deleting) an old `out`."""
    old = temporary + ".old"
    if os.path.lexists(out):
        os.rename(out, old)
    try:
        os.rename(temporary, out)
    except OSError:
        if os.path.lexists(old):
            os.rename(old, out)  # keep the previous dataset rather than nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write(plan, cases, path, num_shards, options, pool, name) -> records.DatasetInfo:
    by_split = collections.defaultdict(list)
    for case in sorted(cases, key=lambda c: case_hash(-1, c.case_id)):  # mixes shards
        by_split[case.split].append(case)
    multilabel = plan.label_type == "multilabel"

    def serialize(case: CaseSpec) -> bytes:
        encoded = [encode_image(image, options) for image in case.images]
        return records.make_case_example(
            case.case_id,
            images=[data for data, _ in encoded],
            image_ids=[image.image_id for image in case.images],
            formats=[fmt for _, fmt in encoded],
            meta=[image.meta for image in case.images],
            label_class=[image.label_class for image in case.images],
            label_multi=[image.label_multi for image in case.images] if multilabel else None,
        ).SerializeToString(deterministic=True)  # sorted map keys: same bytes every run

    splits = {}
    for split in records.SPLITS:
        if split not in by_split:
            continue
        todo = by_split[split]
        shards = num_shards.get(split, 1) if isinstance(num_shards, dict) else num_shards
        examples = tqdm.tqdm(
            _ordered_map(pool, serialize, todo, window=64),
            f"write {split}",
            len(todo),
            unit="case",
            disable=None,
        )
        written = records.write_split(path, split, examples, max(1, min(shards, len(todo))))
        splits[split] = records.make_split_info(written, [len(c.images) for c in todo])
    return records.DatasetInfo(name, plan.label_type, list(plan.class_names), splits)


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


def _define_flags() -> None:
    # Defined only when run as a program, so make_demo_data can import this module
    # and keep its own --out.
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


if __name__ == "__main__":
    _define_flags()
    app.run(main)
