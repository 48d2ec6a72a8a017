"""Config helpers shared by every config file and trainer.

- `parse_arg`: the one-string config argument of big_vision
  (`configs/x.py:arch=r50x4,runlocal=True`), typed by the defaults.
- `get_steps`: durations given in steps or in epochs, converted in one place.
- `check_config`: values that a locked ConfigDict cannot check by itself.
"""

from __future__ import annotations

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


def arch_fields(arch: str) -> dict:
    """Model config fields (depth, width, sk_ratio) for an architecture name like 'r50x4'."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    depth, width, sk_ratio = ARCHS[arch]
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


def model_config(arch: str, **overrides) -> ml_collections.ConfigDict:
    """The model block of a config: SimCLR v2 ResNet + 3-layer 128-d projection head."""
    fields = dict(
        name="resnet",
        **arch_fields(arch),
        # None: SimCLR's CIFAR stem (conv3x3/1, no max-pool) iff the images are
        # <= 32 px (tf2/model.py cifar_stem=FLAGS.image_size <= 32), decided
        # from the model's input; a placeholder so --config.model.cifar_stem=
        # True/False can force either stem.
        cifar_stem=ml_collections.config_dict.placeholder(bool),
        proj_layers=3,
        proj_dim=128,
        num_classes=0,
        head_input=0,
        head_stop_gradient=True,
        fine_tune_after_block=-1,
        dtype="float32",
        bn_momentum=0.9,  # SimCLR: BATCH_NORM_DECAY 0.9, epsilon 1e-5
        bn_epsilon=1e-5,
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def data_config(**overrides) -> ml_collections.ConfigDict:
    """The data block of a config (see micle_jax/data/pipeline.py for each field)."""
    fields = dict(
        source="synthetic",
        split="train",
        mode="simclr",
        image_size=224,
        augment="simclr",
        augment_kwargs=ml_collections.ConfigDict(),
        shuffle_buffer=10_000,
        cache_decoded=False,
        uncertain_policy="ignore",
        label_fraction=1.0,
        # Pre-training epochs count images in 'simclr' and 'micle' alike: the
        # same total_epochs is the same steps and views for both.
        epoch_unit="images",
        num_parallel_calls=-1,  # tf.data.AUTOTUNE
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def _run_config(
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
    config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, shard_min_size=2**22))
    return config


def optim_config(base_lr: float, weight_decay: float) -> ml_collections.ConfigDict:
    """The optimizer block (micle_jax/optim.py): SimCLR's LARS, sqrt lr scaling, cosine."""
    fields = dict(
        name="lars",
        base_lr=base_lr,
        lr_scaling="sqrt",
        schedule="cosine",
        momentum=0.9,
        weight_decay=weight_decay,
        eeta=1e-3,
        # SimCLR tf2/model.py: the supervised head keeps weight decay but
        # skips LARS's trust ratio (it would all but freeze a small head).
        trust_ratio_exclude=("^head/",),
        # None: as SimCLR's tf2/model.py build_optimizer for the chosen name:
        # 'momentum' is Keras SGD(nesterov=True), 'lars' classic momentum
        # (LARSOptimizer's use_nesterov=False); optim.uses_nesterov resolves it.
        # A placeholder so --config.optim.nesterov=True/False can force either.
        nesterov=ml_collections.config_dict.placeholder(bool),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
    )
    return ml_collections.ConfigDict(fields)


def pretrain_config(arch: str) -> ml_collections.ConfigDict:
    """Contrastive pre-training defaults: the official SimCLR ImageNet command.

    google-research/simclr tf2 README: --train_batch_size=4096 --train_epochs=100
    --learning_rate=0.075 --learning_rate_scaling=sqrt --weight_decay=1e-4
    --temperature=0.1, LARS, 10 warm-up epochs then cosine; global BN.
    """
    config = _run_config(
        "pretrain", batch_size=4096, total_epochs=100.0, warmup_epochs=10.0, checkpoint_every=5000
    )
    config.linear_probe = True  # SimCLR: lineareval_while_pretraining
    config.model = model_config(arch)
    config.data = data_config()
    # 0.075 * sqrt(4096) = 4.8 = 0.3 * 4096 / 256
    config.optim = optim_config(base_lr=0.075, weight_decay=1e-4)
    config.loss = ml_collections.ConfigDict(dict(temperature=0.1))
    # Weights only, from another run: its backbone, plus the first
    # `init_proj_layers` projection layers; -1 = every layer the checkpoint's head
    # shares with this one (SimCLR's --checkpoint restores the whole model, head
    # included). The linear probe's `head` is never copied.
    config.init = ml_collections.ConfigDict(dict(checkpoint="", init_proj_layers=-1))
    return config


DEMO_PRETRAIN_RECORDS = "data/demo/hannover_cxr"


