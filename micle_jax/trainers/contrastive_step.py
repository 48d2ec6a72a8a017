"""The contrastive (SimCLR / MICLe) update step, free of the input pipeline's imports.

`pretrain.main` jits it over the mesh; benchmarks/step_throughput.py times it
on machines that have JAX but not TensorFlow.
"""

from __future__ import annotations

import jax.numpy as jnp

from micle_jax import losses, models
from micle_jax.trainers import train_state


def make_train_step(model, tx, schedule, temperature: float, probe: bool):
    """The jitted-to-be update: (state, batch) -> (state, measurements).

    batch: view1, view2 [B, H, W, 3] float32; label [B] int32 (-1 = none);
    multi_instance [B] bool. Both views go through the network as one batch
    of 2B, as in SimCLR, so BatchNorm sees all of them.
    """

    def train_step(state: train_state.TrainState, batch):
        def loss_fn(params):
            images = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)
            out, mutated = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            z1, z2 = jnp.split(out["projections"], 2, axis=0)
            loss, acc = losses.nt_xent_with_accuracy(z1, z2, temperature)
            measurements = {"contrastive_loss": loss, "contrastive_acc": acc}
            if probe:
                # SimCLR's lineareval_while_pretraining: a head on stop-gradient
                # features, trained on whatever labels the batch has.
                labels = jnp.concatenate([batch["label"], batch["label"]], axis=0)
                mask = (labels >= 0).astype(jnp.float32)
                probe_loss = losses.softmax_cross_entropy(
                    out["logits"], jnp.maximum(labels, 0), mask
                )
                # The evaluators' top-1 rule (argmax, first index on ties).
                hits = losses.topk_correct(out["logits"], jnp.maximum(labels, 0), 1)
                measurements["probe_loss"] = probe_loss
                measurements["probe_acc"] = jnp.sum(hits * mask) / jnp.maximum(mask.sum(), 1.0)
                loss = loss + probe_loss
            return loss, (mutated["batch_stats"], measurements)

        new_state, measurements = train_state.apply_gradients(state, tx, schedule, loss_fn)
        measurements["multi_instance_fraction"] = jnp.mean(
            batch["multi_instance"].astype(jnp.float32)
        )
        return new_state, measurements

    return train_step


def build_model(config, info):
    """The pre-training model of `config` for data `info`, and whether it has the probe.

    The online linear probe (SimCLR's lineareval_while_pretraining) is a head
    with the data's classes when config.linear_probe is set and the data is
    multiclass; otherwise the model has no head.

    Returns:
      (model, probe).
    """
    probe = bool(config.linear_probe) and info.label_type == "multiclass" and info.num_classes > 0
    model_config = config.model.copy_and_resolve_references()
    with model_config.unlocked():
        model_config.num_classes = info.num_classes if probe else 0
    return models.build_model(model_config), probe
