"""What every source of images provides, and what works on any source.

A source (chosen by `data.source`, registry.py) is either in memory
(in_memory.py: `table()` gives an ImageTable) or streamed (streamed.py:
`cases()` gives a finite tf.data stream of encoded cases; `table()` decodes it
all when the config asks for `cache_decoded`). Both know exactly how many
cases and images each process share holds (`counts()`), which the pipeline
needs to map a step to an epoch and position (exact resume).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from micle_jax.data import records
from micle_jax.data.sources import image_table
from micle_jax.data.sources.image_table import ImageTable


@dataclasses.dataclass(frozen=True)
class Share:
    """The part of a split that process `index` of `count` reads."""

    index: int = 0
    count: int = 1


@dataclasses.dataclass
class CaseCounts:
    """Per case of a share, in the share's canonical order.

    images: int [num_cases] usable images; labeled: int [num_cases] those with a
    label usable for supervised training; case_ids: object (bytes) [num_cases],
    or None where the source cannot list them cheaply (TFDS).
    """

    images: np.ndarray
    labeled: np.ndarray
    case_ids: np.ndarray | None = None


class Source:
    """Base class: `info`, plus in-memory (`table`) or streaming (`cases`) access."""

    info: records.DatasetInfo
    in_memory: bool = True
    # Whether cases() reads its files in a new order each epoch (order_seed).
    file_order_per_epoch: bool = False

    def table(self, split: str, share: Share, num_parallel_calls: int = -1) -> ImageTable:
        """Decoded images of `share` of `split`."""
        raise NotImplementedError

    def counts(self, split: str, share: Share) -> CaseCounts:
        """Usable images per case of `share` of `split`."""
        table = self.table(split, share)
        return table_counts(table, np.arange(table.num_cases), self.info.label_type)

    def image_labels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(case id, label_class) of every usable image of `split`: object [n], int32 [n]."""
        table = self.table(split, Share())
        return np.repeat(table.case_ids, table.case_size), table.label_class

    def cases(self, split: str, share: Share, order_seed=None) -> tf.data.Dataset:
        """Finite stream of encoded cases (streaming sources only); see RecordsSource."""
        raise NotImplementedError(f"{type(self).__name__} is in memory; use table()")


# Largest mean spread (max - min over an image's channels, in 8-bit levels) of a
# 3-channel image that still counts as gray: X-rays saved as RGB have 0, JPEG
# rounding adds about 1; skin photographs have tens.
GRAY_SPREAD = 2.0


def is_gray(image: np.ndarray) -> bool:
    """Whether uint8 [h, w, c] `image` is gray: one channel, or channels equal within GRAY_SPREAD.

    The spread is averaged over pixels, so a coloured marker on an X-ray
    does not make it a colour image.
    """
    if image.shape[-1] == 1:
        return True
    spread = image.max(axis=-1).astype(np.float64) - image.min(axis=-1)
    return float(spread.mean()) <= GRAY_SPREAD


def first_images(source: Source, split: str, max_images: int = 16) -> list[np.ndarray]:
    """Up to `max_images` decoded images (uint8 [h, w, c]) of the first cases of `split`.

    In the split's canonical order, whole split (not a process's share), so
    every process sees the same images. A streamed source decodes only these
    (never the whole split, whatever data.cache_decoded says); images that
    fail to decode are skipped.
    """
    if source.in_memory:
        table = source.table(split, Share())
        return [table.image(i) for i in range(min(max_images, table.num_images))]
    images = []
    for case in source.cases(split, Share()).take(max_images).as_numpy_iterator():
        for encoded in case["images"]:
            try:
                images.append(image_table.decode_image(tf.constant(encoded)).numpy())
            except tf.errors.InvalidArgumentError:
                continue
            if len(images) == max_images:
                return images
    return images


def usable_labels(label_type: str, label_class: np.ndarray) -> np.ndarray:
    """int64 [n]: 1 where an image (label_class int [n]) can train a supervised model."""
    if label_type == "multilabel":
        return np.ones_like(label_class, np.int64)
    if label_type == "multiclass":
        return (label_class >= 0).astype(np.int64)
    return np.zeros_like(label_class, np.int64)


def table_counts(table: ImageTable, cases: np.ndarray, label_type: str) -> CaseCounts:
    """Counts of the cases `cases` (int [k]) of an in-memory `table`."""
    labeled = usable_labels(label_type, table.label_class)
    per_case = np.add.reduceat(labeled, table.case_start) if table.num_cases else labeled
    return CaseCounts(
        table.case_size[cases].astype(np.int64),
        per_case[cases].astype(np.int64),
        table.case_ids[cases],
    )


def split_error(split: str, available) -> ValueError:
    """The error for a split that does not exist, listing the ones that do."""
    return ValueError(f"split {split!r} not found; available splits: {sorted(available)}")
