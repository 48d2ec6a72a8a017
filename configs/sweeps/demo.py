r"""The `make demo` study: the paper's dermatology setting at toy scale on HAM10000.

    python -m launch.sweep --sweep=configs/sweeps/demo.py --root=workdirs/demo \
      --executor=local --parallel=2
    python -m micle_jax.report --root=workdirs/demo

configs/sweeps/small_scale_study.py cut to fit 10 minutes on 2 CPU cores:
HAM10000 only, one seed, SimCLR and MICLe pre-training (150 steps of 128
pairs, 48 px, from scratch), linear and k-NN evaluation of the frozen
backbones against a random-init backbone at 1%, 10% and 100% of the labels
(hyper-parameters chosen on validation), and fine-tuning from scratch, from
SimCLR and from MICLe at 10% of the labels with one learning rate, 0.1
(x batch/256: the value the study's validation chose for every arm from
its grid; one value keeps the demo in its 10 minutes). The frozen-feature
evaluations leave subgroups out (subgroups=''): with them each of those 3
runs took 2:17-2:27 instead of 1:31-1:54 on a fresh clone of e052822, and
`make demo` 11 min 32 s (114,942 report rows); the fine-tuning runs report
them. One seed gives
bootstrap intervals (test-set noise) only, not seed-to-seed intervals: the
study is where the comparison is settled (docs/results.md).

Arguments: those of small_scale_study.py, with the demo's defaults.
"""

from configs.sweeps import small_scale_study
from micle_jax import config_lib

DEMO = dict(
    datasets="ham10000",
    seeds=1,
    pretrain_steps=150,
    finetune_steps=120,
    finetune_evals=3,
    finetune_datasets="ham10000",
    fractions="0.01+0.1+1.0",
    finetune_fractions="0.1",
    lrs="0.1",
    batch=128,
    subgroups="",
)


def get_sweep(arg=None):
    a = config_lib.parse_arg(arg, **DEMO)
    return small_scale_study.get_sweep(",".join(f"{k}={v}" for k, v in a.items()))
