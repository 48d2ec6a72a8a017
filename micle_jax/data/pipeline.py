"""The tf.data input pipeline: what the trainers iterate over.

  ds = pipeline.make_dataset(config.data, mode="micle", global_batch_size=4096,
                             seed=config.seed, start_step=step)

gives this process's batches (global_batch_size // process_count examples) as
dicts of tensors; see `make_dataset` for each mode's keys. Training streams
are infinite and a pure function of (seed, step): element k = step * batch + i
belongs to epoch k // epoch_size, whose order is a permutation seeded by
(seed, epoch), and its augmentation is seeded by (seed, process, k). Resuming
at `start_step` starts at that epoch and skips only what comes before it in
that epoch; earlier epochs are never replayed. In-memory data (synthetic,
arrays, cache_decoded) skips for free (the permutation is computed, not
drawn); streamed records skip by reading, before any decoding.

data_config fields (configs set them under `config.data`):
  source            see micle_jax/data/sources.py ('synthetic', 'records:PATH', ...)
  split             'train', 'validation' or 'test'
  mode              which stream a trainer wants (make_dataset takes it as an argument)
  image_size        side of the views in pixels (SimCLR: 224)
  augment           policy name ('simclr', 'cxr', 'supervised', 'eval', 'none'), an
                    op list, or 'auto': chosen from the data (resolve_augment)
  augment_kwargs    the policy's arguments (with 'auto': of the policy it resolves to)
  shuffle_buffer    streamed sources: examples in the shuffle buffer
  cache_decoded     decode a streamed source once into memory (small datasets)
  uncertain_policy  multilabel: 'ignore', 'zeros' or 'ones' (CheXpert's U-policies)
  label_fraction    'supervised': keep this fraction of the training cases (fractions.py)
  epoch_unit        what a pre-training epoch counts (pairs_per_epoch): 'images' or 'cases'
  num_parallel_calls  tf.data parallelism (-1 = AUTOTUNE)
"""

from __future__ import annotations

import math

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from micle_jax.data import augment, epochs, fractions, pairs, records, sources

MODES = ("simclr", "micle", "supervised", "eval")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
AUTO_AUGMENT = "auto"
# The paper's policies (Azizi et al. 2021): SimCLR's colour policy for
# dermatology photographs, the no-blur 'cxr' policy for chest X-rays.
MODALITY_POLICIES = {"cxr": "cxr", "dermatology": "simclr"}
DEFAULTS = dict(
    source="synthetic",
    split="train",
    mode="simclr",
    image_size=224,
    augment="simclr",
    augment_kwargs={},
    shuffle_buffer=10_000,
    cache_decoded=False,
    uncertain_policy="ignore",
    label_fraction=1.0,
    epoch_unit="images",
    num_parallel_calls=tf.data.AUTOTUNE,
)


def _config(data_config) -> dict:
    """data_config as a plain dict with defaults filled in; unknown or bad fields raise."""
    given = dict(data_config.items()) if hasattr(data_config, "items") else dict(data_config)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown data config field(s) {unknown}; known: {', '.join(sorted(DEFAULTS))}"
        )
    cfg = {**DEFAULTS, **given}
    if cfg["split"] not in records.SPLITS:
        raise ValueError(f"data.split={cfg['split']!r} must be one of {records.SPLITS}")
    for key, low in (("image_size", 1), ("shuffle_buffer", 1)):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < low:
            raise ValueError(f"data.{key}={cfg[key]!r} must be an int >= {low}")
    if cfg["uncertain_policy"] not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"data.uncertain_policy={cfg['uncertain_policy']!r} must be one of {UNCERTAIN_POLICIES}"
        )
    if cfg["epoch_unit"] not in epochs.EPOCH_UNITS:
        raise ValueError(
            f"data.epoch_unit={cfg['epoch_unit']!r} must be one of {epochs.EPOCH_UNITS}"
        )
    if not 0.0 < cfg["label_fraction"] <= 1.0:
        raise ValueError(f"data.label_fraction={cfg['label_fraction']} must be in (0, 1]")
    calls = cfg["num_parallel_calls"]
    if not isinstance(calls, int) or not (calls == tf.data.AUTOTUNE or calls >= 1):
        raise ValueError(f"data.num_parallel_calls={calls!r} must be -1 (AUTOTUNE) or >= 1")
    if not isinstance(cfg["cache_decoded"], bool):
        raise ValueError(f"data.cache_decoded={cfg['cache_decoded']!r} must be True or False")
    name = cfg["augment"]
    if isinstance(name, str) and name != AUTO_AUGMENT and name not in augment.POLICIES:
        raise ValueError(
            f"data.augment={name!r}: unknown augment policy {name!r}; use {AUTO_AUGMENT!r} "
            f"(chosen from the data), one of {', '.join(sorted(augment.POLICIES))}, or an op list"
        )
    return cfg


