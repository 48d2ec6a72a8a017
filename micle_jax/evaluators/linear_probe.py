"""Linear probe on frozen features (monitoring pre-training).

SimCLR measures representations by a linear classifier on frozen features.
This evaluator fits one (features of the train split, eval crop, no
augmentation) by L-BFGS on the L2-regularised softmax (multiclass) or
sigmoid (multilabel) loss of standardised features, then evaluates it on
`data`. Much cheaper than SimCLR's 90-epoch linear evaluation
(configs/linear_eval.py) and meant for curves during pre-training, not for
reported numbers. The regularisation (1e-4) and at most 300 L-BFGS iterations are
chosen, not published.

  config.evals.probe = dict(type='linear_probe', every_steps=1000,
      data=dict(source='records:data/demo/pneumoniamnist', split='test'))

Its outputs are scored as a classification or multilabel eval's logits,
with the same optional clinical fields (clinical.py): fit_on (another
'linear_probe' eval, e.g. of the validation split), calibration,
operating_points and subgroups.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from micle_jax import losses, task
from micle_jax.evaluators import classification, clinical, multilabel
from micle_jax.evaluators.base import EvaluatorFields
from micle_jax.evaluators.eval_data import Context
from micle_jax.evaluators.outputs import EvalOutput, Predictions

EXTRA_FIELDS = ("train_data", "l2", "steps", "bootstrap_samples", *clinical.EXTRA_FIELDS)
# Gradient norm at which L-BFGS stops (float32: smaller is noise).
GTOL = 1e-5


@functools.partial(jax.jit, static_argnames=("multilabel", "steps"))
def _fit(x, y, mask, l2, params, multilabel: bool, steps: int):
    def loss_fn(p):
        logits = x @ p["w"] + p["b"]
        if multilabel:
            data = losses.sigmoid_cross_entropy(logits, y, mask)
        else:
            data = losses.softmax_cross_entropy(logits, jnp.argmax(y, 1), mask[:, 0])
        return data + l2 * jnp.sum(p["w"] ** 2)

    # L-BFGS, as SimCLR's transfer protocol (appendix B.8): the objective is
    # convex and L-BFGS reaches its optimum (scikit-learn's, tested), where
    # 300 Adam steps, this probe's former solver, stopped up to 0.15 (in
    # probability) away from it on ill-conditioned features.
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    def step(carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn)
        return optax.apply_updates(p, updates), state

    def unconverged(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        return (count == 0) | ((count < steps) & (optax.tree_utils.tree_l2_norm(grad) > GTOL))

    params, _ = jax.lax.while_loop(unconverged, step, (params, opt.init(params)))
    return params


def fit_linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    num_classes: int,
    train_mask: np.ndarray | None = None,
    l2: float = 1e-4,
    steps: int = 300,
    balanced: bool = False,
) -> np.ndarray:
    """Fits a linear classifier on standardised train features; scores the test features.

    Args:
      train_features: [m, d]; test_features: [n, d].
      train_labels: [m] ints (multiclass, -1 = unlabelled) or [m, C] in {0, 1}
        (multilabel).
      num_classes: C.
      train_mask: [m, C] multilabel label mask (0 = unknown); None for multiclass.
      l2: weight of the squared-norm penalty on the weights.
      steps: at most this many L-BFGS iterations (fewer once the gradient norm
        is below GTOL).
      balanced: multiclass only: weight each image by n / (C' * n_c), the
        inverse frequency of its class (scikit-learn's class_weight='balanced',
        C' the classes present), so that the loss, like balanced accuracy,
        counts every class equally on imbalanced data.

    Returns:
      [n, C] float32 logits of the test features.
    """
    (logits,) = fit_linear_probe_path(
        train_features, train_labels, test_features, num_classes, (l2,), train_mask, steps, balanced
    )
    return logits


def fit_linear_probe_path(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    num_classes: int,
    l2_grid: Sequence[float],
    train_mask: np.ndarray | None = None,
    steps: int = 300,
    balanced: bool = False,
) -> list[np.ndarray]:
    """fit_linear_probe for every value of l2_grid: [n, C] logits each, in the grid's order.

    The regularisation path: fits go from the largest L2 to the smallest, each
    starting from the previous optimum (scikit-learn's logistic_regression_path
    and glmnet do the same), which is close to its own, so a 45-value grid
    costs a few full fits. The arguments are fit_linear_probe's.
    """
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0) + 1e-6
    x = jnp.asarray((train_features - mean) / std, jnp.float32)
    multilabel = train_labels.ndim == 2
    if multilabel:
        y = jnp.asarray(train_labels, jnp.float32)
        mask = jnp.asarray(train_mask, jnp.float32)
    else:
        y = jax.nn.one_hot(np.maximum(train_labels, 0), num_classes)
        weight = (train_labels >= 0).astype(np.float64)
        if balanced:
            counts = np.bincount(np.maximum(train_labels, 0), weights=weight, minlength=num_classes)
            present = counts > 0
            per_class = np.where(present, weight.sum() / (present.sum() * np.maximum(counts, 1)), 0)
            weight = weight * per_class[np.maximum(train_labels, 0)]
        mask = jnp.asarray(weight[:, None], jnp.float32)
    test = (test_features - mean) / std
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    logits = {}
    for l2 in sorted(set(float(v) for v in l2_grid), reverse=True):
        params = _fit(x, y, mask, jnp.float32(l2), params, multilabel, int(steps))
        w, b = np.asarray(params["w"]), np.asarray(params["b"])
        logits[l2] = np.asarray(test @ w + b, np.float32)
    return [logits[float(v)] for v in l2_grid]


class LinearProbeEvaluator(EvaluatorFields):
    """config.evals.NAME = dict(type='linear_probe', data=..., train_data=..., [l2, steps])."""

    def __init__(self, name: str, entry: Mapping, ctx: Context):
        super().__init__(name, entry, ctx, EXTRA_FIELDS, default_samples=0)
        self.train = self.train_data(entry, ctx, task.LABEL_TYPES, "linear probe")
        self.l2 = float(entry.get("l2", 1e-4))
        self.steps = int(entry.get("steps", 300))
        self.class_names = list(self.data.info.class_names)
        self.multilabel = self.data.label_type == "multilabel"
        self.clinical = clinical.ClinicalMetrics(name, entry, self.data, self.class_names)
        self.fit_on = self.clinical.fit_on

    def predict(self, variables: Mapping) -> Predictions:
        """The probe's logits on `data`, fitted on the train split's features."""
        train = self.train.predict(variables, ("features",))
        test = self.data.predict(variables, ("features",))
        logits = fit_linear_probe(
            train["features"],
            train["label"],
            test["features"],
            len(self.class_names),
            train.get("label_mask") if self.multilabel else None,
            self.l2,
            self.steps,
        )
        ids = test["case_id"], test["image_id"]
        if self.multilabel:
            return Predictions(logits, test["label"], test["label_mask"], *ids, "multilabel")
        keep = (test["label"] >= 0).astype(np.float64)
        return Predictions(logits, np.maximum(test["label"], 0), keep, *ids, "multiclass")

    def evaluate(self, variables: Mapping, step: int, fit: Predictions | None = None) -> EvalOutput:
        """Fits on the train split's features, evaluates on `data` (with the clinical metrics).

        Args:
          variables: {'params', 'batch_stats'}; step: the training step.
          fit: the predictions of the eval named by fit_on (run_evaluators passes them).
        """
        pred = self.predict(variables)
        args = (self.clinical, self.samples, self.seed, fit)
        if self.multilabel:
            return multilabel.evaluate_predictions(pred, self.class_names, *args)
        return classification.evaluate_predictions(pred, self.class_names, (5,), *args)
