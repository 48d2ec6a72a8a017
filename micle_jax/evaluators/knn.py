"""k-nearest-neighbour accuracy on frozen features (monitoring pre-training).

The weighted k-NN of Wu et al. 2018 (instance discrimination), also used by
DINO to follow self-supervised training without training anything: features
are L2-normalised, each test image's k most cosine-similar training images
vote for their class with weight exp(similarity / T). k=20 and T=0.07 are
DINO's defaults (not from the SimCLR or MICLe papers, which monitor with a
linear probe).

  config.evals.knn = dict(type='knn', every_steps=1000,
      data=dict(source='records:data/demo/pneumoniamnist', split='test'),
      train_data=dict(split='train'))

The votes are scored as a classification eval's logits (their log shares,
`vote_log_shares`), with the same optional clinical fields (clinical.py):

  config.evals.knn_validation = dict(type='knn', data=dict(split='validation'))
  config.evals.knn = dict(type='knn', data=dict(split='test'),
      fit_on='knn_validation', calibration=True, operating_points=True,
      subgroups='auto')
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from micle_jax.evaluators import classification, clinical
from micle_jax.evaluators.base import EvaluatorFields
from micle_jax.evaluators.eval_data import Context
from micle_jax.evaluators.outputs import EvalOutput, Predictions

EXTRA_FIELDS = ("train_data", "k", "temperature", "bootstrap_samples", *clinical.EXTRA_FIELDS)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise unit vectors: [n, d] -> [n, d] float32 (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Class votes of the weighted k-NN classifier.

    Args:
      train_features: [m, d]; train_labels: [m] ints in [0, num_classes).
      test_features: [n, d].
      num_classes: number of classes.
      k: neighbours (capped at m).
      temperature: vote weight exp(cosine similarity / temperature).
      chunk: test rows per similarity block (bounds memory to chunk * m).

    Returns:
      [n, num_classes] float32 vote totals (argmax = the prediction).
    """
    if not len(train_features):
        raise ValueError("k-NN needs labelled training images; the train split has none")
    train = l2_normalize(train_features)
    test = l2_normalize(test_features)
    k = min(k, len(train))
    votes = np.zeros((len(test), num_classes), np.float32)
    for start in range(0, len(test), chunk):
        sims = test[start : start + chunk] @ train.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
        rows = np.repeat(np.arange(len(top)), k)
        np.add.at(votes[start : start + chunk], (rows, train_labels[top].ravel()), weights.ravel())
    return votes


def vote_log_shares(votes: np.ndarray, k: int) -> np.ndarray:
    """Log class probabilities of k-NN votes: [n, C] totals of k neighbours -> [n, C] float32.

    What the metrics should see of a k-NN as logits: their softmax is the class
    probability and their argmax the votes'. Raw votes (each up to
    exp(1 / temperature), 1.6e6 at T=0.07) would make the softmax one-hot and
    an AUC that of the hard predictions. The probability is the share of the
    votes with one pseudo-neighbour added that votes uniformly (its weight the
    mean of the k real ones): (votes + total / (k C)) / (total (1 + 1 / k)).
    That is an affine map of each class's plain share, the same for every
    image, so accuracy, balanced accuracy and every per-class AUC are those of
    the plain shares; but no class has probability 0, whose log made the
    NLL of one confidently wrong image unbounded, and a fitted temperature
    meaningless.
    """
    votes = np.asarray(votes, np.float64)
    total = votes.sum(axis=1, keepdims=True)
    prior = total / (int(k) * votes.shape[1])
    probs = (votes + prior) / np.maximum(total + votes.shape[1] * prior, 1e-300)
    return np.log(np.maximum(probs, 1e-300)).astype(np.float32)


class KnnEvaluator(EvaluatorFields):
    """config.evals.NAME = dict(type='knn', data=..., train_data=..., [k, temperature])."""

    def __init__(self, name: str, entry: Mapping, ctx: Context):
        super().__init__(name, entry, ctx, EXTRA_FIELDS, default_samples=0)
        self.train = self.train_data(entry, ctx, ("multiclass",), "k-NN")
        self.k = int(entry.get("k", 20))
        self.temperature = float(entry.get("temperature", 0.07))
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(f"eval {name!r}: k={self.k} must be >= 1 and temperature > 0")
        self.class_names = list(self.data.info.class_names)
        self.clinical = clinical.ClinicalMetrics(name, entry, self.data, self.class_names)
        self.fit_on = self.clinical.fit_on

    def predict(self, variables: Mapping) -> Predictions:
        """The k-NN's log vote shares on the evaluated split, against the train split."""
        train = self.train.predict(variables, ("features",))
        test = self.data.predict(variables, ("features",))
        labelled = train["label"] >= 0
        votes = knn_scores(
            train["features"][labelled],
            train["label"][labelled],
            test["features"],
            len(self.class_names),
            self.k,
            self.temperature,
        )
        keep = (test["label"] >= 0).astype(np.float64)
        return Predictions(
            vote_log_shares(votes, self.k),
            np.maximum(test["label"], 0),
            keep,
            test["case_id"],
            test["image_id"],
            "multiclass",
        )

    def evaluate(self, variables: Mapping, step: int, fit: Predictions | None = None) -> EvalOutput:
        """k-NN metrics of the evaluated split (with the clinical metrics).

        Args:
          variables: {'params', 'batch_stats'}; step: the training step.
          fit: the predictions of the eval named by fit_on (run_evaluators passes them).
        """
        return classification.evaluate_predictions(
            self.predict(variables),
            self.class_names,
            (5,),
            self.clinical,
            self.samples,
            self.seed,
            fit,
        )
