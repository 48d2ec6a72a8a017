"""What an epoch is made of, and in which order: the units behind Data.dataset.

A unit is an image (modes 'simclr', 'supervised', 'eval') or a case ('micle').
Epoch e of a training stream is an order of this process's units drawn from
(seed, e) alone:
  - in-memory tables: a stateless permutation (`index_shuffle`) of unit
    positions, so starting at any position costs nothing;
  - streamed sources: the share's files in a permuted order, then a shuffle
    buffer seeded by (seed, e); a resumed epoch skips what came before, by
    reading, before anything is decoded.

These stream epochs are the unit of shuffling and resume. The epochs of a
config (total_epochs, warmup_epochs) count pairs instead, by `epoch_unit`
(`pairs_per_epoch`): 'images' by default, in 'simclr' and 'micle' alike, so
both get the same steps and views. A 'micle' stream then passes over its
cases about images/cases times in one config epoch; its own epochs (and so
its shuffling and resume) stay passes over the cases.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from micle_jax.data.sources import interface

# Salts of the seed tree: one independent stream of randomness per purpose.
ORDER, AUGMENT = 1, 2
FOREVER = 2**62  # epochs: the training stream never ends
EPOCH_UNITS = ("images", "cases")  # what one config epoch of pre-training counts


def kept_mask(case_ids: np.ndarray, kept: list[str] | None) -> np.ndarray:
    """bool [n]: which of `case_ids` (bytes [n]) are in `kept` (all when kept is None)."""
    if kept is None:
        return np.ones(len(case_ids), bool)
    return np.isin(case_ids.astype(bytes), np.array([k.encode() for k in kept], bytes))


def num_units(counts: interface.CaseCounts, mode: str, kept: list[str] | None = None) -> int:
    """Units of `mode` in a share: cases ('micle'), labelled images of the kept cases
    ('supervised'), images (otherwise)."""
    if mode == "micle":
        return len(counts.images)
    if mode == "supervised" and kept is not None:
        return int(counts.labeled[kept_mask(counts.case_ids, kept)].sum())
    if mode == "supervised":
        return int(counts.labeled.sum())
    return int(counts.images.sum())


def pairs_per_epoch(counts: interface.CaseCounts, epoch_unit: str) -> int:
    """Contrastive pairs in one config epoch of a share, whatever the mode.

    'images': one pair per image, 'cases': one per case. The same for
    'simclr' (a pair per image drawn) and 'micle' (a pair per case drawn), so
    that equal epochs are equal compute when the two are compared.
    """
    if epoch_unit not in EPOCH_UNITS:
        raise ValueError(f"epoch_unit={epoch_unit!r} must be one of {EPOCH_UNITS}")
    if epoch_unit == "cases":
        return len(counts.images)
    return int(counts.images.sum())


def seed_root(seed: int, *salts) -> tf.Tensor:
    """[2] int64 stateless seed for (seed, *salts)."""
    root = tf.constant([seed, 0], tf.int64)
    for salt in salts:
        root = tf.random.experimental.stateless_fold_in(root, salt)
    return root


def epoch_seed(seed: int, epoch) -> tf.Tensor:
    """[2] int64 seed of epoch `epoch`'s order (the same in every process)."""
    return tf.random.experimental.stateless_fold_in(seed_root(seed, ORDER), epoch)


def table_units(table, mode: str, label_type: str, kept=None) -> dict[str, np.ndarray]:
    """The units of an ImageTable: {'first', 'count', 'case'}, int [num_units] each.

    first: index of the unit's first image; count: its images (1 for an image
    unit); case: its case index. 'supervised' keeps labelled images of kept cases.
    """
    if mode == "micle":
        return dict(first=table.case_start, count=table.case_size, case=np.arange(table.num_cases))
    case_of_image = np.repeat(np.arange(table.num_cases), table.case_size)
    images = np.arange(table.num_images)
    if mode == "supervised":
        usable = interface.usable_labels(label_type, table.label_class) > 0
        images = images[usable & kept_mask(table.case_ids, kept)[case_of_image]]
    return dict(first=images, count=np.ones_like(images), case=case_of_image[images])


def table_elements(table, units: dict, positions: tf.data.Dataset) -> tf.data.Dataset:
    """Maps unit positions (int64 []) to elements (see examples.py) gathered from `table`."""
    return positions.map(table_lookup(table, units))


