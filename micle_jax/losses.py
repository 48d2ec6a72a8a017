"""Contrastive and supervised losses, written on the global batch.

Every function here takes the whole global batch and uses no axis names. Under
`jax.jit` with the batch sharded over the "data" mesh axis, XLA inserts the
collectives, so NT-Xent sees every replica's projections as negatives (SimCLR's
cross-replica negatives) without any hand-written all-gather.

All losses compute in float32 whatever the input dtype, so a bfloat16 model
still gets a float32 loss and float32 gradients at the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

# SimCLR tf2/objective.py masks self-similarity by subtracting this constant.
LARGE_NUM = 1e9


def _check_views(z1: jax.Array, z2: jax.Array, temperature) -> None:
    if z1.ndim != 2 or z2.ndim != 2:
        raise ValueError(
            f"nt_xent expects z1 and z2 of shape [batch, dim]; got {z1.shape} and {z2.shape}. "
            "Flatten the projection head output to 2-D first."
        )
    if z1.shape != z2.shape:
        raise ValueError(
            f"nt_xent: the two views must have the same shape; got z1 {z1.shape} and "
            f"z2 {z2.shape}. Pass view 1 and view 2 of the same batch."
        )
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"nt_xent: temperature={temperature} must be > 0 (SimCLR uses 0.1).")


def _l2_normalize(x: jax.Array) -> jax.Array:
    # Same epsilon as tf.math.l2_normalize, which SimCLR's hidden_norm=True uses.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    # HIGHEST: on TPU and on GPU (TF32) the default float32 matmul rounds its
    # inputs, an error of ~1e-2 on logits scaled by 1/0.1. The [B, B] product
    # is negligible next to the network, so pay for full precision.
    return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def nt_xent_with_accuracy(
    z1: jax.Array, z2: jax.Array, temperature: float = 0.1
) -> tuple[jax.Array, jax.Array]:
    """NT-Xent loss and contrastive top-1 accuracy on the global batch.

    Same value as SimCLR's `add_contrastive_loss` (tf2/objective.py) with
    hidden_norm=True and unit weights: projections are L2-normalised; for view
    1 the logits are [z1.z2 | z1.z1] / temperature with the self-similarity
    masked out, the positive is at the aligned index of z1.z2; the same for
    view 2; loss = mean over the batch of (loss_view1 + loss_view2).

    Args:
      z1: [batch, dim] projections of view 1 (any float dtype).
      z2: [batch, dim] projections of view 2, aligned with z1 row by row.
      temperature: softmax temperature (SimCLR default 0.1).

    Returns:
      (loss, accuracy): float32 scalars. accuracy is SimCLR's contrast_acc
      (tf2/metrics.py on the logits_ab that add_contrastive_loss returns):
      the fraction of view-1 rows whose largest z1.z2 logit is the positive.
    """
    _check_views(z1, z2, temperature)
    batch = z1.shape[0]
    h1 = _l2_normalize(z1.astype(jnp.float32))
    h2 = _l2_normalize(z2.astype(jnp.float32))
    self_mask = jnp.eye(batch, dtype=jnp.float32) * LARGE_NUM
    logits_aa = _similarity(h1, h1) / temperature - self_mask
    logits_bb = _similarity(h2, h2) / temperature - self_mask
    logits_ab = _similarity(h1, h2) / temperature
    logits_ba = _similarity(h2, h1) / temperature
    # [batch, 2 * batch]; the positive of row i is column i (the other view).
    logits_a = jnp.concatenate([logits_ab, logits_aa], axis=1)
    logits_b = jnp.concatenate([logits_ba, logits_bb], axis=1)
    positives = jnp.arange(batch)
    loss_a = optax.softmax_cross_entropy_with_integer_labels(logits_a, positives)
    loss_b = optax.softmax_cross_entropy_with_integer_labels(logits_b, positives)
    loss = jnp.mean(loss_a + loss_b)
    accuracy = jnp.mean(topk_correct(logits_ab, positives, 1))
    return loss, accuracy


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.1) -> jax.Array:
    """NT-Xent (SimCLR) loss on the global batch; see `nt_xent_with_accuracy`.

    Args:
      z1: [batch, dim] projections of view 1.
      z2: [batch, dim] projections of view 2.
      temperature: softmax temperature (SimCLR default 0.1).

    Returns:
      float32 scalar loss.
    """
    return nt_xent_with_accuracy(z1, z2, temperature)[0]


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(jnp.float32)
    total = jnp.sum(mask)
    # A safe denominator rather than a `where` after dividing: 0/0 would put
    # NaNs into the gradient even on the branch that is not taken.
    return jnp.sum(values * mask) / jnp.where(total > 0, total, 1.0)


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean softmax cross-entropy over the examples where mask is non-zero.

    Args:
      logits: [batch, classes] unnormalised scores.
      labels: [batch] integer class indices.
      mask: [batch] 1 for real examples, 0 for padding; None means all real.

    Returns:
      float32 scalar; 0 when the mask is all zero.
    """
    if logits.ndim != 2:
        raise ValueError(
            f"softmax_cross_entropy: logits must be [batch, classes]; got {logits.shape}"
        )
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"softmax_cross_entropy: labels must be [batch]={logits.shape[:1]} integer class "
            f"indices; got shape {labels.shape}. Pass class indices, not one-hot vectors."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"softmax_cross_entropy: labels must be integers; got dtype {labels.dtype}. "
            "For multi-label targets use sigmoid_cross_entropy."
        )
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"softmax_cross_entropy: mask must be [batch]; got {mask.shape}")
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    )
    return _masked_mean(per_example, mask)


