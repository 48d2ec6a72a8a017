r"""Linear and k-NN evaluation of frozen features (micle_jax/trainers/feature_eval.py).

The protocols that show what pre-training learned when full fine-tuning is too
blunt to tell (small data, small models): a logistic regression on the frozen
backbone features with its L2 weight chosen on the validation split (SimCLR's
transfer protocol, Chen et al. 2020, appendix B.8, with its grid of 45 L2
values from 1e-6 to 1e5) and a weighted k-NN with k
chosen on the validation split (Wu et al. 2018), at every label fraction in
one run. init='' is the random-init control: the same protocols on an
untrained backbone (seed = config.seed).

  python -m micle_jax.main \
      --config=configs/feature_eval.py:records=data/demo/ham10000,arch=r18x0.25,init=/runs/micle \
      --workdir=/runs/features_micle --config.data.image_size=64

CPU smoke run: --config=configs/feature_eval.py:runlocal=True

Args: records (converter output with train / validation / test splits and
multiclass labels), arch, init (a pre-training workdir or checkpoint; '' =
random init), select (balanced_accuracy | accuracy | auc_mean: the
validation metric that picks each hyper-parameter), runlocal.
Chosen here (not published for this setting): label fractions 1%, 10%, 100%;
k in 5, 10, 20, 50; at most 300 L-BFGS iterations
on standardised features (evaluators/linear_probe.py) with class-balanced
weights (scikit-learn's class_weight='balanced': HAM10000 is 67% 'nv', and
balanced accuracy is what chooses and what is reported).

The test rows also report, as the fine-tuning configs' test evals do,
calibration (ECE, adaptive ECE, Brier, NLL, before and after a temperature
fitted on the validation split's scores of the chosen L2 or k) and operating
points (thresholds chosen on validation for 90% / 95% specificity and
sensitivity, then sensitivity, specificity, PPV and NPV on test):
config.clinical, micle_jax/evaluators/clinical.py, and every metric by
subgroup (subgroups='auto': every metadata column of the records that makes
groups, e.g. HAM10000's sex, age band, site and dx_type), with its gap to the
whole population. The case bootstrap draws 1,000 resamples of all of them at
once (evaluators/metric_set.py): on the demo's HAM10000 records (28 groups,
48 px, ResNet-18 0.25x) a run at one label fraction (2 evaluations) took
59.5 s against 52.5 s without subgroups on a 2-core CPU, and its results.json
was 4.3 MB against 0.14 MB. --config.clinical.subgroups= turns them off.
"""

import ml_collections

from micle_jax import config_lib

DEMO_RECORDS = "data/demo/ham10000"
# SimCLR appendix B.8: 45 logarithmically spaced values from 1e-6 to 1e5
# (quarter decades), wider than this config's earlier 1e-5..1.
L2_GRID = tuple(10.0 ** (k / 4) for k in range(-24, 21))
# The test rows' clinical metrics (micle_jax/evaluators/clinical.py): the
# fine-tuning configs' CLINICAL.
CLINICAL = dict(fit_on="validation", calibration=True, operating_points=True, subgroups="auto")


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg,
        records=DEMO_RECORDS,
        arch="r50x1",
        init="",
        select="balanced_accuracy",
        runlocal=False,
    )
    config = ml_collections.ConfigDict()
    config.trainer = "feature_eval"
    config.seed = 0
    config.model = config_lib.model_config(arg.arch)
    config.data = config_lib.data_config(
        source=f"records:{arg.records}", mode="supervised", augment="none", image_size=224
    )
    config.init = ml_collections.ConfigDict(dict(checkpoint=arg.init))
    config.splits = ml_collections.ConfigDict(
        dict(train="train", validation="validation", test="test")
    )
    config.label_fractions = (0.01, 0.1, 1.0)
    config.protocols = ("linear", "knn")
    config.select_metric = arg.select
    config.linear = ml_collections.ConfigDict(dict(l2_grid=L2_GRID, steps=300, balanced=True))
    config.knn = ml_collections.ConfigDict(dict(k_grid=(5, 10, 20, 50), temperature=0.07))
    config.clinical = ml_collections.ConfigDict(CLINICAL)
    config.eval_batch_size = 512
    config.batch_size = 512
    config.bootstrap_samples = 1000
    config.mesh = config_lib.mesh_config()
    if arg.runlocal:
        config.data.image_size = 32
        config.data.cache_decoded = True
        config.eval_batch_size = 64
        config.batch_size = 64
        config.bootstrap_samples = 100
        config.label_fractions = (0.1, 1.0)
    return config
