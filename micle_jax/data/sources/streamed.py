"""The streamed sources: case records ('records:PATH') and TFDS ('tfds:NAME').

They read a finite stream of encoded cases per process share (`cases()`) and
know exactly how many cases and images each share holds (`counts()`); with
`cache_decoded` the pipeline decodes the stream once into an ImageTable
(`table()`). See interface.py for the interface.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from micle_jax import fs
from micle_jax.data import records, shards
from micle_jax.data.sources import image_table
from micle_jax.data.sources.image_table import ImageTable
from micle_jax.data.sources.interface import CaseCounts, Share, Source, split_error


def valid_images(images: tf.Tensor) -> tf.Tensor:
    """bool [n]: which encoded images (tf.string [n]) start like a PNG or a JPEG.

    An image's first bytes, checked before decoding: the record format only
    holds PNG and JPEG (records.IMAGE_SIGNATURES), so anything else is corrupt.
    """
    starts = [
        tf.equal(tf.strings.substr(images, 0, len(signature)), signature)
        for signature in records.IMAGE_SIGNATURES
    ]
    return functools.reduce(tf.logical_or, starts)


class RecordsSource(Source):
    """The case records of micle_jax.data.records, streamed from their shards.

    Opening it checks every shard against the SHA-256 the converter recorded
    (shards.verify_shards: ValueError naming the shard if it changed or is
    missing). A process reads whole shard files when there are at least as
    many shards as processes, else every count-th case. Images whose bytes are
    not PNG/JPEG are dropped (and counted, once, when the share is first
    scanned); a split with no usable image is an error.
    """

    in_memory = False
    file_order_per_epoch = True

    def __init__(self, path: str):
        self.path = path
        self.info = records.load_info(path)
        shards.verify_shards(path, self.info)
        # Decoded tables by (split, share): an eval that runs every N steps
        # decodes its split once per run, not once per eval.
        self._tables: dict[tuple[str, Share], ImageTable] = {}

    def _files(self, split: str, share: Share) -> tuple[list[str], bool]:
        files = shards.shard_paths(self.path, split)
        if len(files) >= share.count:
            return files[share.index :: share.count], True
        return files, False

    def _parse(self, serialized):
        case = records.parse_case(serialized, self.info.num_classes, self.info.label_type)
        keep = valid_images(case["images"])
        out = {k: tf.boolean_mask(case[k], keep) for k in ("images", "image_ids", "label_class")}
        out["label_multi"] = tf.boolean_mask(case["label_multi"], keep)
        out["case_id"] = case["case_id"]
        return out

    def cases(self, split: str, share: Share, order_seed=None) -> tf.data.Dataset:
        """Finite stream of a share's cases with their usable encoded images.

        Args:
          split: 'train', 'validation' or 'test'.
          share: which process's share.
          order_seed: None for the canonical (sorted shard) order, else an int
            [2] seed: the share's shard files are read in a permutation of it.

        Returns:
          dataset of {'case_id': string [], 'images': string [n], 'image_ids':
          string [n], 'label_class': int32 [n], 'label_multi': float32 [n, C]}.
        """
        files, by_file = self._files(split, share)
        files_t = tf.constant(files)
        n = len(files)
        order = tf.data.Dataset.range(n)
        if order_seed is not None and by_file and n > 1:
            order = order.map(lambda i: tf.random.experimental.index_shuffle(i, order_seed, n - 1))
        names = order.map(lambda i: files_t[i])
        cycle = min(n, 16) if by_file else 1
        ds = names.interleave(
            tf.data.TFRecordDataset,
            cycle_length=cycle,
            block_length=1,
            num_parallel_calls=cycle,
            deterministic=True,
        )
        if not by_file:
            ds = ds.shard(share.count, share.index)
        ds = ds.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.filter(lambda case: tf.size(case["images"]) > 0)

    def counts(self, split: str, share: Share) -> CaseCounts:
        files, by_file = self._files(split, share)
        scans = [self._scan(f) for f in files]
        per_case = np.concatenate([s.counts for s in scans])
        case_ids = np.concatenate([s.case_ids for s in scans])
        if not by_file:
            per_case = per_case[share.index :: share.count]
            case_ids = case_ids[share.index :: share.count]
        skipped = int(per_case[:, 2].sum())
        if skipped:
            logging.warning(
                "records %s split %r (share %d/%d): skipped %d image(s) whose bytes are not "
                "PNG or JPEG",
                self.path,
                split,
                share.index,
                share.count,
                skipped,
            )
        usable = per_case[:, 0] > 0
        if not usable.any():
            where = f" share {share.index} of {share.count}" if share.count > 1 else ""
            raise ValueError(
                f"records {self.path!r} split {split!r}{where} has no usable image "
                f"({skipped} corrupt); convert the data again with "
                "`python -m micle_jax.data.convert`"
            )
        return CaseCounts(per_case[usable, 0], per_case[usable, 1], case_ids[usable])

    def image_labels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        scans = [self._scan(f) for f in shards.shard_paths(self.path, split)]
        sizes = np.concatenate([s.counts[:, 0] for s in scans])
        case_ids = np.repeat(np.concatenate([s.case_ids for s in scans]), sizes)
        return case_ids, np.concatenate([s.labels for s in scans])

    def _scan(self, path: str) -> _Scan:
        size, mtime_ns = fs.stat(path)
        return _scan_file(path, size, mtime_ns, self.info.num_classes, self.info.label_type)

    def table(self, split: str, share: Share, num_parallel_calls: int = -1) -> ImageTable:
        if (split, share) in self._tables:
            return self._tables[split, share]
        self.counts(split, share)  # logs corrupt images, rejects an empty split
        table = image_table.materialize(
            self.cases(split, share), num_parallel_calls, f"records {self.path} {split}"
        )
        if table.num_images == 0:
            raise ValueError(
                f"records {self.path!r} split {split!r}: no image could be decoded; convert "
                "the data again with `python -m micle_jax.data.convert`"
            )
        self._tables[split, share] = table
        return table


@dataclasses.dataclass
class _Scan:
    """One shard file's cases, read without decoding.

    counts: int64 [num_cases, 3] (usable images, labelled usable images, corrupt
    images); case_ids: object (bytes) [num_cases]; labels: int32 [usable images]
    label_class of the usable images, case after case.
    """

    counts: np.ndarray
    case_ids: np.ndarray
    labels: np.ndarray


# A scan reads every record of the file. Cached because the counts and labels
# of a split are asked for many times over, not only by one handle (sizes, the
# label fraction, the eval padding of every process share, the decoded table's
# check) but by every eval of the same files. Keyed on the file's size and
# mtime too: a rewritten file is scanned again.
@functools.lru_cache(maxsize=4096)
def _scan_file(path, size, mtime_ns, num_classes, label_type) -> _Scan:
    del size, mtime_ns
    parse = functools.partial(records.parse_case, num_classes=num_classes, label_type=label_type)

    def scan(serialized):
        case = parse(serialized)
        keep = valid_images(case["images"])
        usable = tf.reduce_sum(tf.cast(keep, tf.int64))
        if label_type == "multiclass":
            labeled = tf.reduce_sum(tf.cast(keep & (case["label_class"] >= 0), tf.int64))
        elif label_type == "multilabel":
            labeled = usable
        else:
            labeled = tf.constant(0, tf.int64)
        return {
            "counts": tf.stack([usable, labeled, tf.size(keep, tf.int64) - usable]),
            "case_id": case["case_id"],
            "labels": tf.boolean_mask(case["label_class"], keep),
        }

    ds = tf.data.TFRecordDataset(path).map(scan, num_parallel_calls=tf.data.AUTOTUNE)
    counts, case_ids, labels = [np.zeros([0, 3], np.int64)], [np.zeros([0], object)], []
    for batch in ds.ragged_batch(4096):
        counts.append(batch["counts"].numpy())
        case_ids.append(batch["case_id"].numpy().astype(object))
        labels.append(batch["labels"].flat_values.numpy())
    labels = np.concatenate(labels) if labels else np.zeros([0], np.int32)
    return _Scan(np.concatenate(counts), np.concatenate(case_ids), labels.astype(np.int32))


class TfdsSource(Source):
    """A prepared TFDS dataset ('image' feature, optional 'label' ClassLabel).

    Never downloads. Process shares are `tfds.even_splits` (by example). Files
    are read in order; TFDS shuffled the examples when it prepared them.
    """

    in_memory = False

    def __init__(self, name: str, data_dir: str | None = None):
        self.name = name
        self.builder = tfds.builder(name, data_dir=data_dir)
        features = self.builder.info.features
        if "image" not in features:
            raise ValueError(f"tfds:{name} has no 'image' feature; features: {list(features)}")
        self._has_label = "label" in features and hasattr(features["label"], "names")
        self.info = records.DatasetInfo(
            name=name,
            label_type="multiclass" if self._has_label else "none",
            class_names=list(features["label"].names) if self._has_label else [],
            splits={},
        )

    def _subsplit(self, split: str, share: Share):
        known = list(self.builder.info.splits.keys())
        if known and split not in known:
            raise split_error(split, known)
        return tfds.even_splits(split, n=share.count)[share.index] if share.count > 1 else split

    def _dataset(self, split: str, share: Share) -> tf.data.Dataset:
        sub = self._subsplit(split, share)
        options = tf.data.Options()
        options.deterministic = True
        try:
            return self.builder.as_dataset(
                split=sub,
                shuffle_files=False,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(add_tfds_id=True, options=options),
            )
        except AssertionError as e:  # TFDS's "dataset not found" is an assertion.
            raise FileNotFoundError(
                f"tfds:{self.name} is not prepared in {self.builder.data_dir!r}: prepare it first "
                f"(`tfds build {self.name} --data_dir=DIR`, then source='tfds:{self.name}"
                "?data_dir=DIR'); this pipeline never downloads"
            ) from e

    def cases(self, split: str, share: Share, order_seed=None) -> tf.data.Dataset:
        """Finite stream, one case per example; same structure as RecordsSource.cases."""
        del order_seed

        def to_case(example):
            label = tf.cast(example["label"], tf.int32) if self._has_label else tf.constant(-1)
            return {
                "case_id": example["tfds_id"],
                "images": example["image"][None],
                "image_ids": example["tfds_id"][None],
                "label_class": label[None],
                "label_multi": tf.zeros([1, 0], tf.float32),
            }

        ds = self._dataset(split, share)
        return ds.map(to_case, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def counts(self, split: str, share: Share) -> CaseCounts:
        n = int(self._dataset(split, share).cardinality())
        if n < 0:  # Unknown cardinality: TFDS's metadata has the count.
            n = self.builder.info.splits[self._subsplit(split, share)].num_examples
        ones = np.ones([n], np.int64)
        return CaseCounts(ones, ones if self._has_label else np.zeros([n], np.int64))

    def image_labels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(
            f"tfds:{self.name}: label fractions would read the whole split to list its "
            "examples; convert it to records (python -m micle_jax.data.convert) or use "
            "data.label_fraction=1.0"
        )

    def table(self, split: str, share: Share, num_parallel_calls: int = -1) -> ImageTable:
        return image_table.materialize(
            self.cases(split, share), num_parallel_calls, f"tfds:{self.name} {split}"
        )
