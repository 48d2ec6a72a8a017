"""The shard files of a records dataset: names, writing, integrity checks.

A split is written round-robin into TFRecord shards named
`<split>-<index>-of-<count>` (records.py describes one case's record and
dataset_info.json); the converter records each shard's SHA-256, and a records
source checks them when it opens the dataset (`verify_shards`).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from micle_jax import fs
from micle_jax.data.records import CONVERT_HINT, SPLITS, DatasetInfo

_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")


def shard_paths(path: str, split: str) -> list[str]:
    """Sorted shard file paths of one split.

    Raises:
      ValueError: no shard of `split` exists; the message lists the splits present.
    """
    # A URL's folder names are taken as they are (tf.io.gfile has no glob.escape).
    folder = path if fs.is_url(path) else glob.escape(path)
    found = sorted(fs.glob(os.path.join(folder, f"{split}-*-of-*")))
    found = [p for p in found if _SHARD_RE.match(os.path.basename(p))]
    if not found:
        names = fs.listdir(path) if fs.isdir(path) else []
        present = sorted({m["split"] for m in map(_SHARD_RE.match, names) if m})
        raise ValueError(
            f"no shards of split {split!r} in {path!r}; available splits: {present or 'none'}"
            + ("" if present else f"; {CONVERT_HINT}")
        )
    return found


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_split(
    path: str, split: str, examples: Iterable[bytes], num_shards: int
) -> list[dict[str, Any]]:
    """Writes serialized cases round-robin into `num_shards` shards of `split`.

    Round-robin keeps shard sizes within one case of each other, so every host
    of a multi-host job reads about the same amount. A shard may be empty when
    there are fewer cases than shards.

    Returns:
      One dict per shard: {"file": basename, "num_cases": int, "sha256": hex}.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    fs.makedirs(path)
    names = [f"{split}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    counts = [0] * num_shards
    writers = [tf.io.TFRecordWriter(os.path.join(path, name)) for name in names]
    try:
        for i, example in enumerate(examples):
            writers[i % num_shards].write(example)
            counts[i % num_shards] += 1
    finally:
        for writer in writers:
            writer.close()
    return [
        {"file": name, "num_cases": count, "sha256": file_sha256(os.path.join(path, name))}
        for name, count in zip(names, counts, strict=True)
    ]


def make_split_info(shards: list[dict[str, Any]], images_per_case: Sequence[int]) -> dict:
    """The `splits[split]` entry of DatasetInfo.

    Args:
      shards: what `write_split` returned.
      images_per_case: the number of images of every case written, in any order.
    """
    if sum(s["num_cases"] for s in shards) != len(images_per_case):
        raise ValueError("shards and images_per_case count different numbers of cases")
    values, counts = np.unique(np.asarray(images_per_case, np.int64), return_counts=True)
    return {
        "num_cases": len(images_per_case),
        "num_images": int(np.sum(images_per_case)),
        "images_per_case": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
        "shards": shards,
    }


# Shard hashes are checked at open up to this many bytes of shards (about 2-4 s
# per GB per process); beyond it, only their presence (a pod reading 100 GB
# of ImageNet would spend minutes hashing in every process).
VERIFY_HASH_MAX_BYTES = 1 << 30


def verify_shards(
    path: str, info: DatasetInfo, max_hash_bytes: int | None = VERIFY_HASH_MAX_BYTES
) -> None:
    """Raises ValueError if a shard of `info` is missing or not the file the converter wrote.

    Every shard must exist. Their SHA-256s are compared with dataset_info.json's
    when the shards total at most `max_hash_bytes` (1 GiB by default; None:
    always); a larger dataset is only
    checked for presence, with a log line saying so (check it whole once with
    `shards.verify_shards(path, records.load_info(path), max_hash_bytes=None)`).
    The error names the shard and the fix (convert the data again). A records
    source calls this when it is opened. Each file is hashed once per process
    while its size and modification time stay the same, so opening a dataset
    again costs nothing (the first open of data/demo/ham10000, 16 MB, takes
    0.03-0.06 s).
    """
    shards = [
        (split, os.path.join(path, shard["file"]), shard["sha256"])
        for split, entry in info.splits.items()
        for shard in entry["shards"]
    ]
    for split, file, _ in shards:
        if not fs.isfile(file):
            raise ValueError(
                f"split {split!r}: shard {file!r} is missing; convert the data again "
                "with `python -m micle_jax.data.convert` (see docs/data_format.md)"
            )
    total = sum(fs.stat(file)[0] for _, file, _ in shards)
    if max_hash_bytes is None or total <= max_hash_bytes:
        for split, file, sha256 in shards:
            if _cached_sha256(file, *_stamp(file)) != sha256:
                raise ValueError(
                    f"split {split!r}: shard {file!r} fails its sha256 check: its bytes changed "
                    "after conversion; convert the data again with "
                    "`python -m micle_jax.data.convert` (see docs/data_format.md)"
                )
    else:
        logging.info(
            "%s: %.1f GB of shards, over %.1f GB: their SHA-256s are not checked at open "
            "(shards.verify_shards(..., max_hash_bytes=None) checks them)",
            path,
            total / 1e9,
            max_hash_bytes / 1e9,
        )


def _stamp(file: str) -> tuple[int, int]:
    return fs.stat(file)


# Keyed on the file's size and mtime too: a rewritten file is hashed again.
@functools.lru_cache(maxsize=4096)
def _cached_sha256(file: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns
    return file_sha256(file)
