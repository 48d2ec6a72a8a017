"""This process's batches of one stream mode, as a tf.data pipeline.

`pipeline.Data.dataset` is the way in (it documents every mode's keys); this
module builds the stream from an opened source: the units of epochs.py in
their seeded order, the examples of examples.py, batching and the eval
padding.

Topology. An in-memory source (or one with data.cache_decoded) gives a
global training stream: every process holds the whole split, the units come
in the seeded permutation of all of them, and each example's augmentation
is keyed on its global index. Process p of P takes its slice of every
global batch, so 1 process x 4 devices, 2 x 2 and 4 x 1 read the same global
batches (and resume each other's checkpoints at the same position). A
streamed source is too big for that: each process reads its own share of
the files (big_vision's per-host input), and its stream depends on the
process count.
"""

from __future__ import annotations

import math

import jax
import tensorflow as tf
from absl import logging

from micle_jax.data.sources import interface
from micle_jax.data.stream import epochs, examples


def process_share(
    global_batch_size: int, start_step: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """(process index, process count, per-process batch), JAX's processes by default."""
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    if global_batch_size < count or global_batch_size % count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={count}"
        )
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    return index, count, global_batch_size // count


def build(
    source: interface.Source,
    cfg: dict,
    *,
    mode: str,
    policy,
    kept: list[str] | None,
    seed: int,
    share: interface.Share,
    batch: int,
    start_step: int,
) -> tf.data.Dataset:
    """The batches of `share` for `mode` (see pipeline.Data.dataset).

    Args:
      source: the opened source.
      cfg: the checked data config (pipeline.open_data).
      mode: one of pipeline.MODES, already checked against the data.
      policy: the augmentation (policies.get_policy).
      kept: the training cases data.label_fraction keeps ('supervised'), or None.
      seed: the run's seed.
      share: this process's share of the split.
      batch: examples per batch in this process.
      start_step: first step to produce (resume).
    """
    info = source.info
    index, count = share.index, share.count
    calls = cfg["num_parallel_calls"]
    in_memory = source.in_memory or cfg["cache_decoded"]
    # In memory, the training streams are global: every process holds the
    # whole split and takes its slice of each global batch (see the module
    # docstring); evaluation reads this process's share.
    table_share = share if mode == "eval" else interface.Share()
    table = source.table(cfg["split"], table_share, calls) if in_memory else None
    if in_memory:
        units = epochs.table_units(table, mode, info.label_type, kept)
        n = len(units["first"])
    else:
        n = epochs.num_units(source.counts(cfg["split"], share), mode, kept)
    if n == 0 and mode != "eval":  # An eval share may be empty: it is all padding.
        raise ValueError(
            f"{info.name!r} split {cfg['split']!r}: process {index} of {count} has no "
            f"{'case' if mode == 'micle' else 'image'} for mode {mode!r}"
        )
    maker = examples.ExampleMaker(
        examples.ImageReader(table),
        policy,
        cfg["image_size"],
        info.label_type,
        cfg["uncertain_policy"],
        # Global streams key every example on its global index under the root of
        # process 0 (a 1-process run keeps its stream); streamed ones per process.
        epochs.seed_root(seed, epochs.AUGMENT, 0 if in_memory else index),
    )
    # Plain TF ops, no Python control flow on tensors: AutoGraph has nothing to
    # convert, and converting library code only slows tracing down.
    make_example = tf.autograph.experimental.do_not_convert(getattr(maker, mode))

    if mode == "eval":
        if in_memory:
            elements = epochs.table_elements(table, units, tf.data.Dataset.range(n))
        else:
            elements = epochs.stream_units(source, cfg["split"], mode, share)
        return _eval_batches(source, cfg, elements, maker, batch, share, streamed=not in_memory)

    if in_memory:
        ds = _global_slice(table, units, seed, start_step, batch, share)
    else:
        first = start_step * batch
        e0, skip = divmod(first, n)
        lookup = epochs.kept_lookup(kept)
        elements = epochs.shuffled_stream(
            source, cfg["split"], mode, share, lookup, seed, e0, skip, cfg["shuffle_buffer"]
        )
        ds = elements.enumerate(start=first)
    ds = ds.map(make_example, num_parallel_calls=calls, deterministic=True)
    if not in_memory:
        # Corrupt images that pass the byte check fail to decode: skipped and logged.
        ds = ds.ignore_errors(log_warning=True)
    logging.info(
        "%s %s split %r: %d units/epoch %s, process %d of %d, batch %d, from step %d",
        info.name,
        mode,
        cfg["split"],
        n,
        "in every process (global stream)" if in_memory else "in this process's files",
        index,
        count,
        batch,
        start_step,
    )
    ds = ds.batch(batch, drop_remainder=True).prefetch(cfg["prefetch_batches"])
    return ds.with_options(_options())


def _global_slice(table, units, seed, start_step, batch, share) -> tf.data.Dataset:
    """(global example index, element) of this process's slice of every global batch.

    The global stream is the seeded epoch permutations of all units; global
    step s holds examples [s * B, (s + 1) * B) of it (B = batch * processes),
    and process p takes [s * B + p * batch, s * B + (p + 1) * batch). Example
    g's augmentation is keyed on g: the global batches, and so the run, are
    the same on any number of processes.
    """
    n = len(units["first"])
    global_batch = batch * share.count
    first = start_step * global_batch
    e0, skip = divmod(first, n)
    positions = epochs.permuted_positions(n, seed, e0, skip).enumerate(start=first)
    mine = positions.filter(lambda g, _: (g % global_batch) // batch == share.index)
    lookup = epochs.table_lookup(table, units)
    return mine.map(lambda g, u: (g, lookup(u)))


def _eval_batches(source, cfg, elements, maker, batch, share, streamed):
    """Eval examples padded (mask 0) to as many full batches as the largest process needs."""
    per_process = [
        epochs.num_units(source.counts(cfg["split"], interface.Share(q, share.count)), "eval")
        for q in range(share.count)
    ]
    num_batches = max(1, math.ceil(max(per_process) / batch))
    calls = cfg["num_parallel_calls"]
    make_example = tf.autograph.experimental.do_not_convert(maker.eval)
    ds = elements.enumerate().map(make_example, num_parallel_calls=calls, deterministic=True)
    if streamed:
        ds = ds.ignore_errors(log_warning=True)
    padding = tf.data.Dataset.from_tensors(maker.eval_padding(source.info.num_classes)).repeat()
    ds = ds.concatenate(padding).take(num_batches * batch)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options())


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options
