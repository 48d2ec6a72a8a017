r"""Distribution shift: in-domain vs shifted test performance of each method.

Azizi et al. 2021 (ICCV): models fine-tuned on in-domain labels are evaluated
on their own test set and, without further fine-tuning, on a shifted one:
dermatology on a second clinical source with more malignant cases, CheXpert
models on NIH ChestX-ray14. Self-supervised pre-training (MICLe most) keeps
more of its accuracy under the shift than the supervised ImageNet baseline.

    python -m launch.sweep --sweep=configs/sweeps/distribution_shift.py:task=chexpert \
      --root=workdirs/distribution_shift --executor=local
    python -m micle_jax.report --root=workdirs/distribution_shift

Stages: the same pre-training stages as configs/sweeps/label_efficiency.py
(imagenet_simclr, pretrain, imagenet_supervised) and one fine-tuning run per
method x seed (x fraction; all labels by default) whose config argument adds
SHIFTED_EVAL_ARG: the fine-tuning config then also evaluates the shifted test
set, writing those results under that dataset's name in results.json. The
report draws in-domain vs shifted bars per method from them.

Arguments: as label_efficiency (task, arch, methods, seeds, records, runlocal)
with fractions defaulting to 1.0; the shifted records are the fine-tuning
configs' `shift_records` default (data/derm_shift, data/chestxray14).
"""

from configs.sweeps import label_efficiency
from launch.sweep_spec import Stage, product

# The fine-tuning configs' argument that adds the shifted test set's evaluator.
SHIFTED_EVAL_ARG = "shifted_eval=True"


def get_sweep(arg=None) -> list[Stage]:
    """Pre-training stages plus fine-tuning runs that evaluate both test sets."""
    a = label_efficiency.parse_sweep_arg(arg)
    if not any(item.strip().startswith("fractions") for item in (arg or "").split(",")):
        a["fractions"] = (1.0,)
    finetune = Stage(
        name="finetune_shift",
        run_name="shift_{task}_{method}_{arch}_f{label_fraction}_s{seed}",
        config=f"configs/finetune_{a['task']}.py",
        config_arg=label_efficiency.finetune_config_arg(a, SHIFTED_EVAL_ARG),
        runs=product(
            task=[a["task"]],
            arch=[a["arch"]],
            method=list(a["methods"]),
            label_fraction=list(a["fractions"]),
            seed=list(range(a["seeds"])),
        ),
        overrides={
            "seed": label_efficiency.SEED_KEY,
            "label_fraction": label_efficiency.LABEL_FRACTION_KEY,
        },
        depends_on=label_efficiency.INIT_RUN,
    )
    return [*label_efficiency.pretraining_stages(a), finetune]
