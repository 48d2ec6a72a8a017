"""Decoded images held in memory, grouped by case, with random access.

An `ImageTable` is what the in-memory sources (synthetic, arrays) produce and
what a streaming source (records, TFDS) becomes with `cache_decoded=True`: all
pixels in one flat uint8 buffer plus per-image offsets and shapes, images of a
case stored contiguously. The pipeline indexes it directly, so an epoch's order
is an exact stateless permutation and resuming costs nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from absl import logging

# tf.data captures the table as constants; beyond this the start-up copy gets
# slow and serialised graphs approach protobuf's 2 GiB limit.
MAX_TABLE_BYTES = 2 * 1024**3
# Decoded images read from tf.data per iterator step (materialize).
READ_BATCH = 256


@dataclasses.dataclass
class ImageTable:
    """Decoded images grouped by case (images of a case are contiguous).

    Attributes:
      pixels: uint8 [total] every image's pixels, flattened and concatenated.
      offsets: int64 [num_images] start of each image in `pixels`.
      shapes: int32 [num_images, 3] (height, width, channels), channels 1 or 3.
      image_ids: object (bytes) [num_images].
      label_class: int32 [num_images] class index, -1 = no label.
      label_multi: float32 [num_images, num_classes] (num_classes 0 unless multilabel).
      case_ids: object (bytes) [num_cases].
      case_start: int64 [num_cases] index of the case's first image.
      case_size: int32 [num_cases] images in the case (>= 1).
    """

    pixels: np.ndarray
    offsets: np.ndarray
    shapes: np.ndarray
    image_ids: np.ndarray
    label_class: np.ndarray
    label_multi: np.ndarray
    case_ids: np.ndarray
    case_start: np.ndarray
    case_size: np.ndarray

    @property
    def num_images(self) -> int:
        return len(self.offsets)

    @property
    def num_cases(self) -> int:
        return len(self.case_ids)

    def take_cases(self, indices) -> ImageTable:
        """A table of the cases `indices` (int [k]), in that order."""
        indices = np.asarray(indices, np.int64)
        images = _case_image_indices(self.case_start[indices], self.case_size[indices])
        return pack(
            [self.image(i) for i in images],
            image_ids=self.image_ids[images],
            label_class=self.label_class[images],
            label_multi=self.label_multi[images],
            case_ids=self.case_ids[indices],
            case_size=self.case_size[indices],
        )

    def image(self, index: int) -> np.ndarray:
        """Image `index` as uint8 [h, w, c] (a view into `pixels`)."""
        h, w, c = (int(v) for v in self.shapes[index])
        start = int(self.offsets[index])
        return self.pixels[start : start + h * w * c].reshape(h, w, c)


def _case_image_indices(case_start: np.ndarray, case_size: np.ndarray) -> np.ndarray:
    """Concatenated image indices of the given cases: int64 [sum(case_size)]."""
    if len(case_size) == 0:
        return np.zeros([0], np.int64)
    return np.concatenate(
        [np.arange(s, s + n, dtype=np.int64) for s, n in zip(case_start, case_size, strict=True)]
    )


def pack(
    images: list[np.ndarray],
    *,
    image_ids,
    label_class,
    label_multi,
    case_ids,
    case_size,
) -> ImageTable:
    """Builds an ImageTable from per-image arrays, cases given as consecutive runs.

    Args:
      images: num_images uint8 arrays [h, w] or [h, w, c] (sizes may differ).
      image_ids: [num_images] str or bytes.
      label_class: int [num_images].
      label_multi: float [num_images, num_classes].
      case_ids: [num_cases] str or bytes.
      case_size: int [num_cases], summing to num_images.
    """
    images = [im[..., None] if im.ndim == 2 else im for im in images]
    shapes = np.array([im.shape for im in images], np.int32).reshape(-1, 3)
    sizes = np.prod(shapes.astype(np.int64), axis=1)
    offsets = (np.cumsum(sizes) - sizes).astype(np.int64)
    if int(sizes.sum()) > MAX_TABLE_BYTES:
        raise ValueError(
            f"{sizes.sum() / 1024**3:.1f} GiB of decoded images do not fit the in-memory table "
            f"(limit {MAX_TABLE_BYTES / 1024**3:.0f} GiB): set data.cache_decoded=False "
            "(stream from records) or use fewer/smaller images"
        )
    pixels = (
        np.concatenate([im.reshape(-1) for im in images]).astype(np.uint8)
        if images
        else np.zeros([0], np.uint8)
    )
    case_size = np.asarray(case_size, np.int32).reshape(-1)
    label_multi = np.asarray(label_multi, np.float32)
    label_multi = label_multi.reshape(len(images), label_multi.size // max(len(images), 1))
    if int(case_size.sum()) != len(images) or (case_size < 1).any():
        raise ValueError("case sizes must be >= 1 and sum to the number of images")
    return ImageTable(
        pixels=pixels,
        offsets=offsets,
        shapes=shapes,
        image_ids=np.array([_as_bytes(i) for i in image_ids], dtype=object),
        label_class=np.asarray(label_class, np.int32).reshape(-1),
        label_multi=label_multi,
        case_ids=np.array([_as_bytes(i) for i in case_ids], dtype=object),
        case_start=(np.cumsum(case_size) - case_size).astype(np.int64),
        case_size=case_size,
    )


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes PNG/JPEG bytes (tf.string []) to uint8 [h, w, c], c as stored (1 or 3).

    8-bit output (16-bit PNGs are scaled); a gray+alpha or RGBA image keeps only
    its colour channels.
    """
    image = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
    channels = tf.shape(image)[-1]
    keep = tf.where(channels < 3, 1, 3)
    return image[..., :keep]


