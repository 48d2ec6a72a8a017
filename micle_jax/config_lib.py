"""Generic config helpers: every block's fields and defaults, and their builders.

- `MODEL_DEFAULTS`, `DATA_DEFAULTS`, `OPTIM_DEFAULTS`: every field of a
  config's `model`, `data` and `optim` block with its default. This is the
  one place the defaults live: `models.build_model`, the data pipeline and
  `optim` fill a missing field from them, and `model_config`, `data_config`
  and `optim_config` build the blocks of the experiment configs from them.
- `run_config`, `mesh_config`: the fields every trainer's config has.
- `ARCHS` / `arch_fields`: architecture names like 'r50x4' or 'r50_1x_sk0' -> model fields.
- `parse_arg`: the one-string config argument of big_vision
  (`configs/x.py:arch=r50x4,runlocal=True`), typed by the defaults.
- `get_steps`: durations given in steps or in epochs, converted in one place.

The recipes (published values every experiment config starts from) are in
micle_jax/recipes.py. This module imports nothing but ml_collections, so that
models, data, optim, the configs and the launchers can all import it without
pulling in JAX or TensorFlow.
"""

from __future__ import annotations

import re

import ml_collections

ARCHS = {
    # name: (depth, width multiplier, selective-kernel ratio)
    "r18x1": (18, 1, 0.0),
    "r18x0.25": (18, 0.25, 0.0),
    "r34x1": (34, 1, 0.0),
    "r50x1": (50, 1, 0.0),
    "r50x2": (50, 2, 0.0),
    "r50x4": (50, 4, 0.0),
    "r50x1_sk": (50, 1, 0.0625),
    "r101x1": (101, 1, 0.0),
    "r101x2": (101, 2, 0.0),
    "r152x1": (152, 1, 0.0),
    "r152x2": (152, 2, 0.0),
    "r152x3_sk": (152, 3, 0.0625),
    "r200x1": (200, 1, 0.0),
}

# The model block (fields: micle_jax/models/__init__.py). SimCLR's defaults
# (google-research/simclr tf2/run.py): R50 1x, 3-layer 128-d projection head,
# BATCH_NORM_DECAY 0.9 and epsilon 1e-5.
MODEL_DEFAULTS = dict(
    name="resnet",
    depth=50,
    width=1.0,  # float so that overrides like 0.25 type-check in a locked ConfigDict
    sk_ratio=0.0,
    # None: the CIFAR stem (conv3x3/1, no max-pool) iff the images are <= 32 px,
    # as SimCLR (tf2/model.py cifar_stem=FLAGS.image_size <= 32); the image size
    # is only known from the model's input (resnet.uses_cifar_stem).
    cifar_stem=None,
    proj_layers=3,
    proj_dim=128,
    num_classes=0,
    head_input=0,
    head_stop_gradient=True,
    fine_tune_after_block=-1,
    dtype="float32",
    bn_momentum=0.9,
    bn_epsilon=1e-5,
)

# The data block (fields: micle_jax/data/stream/pipeline.py).
DATA_DEFAULTS = dict(
    source="synthetic",
    split="train",
    mode="simclr",
    image_size=224,  # SimCLR's ImageNet resolution
    augment="simclr",
    augment_kwargs={},
    shuffle_buffer=10_000,
    cache_decoded=False,
    uncertain_policy="ignore",
    label_fraction=1.0,
    # Pre-training epochs count images in 'simclr' and 'micle' alike: the
    # same total_epochs is the same steps and views for both.
    epoch_unit="images",
    num_parallel_calls=-1,  # tf.data.AUTOTUNE
    prefetch_batches=-1,  # tf.data.AUTOTUNE; > 0: a fixed depth (the demo's 16)
)

# A field a block must set: it has no default.
REQUIRED = object()