def resolve_augment(data_config) -> tuple[str | list, str]:
    """The augmentation policy training uses, and why: data.augment with 'auto' resolved.

    'auto' is resolved from the data, in this order:
      1. the dataset's recorded modality (dataset_info.json `modality`, written
         by `convert --modality`): 'cxr' -> 'cxr', 'dermatology' -> 'simclr';
      2. otherwise ('other' or not recorded) its pixels: 'cxr' when the first
         16 images of the split are all gray (one channel, or three equal ones:
         sources.is_gray), else 'simclr'.
    Any other value is returned as given. Every process resolves to the same
    policy (the whole split's first images, not a process's share).

    Returns:
      (policy name or op list, a reason for the log, e.g. "auto: images are RGB").
    """
    cfg = _config(data_config)
    return _resolve_augment(cfg, sources.get_source(cfg["source"]))


def _resolve_augment(cfg: dict, source: sources.Source) -> tuple[str | list, str]:
    name = cfg["augment"]
    if not isinstance(name, str) or name != AUTO_AUGMENT:
        return name, "as configured"
    info = source.info
    if info.modality in MODALITY_POLICIES:
        return MODALITY_POLICIES[info.modality], f"auto: {info.name} has modality {info.modality!r}"
    images = sources.first_images(source, cfg["split"])
    if not images:
        raise ValueError(
            f"data.augment='auto': no image of {info.name!r} split {cfg['split']!r} decodes, "
            "so the policy cannot be chosen; set data.augment"
        )
    gray = all(sources.is_gray(image) for image in images)
    recorded = f"modality {info.modality!r}" if info.modality else "no modality recorded"
    return ("cxr" if gray else "simclr"), (
        f"auto: {info.name} {cfg['split']} images are {'gray' if gray else 'RGB'}, "
        f"first {len(images)} checked; {recorded}"
    )


def _check_mode(mode: str, info: records.DatasetInfo) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if mode == "supervised" and info.label_type == "none":
        raise ValueError(
            f"mode 'supervised' needs labels, but dataset {info.name!r} has label_type 'none'; "
            "use a labelled dataset (or mode 'simclr' / 'micle')"
        )


def get_info(data_config) -> records.DatasetInfo:
    """The dataset's info: name, label_type, class_names, num_classes."""
    return sources.get_source(_config(data_config)["source"]).info


def label_fraction_cases(data_config, seed: int) -> list[str] | None:
    """The training cases that data.label_fraction keeps (None at 1.0: every case).

    Whole cases, stratified by class for multiclass data, a pure function of
    (split, fraction, seed): see micle_jax/data/fractions.py. Only mode
    'supervised' applies it; pre-training and evaluation see every case.

    Returns:
      Sorted case ids (str), or None when label_fraction is 1.0.
    """
    cfg = _config(data_config)
    return _kept_cases(cfg, sources.get_source(cfg["source"]), seed)


def _kept_cases(cfg: dict, source: sources.Source, seed: int) -> list[str] | None:
    if cfg["label_fraction"] == 1.0:
        return None
    info = source.info
    case_ids, labels = source.image_labels(cfg["split"])
    multiclass = info.label_type == "multiclass"
    return fractions.select_cases(
        case_ids,
        labels if multiclass else None,
        cfg["label_fraction"],
        seed,
        stratify=multiclass,
        class_names=info.class_names,
    )


def class_counts(data_config, seed: int) -> np.ndarray:
    """Labelled training images per class [C] of a multiclass split, label fraction applied.

    The cases kept by data.label_fraction for `seed` (as the 'supervised'
    stream reads them); for class-balanced losses.
    """
    cfg = _config(data_config)
    source = sources.get_source(cfg["source"])
    info = source.info
    if info.label_type != "multiclass":
        raise ValueError(
            f"class counts need multiclass labels; {info.name!r} has label_type {info.label_type!r}"
        )
    case_ids, labels = source.image_labels(cfg["split"])
    labels = np.asarray(labels)
    kept = _kept_cases(cfg, source, seed)
    if kept is not None:
        keep = set(kept)
        inside = np.array([fractions._as_str(c) in keep for c in case_ids], bool)
        labels = labels[inside]
    labels = labels[labels >= 0]
    return np.bincount(labels, minlength=info.num_classes).astype(np.int64)


