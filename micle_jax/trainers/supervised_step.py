"""Supervised training: which weights train, class weights, the update step.

Fine-tuning (SimCLR's train_mode='finetune'), linear evaluation and the
supervised ImageNet baseline share one step: softmax cross-entropy for
multiclass labels (images without a label, -1, are masked) or sigmoid
cross-entropy for multilabel ones (uncertain or missing labels masked by the
pipeline's `label_mask`), on the global batch (BatchNorm statistics global, as
SimCLR's global_bn=True for fine-tuning).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from micle_jax import losses, optim
from micle_jax.models import frozen_stages
from micle_jax.trainers import train_state


def trainable_mask(params: dict, fine_tune_after_block: int, head_input: int) -> dict:
    """Which parameters the optimizer updates (Python bools, structure of `params`).

    Frozen, as SimCLR's fine-tuning:
      - the backbone stages that `fine_tune_after_block` freezes (-1: none;
        4: all of them, i.e. linear evaluation);
      - the projection layers after `head_input` (SimCLR's ft_proj_selector):
        the head never reads them, so they get no gradient, and leaving them
        to the optimizer would only decay them.

    Args:
      params: the model's parameter tree ('backbone', 'projection_head', 'head').
      fine_tune_after_block: -1 .. 4, see models.frozen_stages.
      head_input: 0 = the head reads backbone features; k = projection layer k.
    """
    frozen = {f"backbone/{stage}" for stage in frozen_stages(fine_tune_after_block)}
    flat = traverse_util.flatten_dict(params, sep="/")

    def trainable(name: str) -> bool:
        if any(name.startswith(prefix + "/") for prefix in frozen):
            return False
        parts = name.split("/")
        if parts[0] == "projection_head":
            layer = int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
            return layer <= head_input
        return True

    return traverse_util.unflatten_dict({k: trainable(k) for k in flat}, sep="/")


def zero_head(params: dict) -> dict:
    """The params with the linear head set to zero (SimCLR's zero_init_logits_layer).

    Starting every logit at 0 makes the first fine-tuning steps follow the
    features rather than a random head; SimCLR's fine-tuning commands set it.
    """
    if "head" not in params:
        return params
    return {**params, "head": jax.tree.map(jnp.zeros_like, params["head"])}


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """n / (C' * n_c) per class (0 for absent ones): scikit-learn's class_weight='balanced'.

    Args:
      counts: [C] training images per class.

    Returns:
      [C] float32 weights; an image of class c counts weights[c] times in the loss.
    """
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("class-balanced weights need at least one labelled training image")
    weights = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    schedule,
    label_type: str,
    class_weights: np.ndarray | None = None,
):
    """The jitted-to-be update: (state, batch) -> (state, measurements).

    batch: 'image' [B, H, W, 3] float32; 'label' int32 [B] (multiclass, -1 =
    none) or float32 [B, C] (multilabel) with 'label_mask' float32 [B, C].
    class_weights: [C] multiclass only; each image's loss is weighted by its
    class's weight (a weighted mean over the batch), None = unweighted.
    """
    if class_weights is not None and label_type != "multiclass":
        raise ValueError("class weights are for multiclass labels only")
    if label_type not in ("multiclass", "multilabel"):
        raise ValueError(f"label_type={label_type!r}; accepted: multiclass, multilabel")

    def train_step(state: train_state.TrainState, batch):
        def loss_fn(params):
            out, mutated = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
            )
            logits = out["logits"]
            if label_type == "multiclass":
                labels = batch["label"]
                mask = (labels >= 0).astype(jnp.float32)
                weight = mask
                if class_weights is not None:
                    weight = mask * jnp.asarray(class_weights)[jnp.maximum(labels, 0)]
                loss = losses.softmax_cross_entropy(logits, jnp.maximum(labels, 0), weight)
                hits = losses.topk_correct(logits, jnp.maximum(labels, 0), 1)
                accuracy = jnp.sum(hits * mask) / jnp.maximum(mask.sum(), 1.0)
                measurements = {"train_accuracy": accuracy, "labelled_fraction": mask.mean()}
            else:
                mask = batch["label_mask"]
                loss = losses.sigmoid_cross_entropy(logits, batch["label"], mask)
                measurements = {"labelled_fraction": jnp.mean(mask)}
            return loss, (mutated["batch_stats"], measurements)

        return train_state.apply_gradients(state, tx, schedule, loss_fn)

    return train_step


def make_optimizer(config, model, image_size: int, schedule):
    """config.optim of a fine-tuning config; frozen stages and unused projection layers masked."""
    abstract_params = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            np.zeros((1, image_size, image_size, 3), np.float32),
            train=False,
        )["params"]
    )
    mask = trainable_mask(
        abstract_params, config.model.fine_tune_after_block, config.model.head_input
    )
    return optim.make_optimizer(config.optim, schedule, trainable_mask=mask)
