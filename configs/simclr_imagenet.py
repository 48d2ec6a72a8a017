r"""Stage 1: SimCLR pre-training on ImageNet (the official SimCLR ImageNet command).

  python -m micle_jax.main --config=configs/simclr_imagenet.py:arch=r50x1 \
      --workdir=gs://BUCKET/simclr_r50x1

CPU smoke run (synthetic data, a few steps):

  python -m micle_jax.main --config=configs/simclr_imagenet.py:arch=r50x1,runlocal=True \
      --workdir=/tmp/simclr_smoke

arch: r50x1 | r50x4 | r152x2 (and the other names in micle_jax.config_lib.ARCHS).
"""

from micle_jax import config_lib, recipes


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, arch="r50x1", runlocal=False)
    config = recipes.pretrain_config(arg.arch)
    config.data.source = "tfds:imagenet2012"
    config.data.mode = "simclr"
    config.data.augment = "simclr"
    config.data.augment_kwargs = dict(color_jitter_strength=1.0)
    if arg.runlocal:
        recipes.runlocal_pretrain(config)
        config.data.source = "synthetic:num_cases=64,num_classes=4,image_size=48"
    return config