def num_examples(data_config, mode: str, seed: int = 0) -> int:
    """Examples in one pass of a stream over the whole split (all processes).

    Images for 'simclr' and 'eval', labelled images for 'supervised', cases
    for 'micle'. For epoch -> step conversion of 'supervised' (pre-training
    converts with `pairs_per_epoch`). With label_fraction < 1,
    'supervised' counts the images of the cases kept for `seed` (pass the
    run's seed for the exact count).
    """
    cfg = _config(data_config)
    source = sources.get_source(cfg["source"])
    _check_mode(mode, source.info)
    kept = _kept_cases(cfg, source, seed) if mode == "supervised" else None
    return epochs.num_units(source.counts(cfg["split"], sources.Share()), mode, kept)


def pairs_per_epoch(data_config) -> int:
    """Pairs in one pre-training epoch of the whole split, as data.epoch_unit counts them.

    'images' (default): as many pairs as the split has images, 'cases': as
    many as it has cases; the same in modes 'simclr' and 'micle', so the same
    total_epochs gives both the same steps and views (a fair comparison). The
    'micle' stream still draws one pair per case: in an 'images' epoch it
    passes over the cases about images/cases times (see epochs.py).
    """
    cfg = _config(data_config)
    source = sources.get_source(cfg["source"])
    return epochs.pairs_per_epoch(source.counts(cfg["split"], sources.Share()), cfg["epoch_unit"])


def _hide_accelerators_from_tf() -> None:
    # TensorFlow only feeds JAX; left alone it would take the GPU's memory.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # Already initialised: the devices are fixed by now.
        pass


def make_dataset(
    data_config,
    *,
    mode: str,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tf.data.Dataset:
    """This process's batches of `mode` examples (b = global_batch_size // process_count).

    Modes and their batch keys (s = data_config.image_size, C = num_classes):
      'simclr'      every image, two independently augmented views: view1, view2
                    float32 [b, s, s, 3] in [0, 1]; label int32 [b] (-1 unlabelled
                    or multilabel); multi_instance bool [b] (False); case_id,
                    image_id1, image_id2 string [b].
      'micle'       every case, one view each of two different images (two views
                    of the one image of a single-image case); same keys,
                    multi_instance True where the images differ.
      'supervised'  every labelled image (of the cases data.label_fraction keeps,
                    see label_fraction_cases), one view: image [b, s, s, 3]; label
                    int32 [b] or (multilabel) float32 [b, C] with label_mask
                    float32 [b, C] (0 = ignored label); case_id.
      'eval'        one pass over the images in a fixed order, centre crop:
                    image, label (, label_mask), case_id, image_id, mask float32
                    [b] (0 = padding to the last full batch; every process gets
                    the same number of batches).
    The first three are infinite, shuffled, drop the remainder and prefetch.

    Args:
      data_config: the config's data block (fields in this module's docstring).
      mode: one of MODES.
      global_batch_size: examples per step over all processes.
      seed: the run's seed; the stream is a pure function of (seed, step).
      start_step: first step to produce (resume).
      process_index, process_count: this process's share (default: JAX's).
    """
    cfg = _config(data_config)
    _hide_accelerators_from_tf()
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
    batch = global_batch_size // count
    source = sources.get_source(cfg["source"])
    info = source.info
    _check_mode(mode, info)
    share = sources.Share(index, count)
    calls = cfg["num_parallel_calls"]
    policy_name, why = _resolve_augment(cfg, source)
    logging.info("augment policy %r (%s)", policy_name, why)
    policy = augment.get_policy(policy_name, cfg["image_size"], **dict(cfg["augment_kwargs"]))
    in_memory = source.in_memory or cfg["cache_decoded"]

    kept = _kept_cases(cfg, source, seed) if mode == "supervised" else None
    table = source.table(cfg["split"], share, calls) if in_memory else None
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
    maker = pairs.ExampleMaker(
        pairs.ImageReader(table),
        policy,
        cfg["image_size"],
        info.label_type,
        cfg["uncertain_policy"],
        epochs.seed_root(seed, epochs.AUGMENT, index),
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

    first = start_step * batch
    e0, skip = divmod(first, n)
    if in_memory:
        elements = epochs.table_elements(table, units, epochs.permuted_positions(n, seed, e0, skip))
    else:
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
        "%s %s split %r: %d units/epoch in process %d of %d, batch %d, from step %d (epoch %d)",
        info.name,
        mode,
        cfg["split"],
        n,
        index,
        count,
        batch,
        start_step,
        e0,
    )
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options())


def _eval_batches(source, cfg, elements, maker, batch, share, streamed):
    """Eval examples padded (mask 0) to as many full batches as the largest process needs."""
    per_process = [
        epochs.num_units(source.counts(cfg["split"], sources.Share(q, share.count)), "eval")
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