# The optimizer block (fields: micle_jax/optim.py). SimCLR's defaults
# (tf2/run.py: momentum 0.9, LARS eeta 1e-3) and optax's for Adam.
OPTIM_DEFAULTS = dict(
    name=REQUIRED,
    base_lr=REQUIRED,
    lr_scaling=REQUIRED,
    schedule="cosine",
    momentum=0.9,
    weight_decay=REQUIRED,
    eeta=1e-3,
    trust_ratio_exclude=(),
    # None: as SimCLR's tf2/model.py build_optimizer for the chosen name:
    # 'momentum' is Keras SGD(nesterov=True), 'lars' classic momentum
    # (LARSOptimizer's use_nesterov=False); optim.uses_nesterov resolves it.
    nesterov=None,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
)


def _to_bool(key: str, text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"config argument {key}={text!r}: expected True or False")


def parse_arg(arg: str | None, lazy: bool = False, **defaults) -> ml_collections.ConfigDict:
    """Parses 'key=value,key2=value2' into a ConfigDict typed like `defaults`.

    A bare 'key' means key=True. Unknown keys are an error unless `lazy`.

    Args:
      arg: the string after ':' in `--config=file.py:ARG`, or None.
      lazy: accept keys that have no default (kept as strings).
      **defaults: every accepted key with its default value (its type is used).

    Returns:
      A ConfigDict with one entry per key.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return result
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            value = "True"
        if key not in defaults:
            if not lazy:
                raise ValueError(
                    f"unknown config argument {key!r}; accepted: {', '.join(sorted(defaults))}"
                )
            result[key] = value
            continue
        default = defaults[key]
        try:
            if isinstance(default, bool):
                result[key] = _to_bool(key, value)
            elif isinstance(default, int):
                result[key] = int(value)
            elif isinstance(default, float):
                result[key] = float(value)
            else:
                result[key] = value
        except ValueError as e:
            raise ValueError(
                f"config argument {key}={value!r}: expected {type(default).__name__}"
            ) from e
    return result


# Any depth and width by pattern: 'r50x0.25', 'r101x2_sk', and SimCLR v2's
# release names 'r50_1x_sk0' ... 'r152_3x_sk1' (SK ratio 0.0625 when sk1).
_ARCH_PATTERN = re.compile(r"r(\d+)x(\d+(?:\.\d+)?)(_sk)?")
_RELEASE_PATTERN = re.compile(r"r(\d+)_(\d+(?:\.\d+)?)x_sk([01])")
SK_RATIO = 0.0625  # SimCLR v2's selective kernels: the only ratio its code and releases use


def arch_fields(arch: str) -> dict:
    """Model config fields (depth, width, sk_ratio) for an architecture name.

    Accepts the names of `ARCHS`, any 'r<depth>x<width>[_sk]' (e.g. 'r50x0.25',
    'r101x2_sk') and SimCLR v2's release names ('r50_1x_sk0', 'r152_3x_sk1');
    the depth is checked when the model is built.
    """
    if arch in ARCHS:
        depth, width, sk_ratio = ARCHS[arch]
    elif m := _ARCH_PATTERN.fullmatch(arch):
        depth, width, sk_ratio = int(m[1]), float(m[2]), SK_RATIO if m[3] else 0.0
    elif m := _RELEASE_PATTERN.fullmatch(arch):
        depth, width, sk_ratio = int(m[1]), float(m[2]), SK_RATIO if m[3] == "1" else 0.0
    else:
        raise ValueError(
            f"unknown arch {arch!r}; known: {', '.join(ARCHS)}, or any r<depth>x<width>[_sk] "
            "(e.g. r50x0.25, r101x2_sk) or SimCLR release name (e.g. r50_1x_sk0)"
        )
    if isinstance(width, float) and width.is_integer():
        width = int(width)
    return dict(depth=depth, width=width, sk_ratio=sk_ratio)


def get_steps(
    name: str,
    config: ml_collections.ConfigDict,
    num_examples: int,
    batch_size: int,
    default: int | None = None,
) -> int:
    """Converts `config.{name}_steps` or `config.{name}_epochs` into a step count.

    Exactly one of the two may be set (non-None). Epochs are rounded to the
    nearest step, but a positive duration is never rounded down to 0 steps.

    Args:
      name: 'total', 'warmup', 'log_every', ...
      config: the config holding `{name}_steps` and/or `{name}_epochs`.
      num_examples: examples in one epoch of the training data.
      batch_size: global batch size.
      default: returned when neither is set; an error when None.
    """
    steps = config.get(f"{name}_steps")
    epochs = config.get(f"{name}_epochs")
    if steps is not None and epochs is not None:
        raise ValueError(
            f"config sets both {name}_steps={steps} and {name}_epochs={epochs}; "
            f"set one of them to None"
        )
    if steps is not None:
        if steps < 0:
            raise ValueError(f"config.{name}_steps={steps} must be >= 0")
        return int(steps)
    if epochs is not None:
        if epochs < 0:
            raise ValueError(f"config.{name}_epochs={epochs} must be >= 0")
        if num_examples <= 0:
            raise ValueError(f"cannot convert {name}_epochs: the data has no examples")
        exact = epochs * num_examples / batch_size
        return max(int(round(exact)), 1 if epochs > 0 else 0)
    if default is None:
        raise ValueError(f"config needs {name}_steps or {name}_epochs")
    return default


def _block(kind: str, defaults: dict, fields: dict) -> dict:
    """`defaults` with `fields` applied, key order kept; an unknown field is an error."""
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown {kind} config field(s) {unknown}; accepted: {', '.join(defaults)}"
        )
    return {**defaults, **fields}


def model_config(arch: str, **overrides) -> ml_collections.ConfigDict:
    """The model block of a config: `arch`'s ResNet, MODEL_DEFAULTS, then `overrides`."""
    # cifar_stem=None as a placeholder, so that --config.model.cifar_stem=True/False
    # can force either stem in a locked config.
    stem = ml_collections.config_dict.placeholder(bool)
    fields = {**arch_fields(arch), "cifar_stem": stem, **overrides}
    return ml_collections.ConfigDict(_block("model", MODEL_DEFAULTS, fields))


