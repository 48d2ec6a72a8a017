r"""Does pre-training help at small scale? SimCLR and MICLe against their controls.

    python -m launch.sweep --sweep=configs/sweeps/small_scale_study.py \
      --root=workdirs/study --executor=local --parallel=2
    python -m micle_jax.report --root=workdirs/study

The paper's stage 2 and 3 at toy scale on real multi-instance data (stage 1,
ImageNet, is out of reach offline: every backbone starts from scratch):

  pretrain  SimCLR and MICLe on the TRAINING split of each dataset, labels
            unused (HAM10000: 5,139 lesions, 1,326 with 2-6 images; Kermany:
            2,053 patients, 789 with several X-rays), one run per seed. Both
            methods get the same steps and views (epochs count images in both
            modes, README). SimCLR's small-scale recipe (its CIFAR-10 command:
            temperature 0.5, LARS with learning rate 1.0 x batch/256,
            weight decay 1e-4, and its views: colour jitter 0.5, no blur,
            the 'simclr_small' policy, for HAM10000; the no-blur 'cxr'
            policy for the X-rays) rather than the ImageNet one (0.1,
            0.075 x sqrt(batch), full colour jitter and blur), which is
            tuned for batch 4096 at 224 px.
  features  linear (logistic regression, L2 chosen on validation) and k-NN (k
            chosen on validation) on the frozen backbone of each pre-training
            run and of a random-init backbone ('random', the control), at label
            fractions 1%, 10% and 100% of the training cases.
  finetune  the whole network from scratch, from SimCLR and from MICLe, on
            HAM10000 at 10% of the labels (class-balanced loss); the learning
            rate of each arm (method x label fraction) chosen on the validation
            split from `lrs` by the report (mean over seeds), the best
            checkpoint by validation as well; test numbers take part in no
            choice.
Seeds repeat everything that is random: pre-training, the random init, the
label subset and the fine-tuning; the report's 95% intervals are over seeds.

Datasets (data/demo, see its README): HAM10000 dermatoscopy (7 diagnoses;
the paper's dermatology task's closest public stand-in; imbalanced, so
balanced accuracy chooses and is reported next to top-1) and the Kermany
pediatric chest X-rays (normal / pneumonia; AUC). A ResNet-18 of width 0.25
at 48 px (48 > 32: the ImageNet stem, SimCLR's rule).

Arguments: datasets (ham10000+kermany), seeds (5), pretrain_steps (200),
finetune_steps (100), fractions (0.01+0.1+1.0: the frozen-feature protocols'),
finetune_fractions (0.1: the fine-tuning stage's; '0.01+0.1+1.0' triples
that stage), lrs (base learning rates of the fine-tuning grid, x batch/256:
0.1+0.4), finetune_datasets (ham10000: the paper's dermatology setting;
'ham10000+kermany' adds 18 runs, about 15 minutes), finetune_evals (3: how
many validation evaluations each fine-tuning makes, which the best
checkpoint is chosen from), batch (128 pre-training pairs), subgroups ('auto':
the frozen-feature evaluations' config.clinical.subgroups; '' turns them off).
"""

from launch.sweep_spec import Stage, product, select
from micle_jax import config_lib

ARCH = "r18x0.25"
IMAGE_SIZE = 48
FINETUNE_BATCH = 64
DATASETS = {
    # name: (records, augmentation policy, validation metric that chooses)
    "ham10000": ("data/demo/ham10000", "simclr_small", "balanced_accuracy"),
    "kermany": ("data/demo/kermany_cxr", "cxr", "auc_mean"),
}
# SimCLR's CIFAR-10 command (tf2/README): the small-batch recipe.
SMALL_SCALE_PRETRAIN = {
    "loss.temperature": 0.5,
    "optim.base_lr": 1.0,
    "optim.lr_scaling": "linear",
    "optim.weight_decay": 1e-4,
}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split("+") if v]


