"""The recipes: published training values that the experiment configs start from.

- `pretrain_config`: SimCLR's official ImageNet pre-training command.
- `medical_pretrain_config`: the paper's stage 2 (SimCLR or MICLe on medical
  images), with `DEMO_PRETRAIN_RECORDS` as its default data.
- `finetune_config`: SimCLR v2's fine-tuning command.
- `runlocal_pretrain`, `runlocal_finetune`: shrink a config in place to a CPU
  smoke run.

The generic helpers they are built with (parse_arg, get_steps, the blocks'
defaults and builders) are in micle_jax/config_lib.py.

These live in the package, not in configs/common.py: configs/ is not a package
on sys.path outside the repository root, and `python -m micle_jax.main
--config=/abs/path/configs/x.py` must work from any working directory, so a
config file imports its shared values from the installed package.
"""

from __future__ import annotations

import ml_collections

from micle_jax import config_lib

DEMO_PRETRAIN_RECORDS = "data/demo/hannover_cxr"


def _simclr_lars(base_lr: float, weight_decay: float) -> ml_collections.ConfigDict:
    """SimCLR's optimizer: LARS, sqrt learning-rate scaling, cosine decay."""
    return config_lib.optim_config(
        name="lars",
        base_lr=base_lr,
        lr_scaling="sqrt",
        weight_decay=weight_decay,
        # SimCLR tf2/model.py: the supervised head keeps weight decay but
        # skips LARS's trust ratio (it would all but freeze a small head).
        trust_ratio_exclude=("^head/",),
    )


def pretrain_config(arch: str) -> ml_collections.ConfigDict:
    """Contrastive pre-training defaults: the official SimCLR ImageNet command.

    google-research/simclr tf2 README: --train_batch_size=4096 --train_epochs=100
    --learning_rate=0.075 --learning_rate_scaling=sqrt --weight_decay=1e-4
    --temperature=0.1, LARS, 10 warm-up epochs then cosine; global BN.
    """
    config = config_lib.run_config(
        "pretrain", batch_size=4096, total_epochs=100.0, warmup_epochs=10.0, checkpoint_every=5000
    )
    config.linear_probe = True  # SimCLR: lineareval_while_pretraining
    config.model = config_lib.model_config(arch)
    config.data = config_lib.data_config()
    # 0.075 * sqrt(4096) = 4.8 = 0.3 * 4096 / 256
    config.optim = _simclr_lars(base_lr=0.075, weight_decay=1e-4)
    config.loss = ml_collections.ConfigDict(dict(temperature=0.1))
    # Weights only, from another run: its backbone, plus the first
    # `init_proj_layers` projection layers; -1 = every layer the checkpoint's head
    # shares with this one (SimCLR's --checkpoint restores the whole model, head
    # included). The linear probe's `head` is never copied.
    config.init = ml_collections.ConfigDict(dict(checkpoint="", init_proj_layers=-1))
    return config


def medical_pretrain_config(arg: str | None, mode: str) -> ml_collections.ConfigDict:
    """Stage-2 config (configs/simclr_medical.py, configs/micle_medical.py).

    Args:
      arg: 'records=DIR,arch=...,init=STAGE1,augment=auto|cxr|simclr,runlocal=True'
        (records defaults to the embedded demo data). augment='auto' (default)
        is chosen from the records when the pipeline opens them
        (pipeline.Data.augment_policy): the paper's no-blur 'cxr' policy for chest
        X-rays (modality 'cxr', or gray images), SimCLR's colour policy for
        dermatology (modality 'dermatology', or colour images).
      mode: 'simclr' or 'micle' (config.data.mode).
    """
    arg = config_lib.parse_arg(
        arg, records="", arch="r50x1", init="", augment="auto", runlocal=False
    )
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
    --num_proj_layers=3 --ft_proj_selector=1. The paper (Azizi et al. 2021)
    does not publish its own fine-tuning values for dermatology and CheXpert,
    so these are the defaults and every value is exposed.

    Fields beyond pretrain_config's: `select_best` ('EVAL/METRIC' whose best
    value picks the 'best' checkpoint; '' = none), `evals` (see
    micle_jax/evaluators), `eval_batch_size`, `bootstrap_samples` (for the 95%
    intervals), `zero_init_head`, `init.init_head` (copy the init checkpoint's
    supervised head too, when its classes are the task's). `model.head_input` follows
    `init.init_proj_layers` (SimCLR's ft_proj_selector: the head reads the
    output of the last projection layer copied from the init checkpoint).
    """
    config = config_lib.run_config(
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
    # BatchNorm scale (trainers/restore.py normalize_head_input: pre-training
    # leaves that scale arbitrary and it sets the head's effective step size).
    # init_head: also copy the supervised head (a checkpoint whose classes are
    # the task's, e.g. imported fine-tuned SimCLR weights); its input is then
    # left as trained (no normalize_head_input).
    config.init = ml_collections.ConfigDict(
        dict(checkpoint="", init_proj_layers=1, normalize_head_input=True, init_head=False)
    )
    config.model = config_lib.model_config(arch, head_stop_gradient=False)
    config.model.head_input = config.init.get_ref("init_proj_layers")
    config.data = config_lib.data_config(mode="supervised", augment="supervised")
    # 0.005 * sqrt(1024) = 0.16
    config.optim = _simclr_lars(base_lr=0.005, weight_decay=0.0)
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