def sigmoid_cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean multi-label sigmoid cross-entropy over the unmasked entries.

    Entries with mask 0 contribute nothing, whatever their target holds: e.g.
    uncertain CheXpert labels under the 'ignore' policy, or padded examples.

    Args:
      logits: [batch, classes] unnormalised scores.
      targets: [batch, classes] targets in [0, 1].
      mask: [batch, classes] (per label) or [batch] (per example) weights in
        {0, 1}; None means every entry counts.

    Returns:
      float32 scalar: sum of masked losses / number of unmasked entries; 0 when
      everything is masked.
    """
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(
            "sigmoid_cross_entropy: logits and targets must both be [batch, classes]; got "
            f"{logits.shape} and {targets.shape}."
        )
    if mask is not None:
        if mask.shape == logits.shape[:1]:
            mask = mask[:, None]
        elif mask.shape != logits.shape:
            raise ValueError(
                f"sigmoid_cross_entropy: mask must be [batch, classes]={logits.shape} or "
                f"[batch]={logits.shape[:1]}; got {mask.shape}"
            )
        mask = jnp.broadcast_to(mask, logits.shape)
        # Masked targets may hold placeholders (-1 for 'uncertain', even NaN);
        # zero them so NaN * 0 cannot leak into the sum.
        targets = jnp.where(mask > 0, targets, 0)
    per_entry = optax.sigmoid_binary_cross_entropy(
        logits.astype(jnp.float32), targets.astype(jnp.float32)
    )
    return _masked_mean(per_entry, mask)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int = 1) -> jax.Array:
    """Whether each example's label is among its k largest logits, by scikit-learn's rule.

    The one accuracy rule of the package: the training steps call it on traced
    jax arrays, the evaluators (evaluators/metrics.py) on host NumPy arrays,
    which it keeps in NumPy (and their own precision). Ties:
    - top-1 is argmax(logits) == label, ties going to the lowest class index
      (np.argmax / jnp.argmax): scikit-learn's accuracy_score on argmax
      predictions, and SimCLR's tf.argmax accuracies;
    - top-k, k > 1, is scikit-learn's top_k_accuracy_score: classes ranked by a
      stable ascending sort, reversed, so ties go to the highest class index.
      Hence with ties a top-1 hit can be a top-2 miss (logits [1, 1, 1],
      label 0), as in scikit-learn.

    Args:
      logits: [batch, classes] scores (jax or NumPy).
      labels: [batch] integer class indices in [0, classes).
      k: how many top classes count as correct, k >= 1; k >= classes makes
        every example correct (as scikit-learn).

    Returns:
      [batch] float32 (a NumPy array for NumPy inputs), 1.0 where correct.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"topk_correct: expected logits [batch, classes] and labels [batch]; got "
            f"{logits.shape} and {labels.shape}."
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"topk_correct: k={k!r} must be an integer >= 1")
    xp = jnp if isinstance(logits, jax.Array) or isinstance(labels, jax.Array) else np
    if k == 1:
        return (xp.argmax(logits, axis=1) == labels).astype(xp.float32)
    # Count the classes ranked above the label, instead of sorting (same
    # result, no sort): higher logits, and equal logits at a higher index.
    own = xp.take_along_axis(logits, labels[:, None], axis=1)
    higher_index = xp.arange(logits.shape[1]) > labels[:, None]
    ahead = (logits > own) | ((logits == own) & higher_index)
    return (xp.sum(ahead, axis=1) < k).astype(xp.float32)
