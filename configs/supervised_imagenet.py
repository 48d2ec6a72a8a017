r"""The supervised ImageNet baseline: a ResNet trained on ImageNet labels (TFDS).

The paper's baseline starts fine-tuning from supervised ImageNet weights. This
config trains them with the same trainer as fine-tuning (from scratch, all
1000 classes), so "supervised ImageNet -> fine-tune" and "SimCLR/MICLe ->
fine-tune" run through the same code. Fine-tuning from it copies the backbone
only: pass init_proj_layers=0 to the fine-tuning config (this model has no
projection head, so copying projection layers is an error, not a silent
random init).

  python -m micle_jax.main --config=configs/supervised_imagenet.py:arch=r50x1 \
      --workdir=gs://B/supervised_r50x1
  python -m micle_jax.main \
      --config=configs/finetune_derm.py:arch=r50x1,init=gs://B/supervised_r50x1,init_proj_layers=0 \
      --workdir=gs://B/ft_derm_supervised_r50x1

CPU smoke run (synthetic data): --config=configs/supervised_imagenet.py:runlocal=True

Not published (the paper uses standard supervised checkpoints): the values
here are the usual large-batch ImageNet recipe (Goyal et al. 2017):
momentum SGD 0.9, lr 0.1 x batch/256, batch 4096, 90 epochs, 5 warm-up
epochs, then cosine decay; weight decay 1e-4 (kernels only); 'supervised'
augmentation (crop, flip, light colour jitter). Evaluated on ImageNet's
validation split (it has no labelled test split).
"""

from micle_jax import config_lib, recipes


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, arch="r50x1", runlocal=False)
    config = recipes.finetune_config(arg.arch)
    config.batch_size = 4096
    config.total_epochs = 90.0
    config.warmup_epochs = 5.0
    config.checkpoint_every_steps = 5000
    config.zero_init_head = False
    config.init.init_proj_layers = 0
    config.model.proj_layers = 0  # no projection head: nothing to copy by mistake
    config.data.source = "tfds:imagenet2012"
    config.data.image_size = 224
    config.data.augment = "supervised"
    config.optim.name = "momentum"
    config.optim.base_lr = 0.1
    config.optim.lr_scaling = "linear"
    config.optim.weight_decay = 1e-4
    config.evals.validation = dict(
        type="classification", data=dict(split="validation"), bootstrap_samples=200
    )
    if arg.runlocal:
        config.data.source = "synthetic:num_cases=64,num_classes=4,image_size=48"
        recipes.runlocal_finetune(config)
    return config
