r"""Linear evaluation: a linear head on frozen pre-trained features (SimCLR's protocol).

SimCLR's linear evaluation (google-research/simclr README): train_mode=finetune
with fine_tune_after_block=4 (the whole backbone frozen, its BatchNorm on
running averages), the head on the backbone's features (ft_proj_selector=0),
zero-initialised; Nesterov momentum SGD (SimCLR tf2/model.py build_optimizer:
Keras SGD(momentum, nesterov=True)), lr 0.1 x batch/256, weight decay 1e-6,
batch 4096, 90 epochs, no warm-up; crop and flip only (no colour distortion).
The task, data and evaluations are those of configs/finetune_{task}.py.

  python -m micle_jax.main \
      --config=configs/linear_eval.py:task=derm,arch=r50x1,init=/runs/micle_derm_r50x1 \
      --workdir=/runs/linear_derm_micle_r50x1

CPU smoke run: --config=configs/linear_eval.py:task=derm,runlocal=True

Args: task (derm | chexpert), records, arch, init (the pre-training run;
required unless runlocal), label_fraction, runlocal.
"""

import importlib.util
import pathlib

from micle_jax import config_lib

TASKS = ("derm", "chexpert")


def _task_config(task: str, arg: str):
    """configs/finetune_{task}.py's config, loaded by path: configs/ is not a package
    on sys.path outside the repository root, and this file must load from anywhere."""
    path = pathlib.Path(__file__).with_name(f"finetune_{task}.py")
    spec = importlib.util.spec_from_file_location(f"finetune_{task}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg, task="derm", records="", arch="r50x1", init="", label_fraction=1.0, runlocal=False
    )
    if arg.task not in TASKS:
        raise ValueError(f"linear_eval: task={arg.task!r}; accepted: {', '.join(TASKS)}")
    if not arg.init and not arg.runlocal:
        raise ValueError(
            "linear_eval needs init=WORKDIR of a pre-training run: a linear head on random "
            "frozen features measures nothing"
        )
    task_arg = f"arch={arg.arch},init={arg.init},init_proj_layers=0"
    task_arg += f",label_fraction={arg.label_fraction}"
    if arg.records:
        task_arg += f",records={arg.records}"
    if arg.runlocal:
        task_arg += ",runlocal=True"
    config = _task_config(arg.task, task_arg)
    config.model.fine_tune_after_block = 4
    config.data.augment = "supervised"
    config.data.augment_kwargs = dict(color_jitter_p=0.0)  # SimCLR: crop and flip only
    config.optim.name = "momentum"
    # Said explicitly (it is also what nesterov=None resolves to for 'momentum'):
    # SimCLR's momentum optimizer is Keras SGD with nesterov=True; only its
    # LARS runs classic momentum.
    config.optim.nesterov = True
    config.optim.base_lr = 0.1
    config.optim.lr_scaling = "linear"
    config.optim.weight_decay = 1e-6
    if not arg.runlocal:
        config.batch_size = 4096
        config.total_epochs = 90.0
    return config