def medical_pretrain_config(arg: str | None, mode: str) -> ml_collections.ConfigDict:
    """Stage-2 config (configs/simclr_medical.py, configs/micle_medical.py).

    Args:
      arg: 'records=DIR,arch=...,init=STAGE1,augment=auto|cxr|simclr,runlocal=True'
        (records defaults to the embedded demo data). augment='auto' (default)
        is chosen from the records when the pipeline opens them
        (pipeline.resolve_augment): the paper's no-blur 'cxr' policy for chest
        X-rays (modality 'cxr', or gray images), SimCLR's colour policy for
        dermatology (modality 'dermatology', or colour images).
      mode: 'simclr' or 'micle' (config.data.mode).
    """
    arg = parse_arg(arg, records="", arch="r50x1", init="", augment="auto", runlocal=False)
    config = pretrain_config(arg.arch)
    config.data.source = f"records:{arg.records or DEMO_PRETRAIN_RECORDS}"
    config.data.mode = mode
    config.data.augment = arg.augment
    config.init.checkpoint = arg.init
    if arg.runlocal:
        runlocal_pretrain(config)
        config.data.cache_decoded = True
    return config


def _shrink(config: ml_collections.ConfigDict, warmup_steps: int) -> None:
    """6 steps of 16 examples at 32 px, logged every 2 and checkpointed every 3."""
    config.batch_size = 16
    config.total_epochs = None
    config.total_steps = 6
    config.warmup_epochs = None
    config.warmup_steps = warmup_steps
    config.log_every_steps = 2
    config.checkpoint_every_steps = 3
    config.data.image_size = 32
    config.data.shuffle_buffer = 64


def runlocal_pretrain(config: ml_collections.ConfigDict) -> None:
    """Shrinks a pre-training config in place to a CPU smoke run (seconds, not days)."""
    _shrink(config, warmup_steps=2)


def finetune_config(arch: str) -> ml_collections.ConfigDict:
    """Supervised fine-tuning defaults: SimCLR v2's fine-tuning command.

    google-research/simclr README (fine-tune the whole network on 1% of
    ImageNet): --train_mode=finetune --fine_tune_after_block=-1
    --zero_init_logits_layer=True --global_bn=True --optimizer=lars
    --learning_rate=0.005 --learning_rate_scaling=sqrt --weight_decay=0
    --train_epochs=60 --train_batch_size=1024 --warmup_epochs=0
    --num_proj_layers=3 --ft_proj_selector=1. The paper does not publish its
    own fine-tuning grid for dermatology and CheXpert (RECIPE.md: unknown), so
    these are the defaults and every value is exposed.

    Fields beyond pretrain_config's: `select_best` ('EVAL/METRIC' whose best
    value picks the 'best' checkpoint; '' = none), `evals` (see
    micle_jax/evaluators), `eval_batch_size`, `bootstrap_samples` (for the 95%
    intervals), `zero_init_head`. `model.head_input` follows
    `init.init_proj_layers` (SimCLR's ft_proj_selector: the head reads the
    output of the last projection layer copied from the init checkpoint).
    """
    config = _run_config(
        "finetune", batch_size=1024, total_epochs=60.0, warmup_epochs=0.0, checkpoint_every=1000
    )
    config.eval_batch_size = 1024
    config.zero_init_head = True  # SimCLR: zero_init_logits_layer
    # '' = SimCLR's unweighted loss; 'balanced' weights each class by
    # n / (classes * n_class) (multiclass; e.g. HAM10000, 67% 'nv').
    config.class_weight = ""
    config.select_best = ""
    config.bootstrap_samples = 1000
    # normalize_head_input: the projection layer the head reads starts at unit
    # BatchNorm scale (trainers/finetune.py normalize_head_input: pre-training
    # leaves that scale arbitrary and it sets the head's effective step size).
    config.init = ml_collections.ConfigDict(
        dict(checkpoint="", init_proj_layers=1, normalize_head_input=True)
    )
    config.model = model_config(arch, head_stop_gradient=False)
    config.model.head_input = config.init.get_ref("init_proj_layers")
    config.data = data_config(mode="supervised", augment="supervised")
    # 0.005 * sqrt(1024) = 0.16
    config.optim = optim_config(base_lr=0.005, weight_decay=0.0)
    config.evals = ml_collections.ConfigDict()
    return config


def runlocal_finetune(config: ml_collections.ConfigDict) -> None:
    """Shrinks a fine-tuning config in place to a CPU smoke run (seconds, not hours)."""
    _shrink(config, warmup_steps=1)
    config.eval_batch_size = 64
    config.bootstrap_samples = 100
    config.data.cache_decoded = True
    for entry in config.evals.values():
        if entry.get("every_steps"):
            entry.every_steps = 3