def table_lookup(table, units: dict):
    """The function unit position (int64 []) -> element (see examples.py) of `table`."""
    first = tf.constant(units["first"], tf.int64)
    count = tf.constant(units["count"], tf.int32)
    case = tf.constant(units["case"], tf.int64)
    image_ids = tf.constant(table.image_ids.astype(bytes))
    case_ids = tf.constant(table.case_ids.astype(bytes))
    label_class = tf.constant(table.label_class)
    label_multi = tf.constant(table.label_multi)

    def lookup(u):
        index = first[u] + tf.range(count[u], dtype=tf.int64)
        return {
            "case_id": tf.gather(case_ids, case[u]),
            "image_ids": tf.gather(image_ids, index),
            "label_class": tf.gather(label_class, index),
            "label_multi": tf.gather(label_multi, index),
            "first": first[u],
        }

    return lookup


def permuted_positions(n: int, seed: int, e0: int, skip: int) -> tf.data.Dataset:
    """Infinite int64 unit positions: epoch e >= e0 is a stateless permutation of range(n).

    The stream starts at position `skip` of epoch `e0`; nothing earlier is computed.
    """

    def epoch(e):
        start = tf.where(tf.equal(e, e0), tf.constant(skip, tf.int64), 0)
        positions = tf.data.Dataset.range(start, n)
        if n < 2:
            return positions
        order_seed = epoch_seed(seed, e)
        return positions.map(lambda j: tf.random.experimental.index_shuffle(j, order_seed, n - 1))

    return tf.data.Dataset.range(e0, FOREVER).flat_map(epoch)


def image_units(cases: tf.data.Dataset, mode: str, label_type: str, kept) -> tf.data.Dataset:
    """Splits a stream of cases into one-image units (n = 1); 'supervised' keeps labelled ones.

    kept: None, or a lookup table (case id -> 1) of the cases 'supervised' keeps.
    """
    if mode == "supervised" and kept is not None:
        cases = cases.filter(lambda case: kept.lookup(case["case_id"]) > 0)

    def split(case):
        return tf.data.Dataset.from_tensor_slices(
            {
                "case_id": tf.fill(tf.shape(case["image_ids"]), case["case_id"]),
                "images": case["images"][:, None],
                "image_ids": case["image_ids"][:, None],
                "label_class": case["label_class"][:, None],
                "label_multi": case["label_multi"][:, None],
            }
        )

    units = cases.flat_map(split)
    if mode == "supervised" and label_type == "multiclass":
        units = units.filter(lambda unit: unit["label_class"][0] >= 0)
    return units


def kept_lookup(kept: list[str] | None):
    """A StaticHashTable case id -> 1 of the kept cases, or None for all cases."""
    if kept is None:
        return None
    initializer = tf.lookup.KeyValueTensorInitializer(
        tf.constant(kept, tf.string), tf.ones([len(kept)], tf.int32)
    )
    return tf.lookup.StaticHashTable(initializer, default_value=0)


def stream_units(source, split, mode, share, kept=None, order_seed=None) -> tf.data.Dataset:
    """One pass over a streamed share's units (cases for 'micle', else images).

    order_seed: None for the canonical order, else the [2] seed of the file order.
    """
    cases = source.cases(split, share, order_seed=order_seed)
    if mode == "micle":
        return cases
    return image_units(cases, mode, source.info.label_type, kept)


def shuffled_stream(source, split, mode, share, kept, seed, e0, skip, buffer) -> tf.data.Dataset:
    """Infinite stream of a streamed share's units, from position `skip` of epoch `e0`.

    Epoch e: the share's files in an order drawn from (seed, e) when the
    source supports it, then a shuffle buffer of `buffer` units seeded by
    (seed, e). Skipped units are read but not decoded.
    """
    fixed = None
    if not source.file_order_per_epoch:
        fixed = stream_units(source, split, mode, share, kept)

    def epoch(e):
        order_seed = epoch_seed(seed, e)
        units = fixed
        if units is None:
            units = stream_units(source, split, mode, share, kept, order_seed)
        buffer_seed = tf.random.stateless_uniform(
            [], order_seed, minval=None, maxval=None, dtype=tf.int64
        )
        units = units.shuffle(buffer, seed=buffer_seed)
        return units.skip(tf.where(tf.equal(e, e0), tf.constant(skip, tf.int64), 0))

    return tf.data.Dataset.range(e0, FOREVER).flat_map(epoch)
