r"""Step 3, dermatology: fine-tune on labelled skin-condition cases (27 classes, top-1).

Azizi et al. 2021: 26 skin conditions + 'Other' (27 classes), several photos per
case, top-1 accuracy; a shifted test set from another clinical source. The
model starts from a pre-training run (init=WORKDIR of configs/micle_medical.py
or simclr_medical.py; the head reads projection layer 1, SimCLR's
ft_proj_selector=1), from the supervised ImageNet baseline
(init=WORKDIR of configs/supervised_imagenet.py,init_proj_layers=0) or from
scratch (init='').

  python -m micle_jax.main \
      --config=configs/finetune_derm.py:arch=r50x1,init=/runs/micle_derm_r50x1,label_fraction=0.2 \
      --workdir=/runs/ft_derm_micle_r50x1_f0.2

CPU smoke run on the embedded demo data (PneumoniaMNIST stands in for the
private dermatology data: 2 classes, one image per case):

  python -m micle_jax.main --config=configs/finetune_derm.py:runlocal=True --workdir=/tmp/ft

Args: records (folder of `python -m micle_jax.data.convert` with train /
validation / test splits), arch, init, init_proj_layers (1 = SimCLR v2; 0 for a
supervised init), label_fraction (of the training cases), shifted_eval (also
evaluate `shift_records`' test split, e.g. the second clinical source),
shift_records, runlocal.

Published (paper): the task, top-1 accuracy, label fractions 10%..90%, the
shifted test set. Not published, SimCLR v2's fine-tuning values used (see
recipes.finetune_config): LARS, lr 0.005 x sqrt(batch), batch 1024, 60
epochs, no warm-up, no weight decay. Chosen here: 224 px, validation every
500 steps selecting the best checkpoint by validation accuracy, the
'supervised' augmentation (crop, flip, light colour jitter). The test evals
also report calibration (ECE, Brier, before/after a temperature fitted on the
validation eval), operating points (thresholds for 90% / 95% specificity and
sensitivity chosen on validation) and every metric by metadata subgroup
(sex, age band, site, ... as the records have them): micle_jax/evaluators/clinical.py.
"""

from micle_jax import config_lib, recipes

RECORDS = "data/derm"
DEMO_RECORDS = "data/demo/pneumoniamnist"
# The final test evals' clinical metrics (micle_jax/evaluators/clinical.py).
CLINICAL = dict(fit_on="validation", calibration=True, operating_points=True, subgroups="auto")


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg,
        records=RECORDS,
        arch="r50x1",
        init="",
        init_proj_layers=1,
        label_fraction=1.0,
        shifted_eval=False,
        shift_records="data/derm_shift",
        runlocal=False,
    )
    config = recipes.finetune_config(arg.arch)
    records = DEMO_RECORDS if arg.runlocal and arg.records == RECORDS else arg.records
    config.data.source = f"records:{records}"
    config.data.image_size = 224
    config.data.augment = "supervised"
    config.data.label_fraction = arg.label_fraction
    config.init.checkpoint = arg.init
    config.init.init_proj_layers = arg.init_proj_layers
    config.select_best = "validation/accuracy"
    config.evals.validation = dict(
        type="classification", data=dict(split="validation"), every_steps=500
    )
    config.evals.test = dict(type="classification", data=dict(split="test"), **CLINICAL)
    if arg.shifted_eval:
        shift = records if arg.runlocal else arg.shift_records
        config.evals.shift_test = dict(
            type="classification", data=dict(source=f"records:{shift}", split="test"), **CLINICAL
        )
    if arg.runlocal:
        recipes.runlocal_finetune(config)
    return config