def materialize(cases: tf.data.Dataset, num_parallel_calls: int, name: str) -> ImageTable:
    """Decodes every image of a finite case stream into an ImageTable.

    Images that fail to decode are skipped and their number logged; a case
    left without images is dropped.

    Args:
      cases: dataset of case dicts {'case_id': string [], 'images': string [n],
        'image_ids': string [n], 'label_class': int32 [n], 'label_multi': float32 [n, C]}.
      num_parallel_calls: decode parallelism.
      name: what the stream is (for the log).
    """

    def per_image(index, case):
        n = tf.shape(case["images"])[0]
        return tf.data.Dataset.from_tensor_slices(
            {
                "case_index": tf.fill([n], index),
                "case_id": tf.fill([n], case["case_id"]),
                "encoded": case["images"],
                "image_id": case["image_ids"],
                "label_class": case["label_class"],
                "label_multi": case["label_multi"],
            }
        )

    def decode(item):
        item = dict(item)
        pixels = decode_image(item.pop("encoded"))
        item["shape"] = tf.shape(pixels)
        item["pixels"] = tf.reshape(pixels, [-1])
        return item

    expected = cases.map(lambda case: tf.size(case["images"], tf.int64)).reduce(
        np.int64(0), lambda count, n: count + n
    )
    decoded = cases.enumerate().flat_map(per_image)
    decoded = decoded.map(decode, num_parallel_calls=num_parallel_calls, deterministic=True)
    decoded = decoded.ignore_errors(log_warning=True)
    # Read in batches (each image's pixels one ragged row): an iterator step per
    # image costs ~0.8 ms of Python, 5.8 of the 7.6 s HAM10000's 6,861 demo images took.
    columns: dict[str, list[np.ndarray]] = {}
    images: list[np.ndarray] = []
    for batch in decoded.ragged_batch(READ_BATCH):
        pixels = batch.pop("pixels")
        rows = np.split(pixels.flat_values.numpy(), pixels.row_splits.numpy()[1:-1])
        shapes = batch.pop("shape").numpy()
        images += [row.reshape(shape) for row, shape in zip(rows, shapes, strict=True)]
        for key, value in batch.items():
            columns.setdefault(key, []).append(value.numpy())
    skipped = int(expected) - len(images)
    if skipped:
        logging.warning("%s: skipped %d image(s) that failed to decode", name, skipped)
    column = {key: np.concatenate(values) for key, values in columns.items()} or {
        "case_index": np.zeros([0], np.int64),
        "case_id": np.zeros([0], object),
        "image_id": np.zeros([0], object),
        "label_class": np.zeros([0], np.int32),
        "label_multi": np.zeros([0, 0], np.float32),
    }
    case_index = column["case_index"]
    # Cases arrive in order, so each case's surviving images are one run.
    starts = np.flatnonzero(np.diff(case_index, prepend=-1))
    case_size = np.diff(np.append(starts, len(images)))
    logging.info("%s: decoded %d images of %d cases into memory", name, len(images), len(starts))
    return pack(
        images,
        image_ids=list(column["image_id"]),
        label_class=column["label_class"],
        label_multi=column["label_multi"],
        case_ids=list(column["case_id"][starts]),
        case_size=case_size,
    )
