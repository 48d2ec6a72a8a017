r"""Stage 2 with SimCLR: more contrastive pre-training on unlabeled medical images.

Every image gives two augmented views. Starts from a stage-1 checkpoint
(init=WORKDIR of configs/simclr_imagenet.py) or from scratch (init='').

  python -m micle_jax.main \
      --config=configs/simclr_medical.py:records=/data/cxr,arch=r50x1,init=/runs/simclr_r50x1 \
      --workdir=/runs/simclr_cxr_r50x1

CPU smoke run on the embedded demo data (real chest X-rays, 64 px):

  python -m micle_jax.main --config=configs/simclr_medical.py:runlocal=True --workdir=/tmp/s2

Args: records (a folder written by `python -m micle_jax.data.convert`), arch,
init (stage-1 workdir or checkpoint; '' = scratch), augment (auto | cxr |
simclr; the paper uses SimCLR's for dermatology and no-blur 'cxr' for chest
X-rays; 'auto', the default, picks one from the records' dataset_info.json
modality, else 'cxr' for gray images and 'simclr' for colour ones, and logs
which), runlocal.
Unknown (not published for stage 2): batch size, learning rate and steps; the
SimCLR ImageNet values are used and exposed.
"""

from micle_jax import recipes


def get_config(arg=None):
    return recipes.medical_pretrain_config(arg, mode="simclr")
