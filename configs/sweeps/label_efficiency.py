r"""Label efficiency: fine-tune on 10%, 20%, ..., 90% and 100% of the labels.

Azizi et al. 2021 (ICCV), "label efficiency": supervised ImageNet baseline vs
SimCLR vs MICLe pre-training, fine-tuned on growing fractions of the labelled
in-domain data; MICLe matches the baseline with 20% (R50 4x) / 30% (R152 2x)
of the dermatology labels.

    python -m launch.sweep --sweep=configs/sweeps/label_efficiency.py:task=derm,arch=r50x1 \
      --root=workdirs/label_efficiency --executor=local
    python -m micle_jax.report --root=workdirs/label_efficiency

    # CPU smoke run of the whole pipeline: tiny configs, 2 fractions, 2 seeds.
    python -m launch.sweep --sweep=configs/sweeps/label_efficiency.py:task=derm,runlocal \
      --root=workdirs/label_efficiency_local

Stages (the paper's three steps):
  imagenet  SimCLR on ImageNet (configs/simclr_imagenet.py) and the supervised
            ImageNet baseline (configs/supervised_imagenet.py).
  pretrain  in-domain SimCLR or MICLe (configs/{simclr,micle}_medical.py on the
            task's records, SimCLR's augmentations for derm and the no-blur
            'cxr' ones for chest X-rays, as the paper), initialised from the
            ImageNet SimCLR run.
  finetune  configs/finetune_{derm,chexpert}.py on a label fraction, one run per
            seed, initialised from its method's pre-training run (the supervised
            baseline from the supervised ImageNet run, backbone only:
            init_proj_layers=0; the optional 'scratch' method from nothing).
Pre-training runs once per method; seeds vary the fine-tuning only, so the
report's confidence intervals are over fine-tuning seeds.

Arguments: task=derm|chexpert, arch=r50x1|r50x4|r152x2 (the paper's three),
methods=supervised+simclr+micle (+scratch), fractions=0.1+0.2+...+1.0,
seeds=3, records (default data/derm or data/chexpert, pre-training and
fine-tuning), runlocal (the configs' demo/synthetic data: records not passed).
Run names carry task and arch, so sweeps for several tasks can share one ROOT
(the ImageNet runs are then shared too).
"""

from launch.sweep_spec import Stage, product, select
from micle_jax import config_lib

TASKS = ("derm", "chexpert")
PAPER_ARCHS = ("r50x1", "r50x4", "r152x2")
METHODS = ("supervised", "simclr", "micle")
KNOWN_METHODS = (*METHODS, "scratch")
RECORDS = {"derm": "data/derm", "chexpert": "data/chexpert"}
# Paper: SimCLR's augmentations for dermatology, no blur for chest X-rays.
PRETRAIN_AUGMENT = {"derm": "simclr", "chexpert": "cxr"}
# 10% .. 90% of the labels (paper) and all of them.
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# Config keys the fine-tuning configs must have (configs are locked: a wrong key
# is an error when the run starts, never silently ignored).
SEED_KEY = "seed"
LABEL_FRACTION_KEY = "data.label_fraction"


def parse_sweep_arg(arg: str | None) -> dict:
    """The sweep argument as {task, arch, methods, fractions, seeds, records, runlocal}."""
    a = config_lib.parse_arg(
        arg,
        task="derm",
        arch="r50x1",
        methods="",
        fractions="",
        seeds=0,
        records="",
        runlocal=False,
    )
    if a.task not in TASKS:
        raise ValueError(f"task={a.task!r}: expected one of {TASKS}")
    if a.arch not in PAPER_ARCHS:
        raise ValueError(f"arch={a.arch!r}: the paper's architectures are {PAPER_ARCHS}")
    methods = tuple(a.methods.split("+")) if a.methods else METHODS
    unknown = set(methods) - set(KNOWN_METHODS)
    if unknown:
        raise ValueError(
            f"methods={a.methods!r}: unknown {sorted(unknown)}; known: {KNOWN_METHODS}"
        )
    try:
        fractions = tuple(float(f) for f in a.fractions.split("+")) if a.fractions else None
    except ValueError:
        raise ValueError(f"fractions={a.fractions!r}: expected numbers joined by '+'") from None
    if fractions and not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions={a.fractions!r}: each must be in (0, 1]")
    if a.seeds < 0:
        raise ValueError(f"seeds={a.seeds}: must be >= 1 (0 means the default)")
    default_fractions, default_seeds = ((0.1, 1.0), 2) if a.runlocal else (FRACTIONS, 3)
    return dict(
        task=a.task,
        arch=a.arch,
        methods=methods,
        fractions=fractions or default_fractions,
        seeds=a.seeds or default_seeds,
        # runlocal: the configs' own demo / synthetic data.
        records="" if a.runlocal else (a.records or RECORDS[a.task]),
        runlocal=a.runlocal,
    )


