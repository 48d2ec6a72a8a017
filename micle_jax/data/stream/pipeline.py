"""The tf.data input pipeline: what the trainers iterate over.

  data = pipeline.open_data(config.data, seed=config.seed)
  ds = data.dataset("micle", global_batch_size=4096, start_step=step)

`open_data` checks the data config and resolves its source once; the handle
answers everything a run asks of its data (info, sizes, the label fraction's
cases, class counts, the augmentation policy) and builds the datasets. A
dataset gives this process's batches (global_batch_size // process_count
examples) as dicts of tensors; see `Data.dataset` for each mode's keys.
Training streams are infinite and a pure function of (seed, step): element
k = step * batch + i belongs to epoch k // epoch_size, whose order is a
permutation seeded by (seed, epoch), and its augmentation is seeded by
(seed, process, k). Resuming at `start_step` starts at that epoch and skips
only what comes before it in that epoch; earlier epochs are never replayed.
In-memory data (synthetic, arrays, cache_decoded) skips for free (the
permutation is computed, not drawn); streamed records skip by reading, before
any decoding (batches.py builds the stream).

data_config fields (configs set them under `config.data`; defaults in
config_lib.DATA_DEFAULTS):
  source            see micle_jax/data/sources/registry.py ('synthetic', 'records:PATH', ...)
  split             'train', 'validation' or 'test'
  mode              which stream a trainer wants (Data.dataset takes it as an argument)
  image_size        side of the views in pixels (SimCLR: 224)
  augment           policy name ('simclr', 'cxr', 'supervised', 'eval', 'none'), an
                    op list, or 'auto': chosen from the data (Data.augment_policy)
  augment_kwargs    the policy's arguments (with 'auto': of the policy it resolves to)
  shuffle_buffer    streamed sources: examples in the shuffle buffer
  cache_decoded     decode a streamed source once into memory (small datasets)
  uncertain_policy  multilabel: 'ignore', 'zeros' or 'ones' (CheXpert's U-policies)
  label_fraction    'supervised': keep this fraction of the training cases (fractions.py)
  epoch_unit        what a pre-training epoch counts (pairs_per_epoch): 'images' or 'cases'
  num_parallel_calls  tf.data parallelism (-1 = AUTOTUNE)
  prefetch_batches  training batches prepared ahead of the step (-1 = AUTOTUNE). AUTOTUNE
                    starts shallow and deepens when the consumer waits, so where the
                    pipeline shares the cores with the step (a CPU run) the first tens of
                    steps wait for data; a fixed depth fills while the step compiles and
                    hides that, for depth x batch bytes of host memory (the demo: 16 x
                    7 MiB; benchmarks/end_to_end.py)
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
from absl import logging

from micle_jax import config_lib
from micle_jax.data import records
from micle_jax.data.augment import policies
from micle_jax.data.sources import interface, registry
from micle_jax.data.stream import batches, epochs, fractions, tf_host

MODES = ("simclr", "micle", "supervised", "eval")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
AUTO_AUGMENT = "auto"
# The paper's policies (Azizi et al. 2021): SimCLR's colour policy for
# dermatology photographs, the no-blur 'cxr' policy for chest X-rays.
MODALITY_POLICIES = {"cxr": "cxr", "dermatology": "simclr"}


def open_data(data_config, seed: int) -> Data:
    """Checks `data_config` and opens its source, once; TensorFlow is kept on the host.

    Args:
      data_config: the config's data block (fields in this module's docstring).
      seed: the run's seed: the label fraction's cases and the training streams
        are pure functions of it.

    Raises:
      ValueError: an unknown or bad field, or a source that cannot be opened.
    """
    tf_host.keep_tf_on_host()
    cfg = _config(data_config)
    return Data(cfg, registry.get_source(cfg["source"]), seed)


class Data:
    """One run's data: a checked config, its opened source and the run's seed.

    Attributes:
      config: the data config as a plain dict, defaults filled in.
      info: the dataset's info (name, label_type, class_names, num_classes).
      seed: the run's seed.
    """

    def __init__(self, cfg: dict, source: interface.Source, seed: int):
        self.config = cfg
        self.info: records.DatasetInfo = source.info
        self.seed = seed
        self._source = source
        self._split = cfg["split"]

    def augment_policy(self) -> tuple[str | list, str]:
        """The augmentation policy training uses, and why: data.augment with 'auto' resolved.

        'auto' is resolved from the data, in this order:
          1. the dataset's recorded modality (dataset_info.json `modality`, written
             by `convert --modality`): 'cxr' -> 'cxr', 'dermatology' -> 'simclr';
          2. otherwise ('other' or not recorded) its pixels: 'cxr' when the first
             16 images of the split are all gray (one channel, or three equal ones:
             interface.is_gray), else 'simclr'.
        Any other value is returned as given. Every process resolves to the same
        policy (the whole split's first images, not a process's share).

        Returns:
          (policy name or op list, a reason for the log, e.g. "auto: images are RGB").
        """
        return self._augment

    def label_fraction_cases(self) -> list[str] | None:
        """The training cases that data.label_fraction keeps (None at 1.0: every case).

        Whole cases, stratified by class for multiclass data, a pure function of
        (split, fraction, seed): see micle_jax/data/stream/fractions.py. Only mode
        'supervised' applies it; pre-training and evaluation see every case.

        Returns:
          Sorted case ids (str), or None when label_fraction is 1.0.
        """
        return self._kept_cases

    # Once per handle, on first use: 'auto' decodes images, a label fraction reads every label.
    @functools.cached_property
    def _augment(self) -> tuple[str | list, str]:
        return _resolve_augment(self.config, self._source)

    @functools.cached_property
    def _kept_cases(self) -> list[str] | None:
        if self.config["label_fraction"] == 1.0:
            return None
        info = self.info
        case_ids, labels = self._source.image_labels(self._split)
        multiclass = info.label_type == "multiclass"
        return fractions.select_cases(
            case_ids,
            labels if multiclass else None,
            self.config["label_fraction"],
            self.seed,
            stratify=multiclass,
            class_names=info.class_names,
        )

    def class_counts(self) -> np.ndarray:
        """Labelled training images per class [C] of a multiclass split, label fraction applied.

        The cases kept by data.label_fraction (as the 'supervised' stream reads
        them); for class-balanced losses.
        """
        info = self.info
        if info.label_type != "multiclass":
            raise ValueError(
                f"class counts need multiclass labels; {info.name!r} has label_type "
                f"{info.label_type!r}"
            )
        case_ids, labels = self._source.image_labels(self._split)
        return fractions.images_per_class(
            case_ids, labels, info.num_classes, self.label_fraction_cases()
        )

    def num_examples(self, mode: str) -> int:
        """Examples in one pass of a stream over the whole split (all processes).

        Images for 'simclr' and 'eval', labelled images for 'supervised', cases
        for 'micle'. For epoch -> step conversion of 'supervised' (pre-training
        converts with `pairs_per_epoch`). With label_fraction < 1,
        'supervised' counts the images of the cases kept for the seed.
        """
        _check_mode(mode, self.info)
        kept = self.label_fraction_cases() if mode == "supervised" else None
        return epochs.num_units(self._source.counts(self._split, interface.Share()), mode, kept)

    def pairs_per_epoch(self) -> int:
        """Pairs in one pre-training epoch of the whole split, as data.epoch_unit counts them.

        'images' (default): as many pairs as the split has images, 'cases': as
        many as it has cases; the same in modes 'simclr' and 'micle', so the same
        total_epochs gives both the same steps and views (a fair comparison). The
        'micle' stream still draws one pair per case: in an 'images' epoch it
        passes over the cases about images/cases times (see epochs.py).
        """
        counts = self._source.counts(self._split, interface.Share())
        return epochs.pairs_per_epoch(counts, self.config["epoch_unit"])

    def dataset(
        self,
        mode: str,
        global_batch_size: int,
        *,
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
          mode: one of MODES.
          global_batch_size: examples per step over all processes.
          start_step: first step to produce (resume); the stream is a pure
            function of (seed, step).
          process_index, process_count: this process's share (default: JAX's).
        """
        index, count, batch = batches.process_share(
            global_batch_size, start_step, process_index, process_count
        )
        _check_mode(mode, self.info)
        policy_name, why = self.augment_policy()
        logging.info("augment policy %r (%s)", policy_name, why)
        cfg = self.config
        policy = policies.get_policy(policy_name, cfg["image_size"], **dict(cfg["augment_kwargs"]))
        return batches.build(
            self._source,
            cfg,
            mode=mode,
            policy=policy,
            kept=self.label_fraction_cases() if mode == "supervised" else None,
            seed=self.seed,
            share=interface.Share(index, count),
            batch=batch,
            start_step=start_step,
        )