def get_sweep(arg=None) -> list[Stage]:
    a = config_lib.parse_arg(
        arg,
        datasets="ham10000+kermany",
        seeds=5,
        pretrain_steps=200,
        finetune_steps=100,
        fractions="0.01+0.1+1.0",
        finetune_fractions="0.1",
        finetune_datasets="ham10000",
        finetune_evals=3,
        lrs="0.1+0.4",
        batch=128,
        subgroups="auto",
    )
    datasets = [d for d in a.datasets.split("+") if d]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown or not datasets:
        raise ValueError(f"datasets={a.datasets!r}: accepted: {'+'.join(DATASETS)}")
    seeds = list(range(a.seeds))
    records = {d: DATASETS[d][0] for d in datasets}
    # A fixed look-ahead of 16 training batches (7 MiB each at 48 px, 128 pairs), filled
    # while the step compiles: tf.data's AUTOTUNE starts shallow, and on a CPU, where
    # the pipeline shares the cores with the step, the first ~30 steps waited for data
    # 10-25% of the time (benchmarks/end_to_end.py; docs/performance.md).
    common = {"data.image_size": IMAGE_SIZE, "data.prefetch_batches": 16}

    pretrain = Stage(
        name="pretrain",
        run_name="pretrain_{dataset}_{method}_s{seed}",
        config=select(
            "method", simclr="configs/simclr_medical.py", micle="configs/micle_medical.py"
        ),
        config_arg=lambda p: (
            f"records={DATASETS[p['dataset']][0]},arch={ARCH},"
            f"augment={DATASETS[p['dataset']][1]},runlocal=True"
        ),
        runs=product(dataset=datasets, method=["simclr", "micle"], seed=seeds),
        overrides={"seed": "seed"},
        fixed_overrides={
            **common,
            **SMALL_SCALE_PRETRAIN,
            "batch_size": a.batch,
            "total_steps": a.pretrain_steps,
            "warmup_steps": max(1, a.pretrain_steps // 10),  # SimCLR: 10 of 100 epochs
            "log_every_steps": max(1, a.pretrain_steps // 4),
            "checkpoint_every_steps": a.pretrain_steps,
            "linear_probe": False,
        },
    )
    features = Stage(
        name="features",
        run_name="features_{dataset}_{method}_s{seed}",
        config="configs/feature_eval.py",
        config_arg=lambda p: (
            f"records={records[p['dataset']]},arch={ARCH},select={DATASETS[p['dataset']][2]}"
        ),
        runs=product(dataset=datasets, method=["random", "simclr", "micle"], seed=seeds),
        overrides={"seed": "seed"},
        fixed_overrides={
            **common,
            "label_fractions": tuple(_floats(a.fractions)),
            "data.cache_decoded": True,
            "clinical.subgroups": a.subgroups,
        },
        depends_on=lambda p: (
            None if p["method"] == "random" else "pretrain_{dataset}_{method}_s{seed}".format(**p)
        ),
    )
    finetune = [
        Stage(
            name=f"finetune_{dataset}",
            run_name="finetune_{dataset}_{method}_f{label_fraction}_lr{lr}_s{seed}",
            config="configs/finetune_derm.py",
            config_arg=f"records={records[dataset]},arch={ARCH},runlocal=True",
            runs=product(
                dataset=[dataset],
                method=["scratch", "simclr", "micle"],
                label_fraction=_floats(a.finetune_fractions or a.fractions),
                lr=_floats(a.lrs),
                seed=seeds,
            ),
            overrides={
                "seed": "seed",
                "label_fraction": "data.label_fraction",
                "lr": "optim.base_lr",
            },
            fixed_overrides={
                **common,
                "batch_size": FINETUNE_BATCH,
                "total_steps": a.finetune_steps,
                "warmup_steps": max(1, a.finetune_steps // 15),
                "log_every_steps": 10,
                "checkpoint_every_steps": a.finetune_steps,
                "evals.validation.every_steps": max(1, a.finetune_steps // a.finetune_evals),
                "select_best": f"validation/{DATASETS[dataset][2]}",
                # Both datasets are imbalanced (HAM10000 67% 'nv', Kermany 74%
                # pneumonia): an unweighted loss at 10% of the labels and a few
                # hundred steps predicts the majority class (balanced accuracy 1/7).
                "class_weight": "balanced",
                # A few hundred steps: Nesterov momentum SGD (SimCLR's 'momentum'
                # optimizer) moves a backbone where LARS's trust ratio (eeta
                # 1e-3) would barely change it; the rate is chosen per arm.
                "optim.name": "momentum",
                "optim.lr_scaling": "linear",
            },
            depends_on=lambda p: (
                None
                if p["method"] == "scratch"
                else "pretrain_{dataset}_{method}_s{seed}".format(**p)
            ),
            tuned=("lr",),
            select=f"validation/{DATASETS[dataset][2]}",
        )
        for dataset in datasets
        if dataset in a.finetune_datasets.split("+")
    ]
    return [pretrain, features, *finetune]