def _arg(text: str, a: dict) -> str:
    """A config argument plus the sweep-wide records= and runlocal entries."""
    records = f",records={a['records']}" if a["records"] else ""
    return text + records + (",runlocal=True" if a["runlocal"] else "")


def pretraining_stages(a: dict) -> list[Stage]:
    """The ImageNet and in-domain pre-training stages that the methods of `a` need."""
    task, arch, methods, local = a["task"], a["arch"], a["methods"], {**a, "records": ""}
    ssl = [m for m in methods if m in ("simclr", "micle")]
    stages = []
    if ssl:
        stages.append(
            Stage(
                name="imagenet_simclr",
                run_name="imagenet_simclr_{arch}",
                config="configs/simclr_imagenet.py",
                config_arg=_arg("arch={arch}", local),
                runs=product(arch=[arch]),
            )
        )
        stages.append(
            Stage(
                name="pretrain",
                run_name="{task}_{method}_{arch}",
                config=select(
                    "method", simclr="configs/simclr_medical.py", micle="configs/micle_medical.py"
                ),
                config_arg=_arg(f"arch={{arch}},augment={PRETRAIN_AUGMENT[task]}", a),
                runs=product(task=[task], arch=[arch], method=ssl),
                # Equal compute: both methods keep the configs' total_epochs, and a
                # pre-training epoch counts images in both modes (data.epoch_unit
                # 'images'), so SimCLR and MICLe run the same steps and views.
                # Step 2 of the paper starts from step 1's ImageNet SimCLR weights.
                depends_on="imagenet_simclr_{arch}",
            )
        )
    if "supervised" in methods:
        stages.append(
            Stage(
                name="imagenet_supervised",
                run_name="imagenet_supervised_{arch}",
                config="configs/supervised_imagenet.py",
                config_arg=_arg("arch={arch}", local),
                runs=product(arch=[arch]),
            )
        )
    return stages


# The run each method's fine-tuning starts from (its workdir -> init.checkpoint).
INIT_RUN = select(
    "method",
    supervised="imagenet_supervised_{arch}",
    simclr="{task}_simclr_{arch}",
    micle="{task}_micle_{arch}",
    scratch=None,
)


def finetune_config_arg(a: dict, extra: str = "") -> select:
    """The fine-tuning config argument per method; `extra` is appended ('shifted_eval=True')."""
    base = _arg("arch={arch}" + (f",{extra}" if extra else ""), a)
    # The supervised ImageNet model has no projection head: copy the backbone only.
    return select(
        "method", supervised=base + ",init_proj_layers=0", simclr=base, micle=base, scratch=base
    )


def get_sweep(arg=None) -> list[Stage]:
    """Pre-training stages plus one fine-tuning run per method x fraction x seed."""
    a = parse_sweep_arg(arg)
    finetune = Stage(
        name="finetune",
        run_name="ft_{task}_{method}_{arch}_f{label_fraction}_s{seed}",
        config=f"configs/finetune_{a['task']}.py",
        config_arg=finetune_config_arg(a),
        runs=product(
            task=[a["task"]],
            arch=[a["arch"]],
            method=list(a["methods"]),
            label_fraction=list(a["fractions"]),
            seed=list(range(a["seeds"])),
        ),
        overrides={"seed": SEED_KEY, "label_fraction": LABEL_FRACTION_KEY},
        depends_on=INIT_RUN,
    )
    return [*pretraining_stages(a), finetune]
