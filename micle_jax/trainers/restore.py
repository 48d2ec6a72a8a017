"""What a run starts from: this workdir's checkpoint, an init checkpoint's weights, or scratch.

Resume order (big_vision): the workdir's latest checkpoint (the whole train
state), then config.init.checkpoint (weights only: which ones is
`weight_prefixes`), then the fresh initialisation. Fine-tuning may then
rescale the projection layer its head reads (`normalize_head_input`).
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from micle_jax import checkpoint
from micle_jax.trainers.train_state import TrainState


def restore_or_init(
    state: TrainState,
    abstract_state,
    state_shardings,
    manager,
    meta: dict,
    init_checkpoint: str,
    init_prefixes: tuple[str, ...],
) -> tuple[TrainState, dict]:
    """Resume order: this workdir's latest checkpoint, then init weights, then scratch.

    Args:
      state: the freshly initialised state.
      abstract_state, state_shardings: from `train_state.create_state`.
      manager: the workdir's CheckpointManager.
      meta: what this run would save as meta; a resumed checkpoint must agree
        on 'global_batch_size' and 'seed' (else the data position is wrong).
      init_checkpoint: '' or a workdir/checkpoint of another run (weights only).
      init_prefixes: modules copied from the init checkpoint (`weight_prefixes`).

    Returns:
      (state, the resumed checkpoint's meta, or {} when the run did not resume).
    """
    latest = manager.latest_step()
    if latest is not None:
        restored, saved_meta = checkpoint.restore(manager, latest, abstract_state)
        for key in ("global_batch_size", "seed"):
            if key in saved_meta and saved_meta[key] != meta.get(key):
                raise ValueError(
                    f"the checkpoint in this workdir was written with {key}="
                    f"{saved_meta[key]} but the config now says {meta.get(key)}; exact resume "
                    "needs the same value (or use a new --workdir)"
                )
        logging.info("Resumed from %s/%d", manager.directory, latest)
        return restored, saved_meta
    if init_checkpoint:
        loaded = checkpoint.load_variables(init_checkpoint)
        target = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        merged, copied = checkpoint.merge_variables(target, loaded, init_prefixes)
        logging.info("Initialised %d arrays from %s", len(copied), init_checkpoint)
        state = state.replace(params=merged["params"], batch_stats=merged["batch_stats"])
        return jax.device_put(state, state_shardings), {}
    logging.info("Training from scratch")
    return state, {}


def weight_prefixes(init_config) -> tuple[str, ...]:
    """Modules copied from an init checkpoint: the backbone and projection layers.

    init_config.init_proj_layers: k >= 0 copies projection layers 1..k, which
    must be in the checkpoint with the model's shapes (fine-tuning: SimCLR's
    ft_proj_selector); -1 copies every leading layer that the checkpoint and
    the model share (pre-training from a pre-training run: the whole head and
    its BatchNorm statistics, as SimCLR's --checkpoint restores the whole
    model; what a shallower or narrower head leaves fresh is logged). The
    supervised head `head` is copied only when init_config.init_head is True
    (fine-tuning configs; the checkpoint's classes must be the task's).
    """
    proj = int(init_config.get("init_proj_layers", 0) or 0)
    if proj < -1:
        raise ValueError(
            f"config.init.init_proj_layers={proj}: expected -1 (every shared layer) or k >= 0"
        )
    head = ("head",) if init_config.get("init_head", False) else ()
    if proj == -1:
        return ("backbone", checkpoint.SHARED_PROJECTION_LAYERS, *head)
    return ("backbone", *checkpoint.projection_layer_prefixes(proj), *head)


def normalize_head_input(variables: dict, head_input: int) -> tuple[dict, float]:
    """Rescales the BatchNorm of projection layer `head_input` to unit RMS scale.

    Why: pre-training leaves the scale of a projection layer arbitrary. Its
    output goes through ReLU (positively homogeneous) into a bias-free Dense
    and the next BatchNorm (or, for the last layer, the L2 normalisation of
    NT-Xent), so multiplying its BatchNorm scale and offset by c > 0 changes
    neither the contrastive loss nor any gradient direction, only the size of
    the layer's output. LARS excludes BatchNorm from its trust ratio (SimCLR),
    so those parameters take raw steps at the peak learning rate and drift
    to large norms (in a 60-step demo run the BatchNorm norm grew 4.5x). The
    fine-tuning head reads this layer (SimCLR's ft_proj_selector), and its
    effective learning rate grows with the squared norm of its input: a
    zero-initialised head on an inflated layer overshoots (training loss
    3.7-3.9 at the first log, 0.69 from scratch). Fixing the free scale at its
    initial value (RMS of the BatchNorm scale = 1, as BatchNorm is
    initialised) makes fine-tuning from any pre-trained run start like one
    from scratch, and leaves the pre-trained function unchanged up to that
    scale: the next layer's running mean and variance are rescaled with it.

    Args:
      variables: {'params', 'batch_stats'} host trees after the init checkpoint
        was merged in.
      head_input: the layer the head reads (0 = backbone features: untouched).

    Returns:
      (variables, c): the rescaled variables and the factor applied (1.0 when
      there is nothing to rescale).
    """
    if head_input < 1:
        return variables, 1.0
    params = variables["params"].get("projection_head", {})
    bn = params.get(f"bn{head_input}")
    if bn is None or "scale" not in bn:
        return variables, 1.0
    rms = float(np.sqrt(np.mean(np.square(np.asarray(bn["scale"], np.float64)))))
    if not np.isfinite(rms) or rms <= 0:
        return variables, 1.0
    c = 1.0 / rms
    new_bn = {k: np.asarray(v) * c for k, v in bn.items()}
    projection = {**params, f"bn{head_input}": new_bn}
    new_params = {**variables["params"], "projection_head": projection}
    stats = variables.get("batch_stats", {})
    head_stats = stats.get("projection_head", {})
    following = head_stats.get(f"bn{head_input + 1}")
    if following is not None:
        # The next BatchNorm sees inputs c times larger: its running moments follow.
        following = {
            "mean": np.asarray(following["mean"]) * c,
            "var": np.asarray(following["var"]) * c * c,
        }
        stats = {**stats, "projection_head": {**head_stats, f"bn{head_input + 1}": following}}
    return {**variables, "params": new_params, "batch_stats": stats}, c
