"""The converter's core: check, write, verify and move a planned dataset into place.

Five steps, so that bad input never leaves a half-written dataset that looks
complete: plan (read the table, group rows into cases, assign splits:
inputs.py), check (decode every image: images.py; with on_error='fail' any
problem stops here, before anything is written), write into a temporary folder
next to `out`, verify what was written (no case in two splits, no excluded
case), rename into place. The command line is cli.py (`python -m
micle_jax.data.convert`); docs/data_format.md shows the commands with their
output.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Iterator

import tensorflow as tf
import tqdm

from micle_jax.data import records, shards
from micle_jax.data.convert import deidentify
from micle_jax.data.convert.images import ImageOptions, check_image, encode_image
from micle_jax.data.convert.inputs import CaseSpec, ConversionError, Plan, Problem, case_hash

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
        dataset = tf.data.TFRecordDataset(shards.shard_paths(path, split)).batch(1024)
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
      plan: from `cases_from_csv`, `cases_from_npz` or dicom_cases.py; a DICOM
        plan's de-identification report is printed first and written next to
        the records, and its skipped inputs are listed without file paths.
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
    if plan.deidentify:
        print(plan.deidentify.summary())
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
            # DICOM file paths may name patients: the records' list keeps hashed ids only.
            redact = dict(file="") if plan.deidentify else {}
            info.skipped = [dataclasses.asdict(dataclasses.replace(p, **redact)) for p in problems]
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
            if plan.deidentify:
                with open(os.path.join(temporary, deidentify.REPORT_FILE), "w") as f:
                    f.write(plan.deidentify.as_json())
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
        count = num_shards.get(split, 1) if isinstance(num_shards, dict) else num_shards
        examples = tqdm.tqdm(
            _ordered_map(pool, serialize, todo, window=64),
            f"write {split}",
            len(todo),
            unit="case",
            disable=None,
        )
        written = shards.write_split(path, split, examples, max(1, min(count, len(todo))))
        splits[split] = shards.make_split_info(written, [len(c.images) for c in todo])
    return records.DatasetInfo(name, plan.label_type, list(plan.class_names), splits)