def data_config(**overrides) -> ml_collections.ConfigDict:
    """The data block of a config: DATA_DEFAULTS, then `overrides`."""
    return ml_collections.ConfigDict(_block("data", DATA_DEFAULTS, overrides))


def optim_config(**fields) -> ml_collections.ConfigDict:
    """The optimizer block of a config: OPTIM_DEFAULTS, then `fields`.

    `fields` must set the REQUIRED ones: name, base_lr, lr_scaling, weight_decay.
    """
    # nesterov=None as a placeholder, so that --config.optim.nesterov=True/False
    # can force either in a locked config.
    block = _block(
        "optim",
        OPTIM_DEFAULTS,
        {"nesterov": ml_collections.config_dict.placeholder(bool), **fields},
    )
    missing = [key for key, value in block.items() if value is REQUIRED]
    if missing:
        raise ValueError(f"optim config needs the field(s) {missing}")
    return ml_collections.ConfigDict(block)


def mesh_config() -> ml_collections.ConfigDict:
    """The device mesh block (micle_jax/sharding.py): every device on the data axis.

    With `model` > 1, parameters of at least `shard_min_size` elements are split
    over the model axis (sharding.param_sharding).
    """
    return ml_collections.ConfigDict(dict(data=-1, model=1, shard_min_size=2**22))


def run_config(
    trainer: str, batch_size: int, total_epochs: float, warmup_epochs: float, checkpoint_every: int
) -> ml_collections.ConfigDict:
    """The fields every trainer's config has: length, logging, checkpoints, mesh."""
    config = ml_collections.ConfigDict()
    config.trainer = trainer
    config.seed = 0
    config.batch_size = batch_size
    config.total_epochs = total_epochs
    config.total_steps = ml_collections.config_dict.placeholder(int)
    config.warmup_epochs = warmup_epochs
    config.warmup_steps = ml_collections.config_dict.placeholder(int)
    config.log_every_steps = 100
    config.checkpoint_every_steps = checkpoint_every
    config.keep_checkpoints = 5  # SimCLR: keep_checkpoint_max 5
    config.mesh = mesh_config()
    return config
