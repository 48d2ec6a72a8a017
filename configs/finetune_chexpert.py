r"""Step 3, chest X-rays: fine-tune on CheXpert's five findings (multilabel, mean AUC).

Azizi et al. 2021: CheXpert, atelectasis, cardiomegaly, consolidation, edema
and pleural effusion, mean ROC AUC; under distribution shift the CheXpert
model is evaluated on NIH ChestX-ray14 without further fine-tuning (its
labels mapped onto the five: NIH_TO_CHEXPERT). Starts from a pre-training run
(init=WORKDIR; the head reads projection layer 1, SimCLR's ft_proj_selector=1),
from the supervised ImageNet baseline (init=...,init_proj_layers=0) or from
scratch.

  python -m micle_jax.main \
      --config=configs/finetune_chexpert.py:arch=r50x1,init=/runs/micle_cxr,shifted_eval=True \
      --workdir=/runs/ft_cxr_micle_r50x1

CPU smoke run (synthetic multilabel images; no CheXpert data needed):

  python -m micle_jax.main --config=configs/finetune_chexpert.py:runlocal=True --workdir=/tmp/ft

Args: records (CheXpert converted by `python -m micle_jax.data.convert`, class
names CHEXPERT_CLASSES, splits train / validation / test), arch, init,
init_proj_layers, label_fraction, uncertain (training policy for CheXpert's
uncertain labels: ignore | zeros | ones; evaluation always ignores them),
shifted_eval, shift_records (ChestX-ray14 records), runlocal.

Published: the five findings, mean AUC, the NIH shift. Not published:
the uncertain-label policy ('ignore' chosen: U-Ignore of Irvin et al. 2019)
and the fine-tuning values (SimCLR v2's: LARS, lr 0.005 x sqrt(batch), batch
1024, 60 epochs, no warm-up or weight decay; recipes.finetune_config).
Chosen: 224 px, the 'cxr' augmentation without blur (as the paper's
pre-training), validation mean AUC every 500 steps selects the best checkpoint.
The test evals also report per-finding calibration (before/after a temperature
fitted on the validation eval), operating points (thresholds for 90% / 95%
specificity and sensitivity chosen on validation) and every metric by metadata
subgroup (sex, age band, view, ...): micle_jax/evaluators/clinical.py.
"""

from micle_jax import config_lib, recipes

RECORDS = "data/chexpert"
CHEXPERT_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# NIH ChestX-ray14's findings onto CheXpert's five ('' = not evaluated).
NIH_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Emphysema": "",
    "Fibrosis": "",
    "Hernia": "",
    "Infiltration": "",
    "Mass": "",
    "Nodule": "",
    "Pleural_Thickening": "",
    "Pneumonia": "",
    "Pneumothorax": "",
}
# The final test evals' clinical metrics (micle_jax/evaluators/clinical.py).
CLINICAL = dict(fit_on="validation", calibration=True, operating_points=True, subgroups="auto")
# runlocal: synthetic cases with 5 multilabel findings (some uncertain).
SYNTHETIC = (
    "synthetic:num_cases=96,num_classes=5,image_size=32,max_images_per_case=2,multilabel=True"
)


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg,
        records=RECORDS,
        arch="r50x1",
        init="",
        init_proj_layers=1,
        label_fraction=1.0,
        uncertain="ignore",
        shifted_eval=False,
        shift_records="data/chestxray14",
        runlocal=False,
    )
    config = recipes.finetune_config(arg.arch)
    source, shift_source = f"records:{arg.records}", f"records:{arg.shift_records}"
    label_map = dict(NIH_TO_CHEXPERT)
    if arg.runlocal and arg.records == RECORDS:
        # The synthetic test split stands in for the shifted set.
        source = shift_source = SYNTHETIC
        label_map = {f"class_{i}": f"class_{i}" for i in range(len(CHEXPERT_CLASSES))}
    config.data.source = source
    config.data.image_size = 224
    config.data.augment = "cxr"
    config.data.uncertain_policy = arg.uncertain
    config.data.label_fraction = arg.label_fraction
    config.init.checkpoint = arg.init
    config.init.init_proj_layers = arg.init_proj_layers
    config.select_best = "validation/auc_mean"
    config.evals.validation = dict(
        type="multilabel", data=dict(split="validation"), every_steps=500
    )
    config.evals.test = dict(type="multilabel", data=dict(split="test"), **CLINICAL)
    if arg.shifted_eval:
        config.evals.shift_nih = dict(
            type="multilabel",
            data=dict(source=shift_source, split="test"),
            label_map=label_map,
            **CLINICAL,
        )
    if arg.runlocal:
        recipes.runlocal_finetune(config)
    return config