def _config(data_config) -> dict:
    """data_config as a plain dict with defaults filled in; unknown or bad fields raise."""
    given = dict(data_config.items()) if hasattr(data_config, "items") else dict(data_config)
    defaults = config_lib.DATA_DEFAULTS
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown data config field(s) {unknown}; known: {', '.join(sorted(defaults))}"
        )
    cfg = {**defaults, **given}
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
    depth = cfg["prefetch_batches"]
    if not isinstance(depth, int) or isinstance(depth, bool) or not (depth == -1 or depth >= 1):
        raise ValueError(
            f"data.prefetch_batches={depth!r} must be -1 (AUTOTUNE) or a number of batches >= 1"
        )
    if not isinstance(cfg["cache_decoded"], bool):
        raise ValueError(f"data.cache_decoded={cfg['cache_decoded']!r} must be True or False")
    name = cfg["augment"]
    if isinstance(name, str) and name != AUTO_AUGMENT and name not in policies.POLICIES:
        raise ValueError(
            f"data.augment={name!r}: unknown augment policy {name!r}; use {AUTO_AUGMENT!r} "
            f"(chosen from the data), one of {', '.join(sorted(policies.POLICIES))}, or an op list"
        )
    return cfg


def _resolve_augment(cfg: dict, source: interface.Source) -> tuple[str | list, str]:
    name = cfg["augment"]
    if not isinstance(name, str) or name != AUTO_AUGMENT:
        return name, "as configured"
    info = source.info
    if info.modality in MODALITY_POLICIES:
        return MODALITY_POLICIES[info.modality], f"auto: {info.name} has modality {info.modality!r}"
    images = interface.first_images(source, cfg["split"])
    if not images:
        raise ValueError(
            f"data.augment='auto': no image of {info.name!r} split {cfg['split']!r} decodes, "
            "so the policy cannot be chosen; set data.augment"
        )
    gray = all(interface.is_gray(image) for image in images)
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
