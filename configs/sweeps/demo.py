r"""The `make demo` study: the whole recipe at toy scale on real chest X-rays.

    python -m launch.sweep --sweep=configs/sweeps/demo.py --root=workdirs/demo \
      --executor=local --parallel=2
    python -m micle_jax.report --root=workdirs/demo

Stages:
  pretrain  SimCLR and MICLe on the unlabelled pool data/demo/cxr_pool (every
            Hannover COVID-19 chest X-ray, 71 patients of whom 37 have several
            images, plus the PneumoniaMNIST training images with their labels
            dropped), from scratch (no ImageNet stage at this scale).
  finetune  PneumoniaMNIST (balanced subset, normal vs pneumonia) from scratch,
            from SimCLR and from MICLe, at label fractions 10% and 100%; the
            best checkpoint on its validation split, numbers on its test split
            with 95% bootstrap intervals.
A ResNet-18 of width 0.25 at 32 px, a few hundred steps: minutes on a 2-core
CPU. Far from the paper's scale (ResNet-50+ at 224 px, 100 epochs of ImageNet
and tens of thousands of in-domain images): it shows that the recipe runs end
to end on real data, not the paper's numbers.

Arguments: pretrain_steps (200), finetune_steps (150), fractions (0.1+1.0),
seeds (1).
"""

from launch.sweep_spec import Stage, product, select
from micle_jax import config_lib

ARCH = "r18x0.25"
POOL = "data/demo/cxr_pool"
LABELLED = "data/demo/pneumoniamnist"
COMMON = {"batch_size": 64, "data.image_size": 32}


def get_sweep(arg=None) -> list[Stage]:
    a = config_lib.parse_arg(
        arg, pretrain_steps=200, finetune_steps=150, fractions="0.1+1.0", seeds=1
    )
    fractions = [float(f) for f in a.fractions.split("+")]
    pretrain = Stage(
        name="pretrain",
        run_name="pretrain_{method}",
        config=select(
            "method", simclr="configs/simclr_medical.py", micle="configs/micle_medical.py"
        ),
        # The chest X-ray augmentations of the paper (no blur).
        config_arg=f"records={POOL},arch={ARCH},augment=cxr,runlocal=True",
        runs=product(method=["simclr", "micle"]),
        fixed_overrides={
            **COMMON,
            "total_steps": a.pretrain_steps,
            "log_every_steps": 50,
            "checkpoint_every_steps": a.pretrain_steps,
        },
    )
    finetune = Stage(
        name="finetune",
        run_name="finetune_{method}_f{label_fraction}_s{seed}",
        config="configs/finetune_derm.py",
        config_arg=f"records={LABELLED},arch={ARCH},runlocal=True",
        runs=product(
            method=["scratch", "simclr", "micle"],
            label_fraction=fractions,
            seed=list(range(a.seeds)),
        ),
        overrides={"seed": "seed", "label_fraction": "data.label_fraction"},
        fixed_overrides={
            **COMMON,
            "total_steps": a.finetune_steps,
            "warmup_steps": max(1, a.finetune_steps // 15),
            "log_every_steps": 50,
            "checkpoint_every_steps": a.finetune_steps,
            "evals.validation.every_steps": 50,
            # A few hundred steps: momentum SGD moves a fresh backbone where
            # LARS's trust ratio (eeta 1e-3) would barely change it.
            "optim.name": "momentum",
            "optim.base_lr": 0.4,
            "optim.lr_scaling": "linear",
        },
        depends_on=select("method", scratch=None, simclr="pretrain_simclr", micle="pretrain_micle"),
    )
    return [pretrain, finetune]
