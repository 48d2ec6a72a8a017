"""What every trainer needs around its update step.

Train state, sharded initialisation, resume order (workdir checkpoint, then
init checkpoint, then scratch), the run status file, preemption (SIGTERM and
Orbax's multi-host sync point) and the non-finite-loss guard.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from micle_jax import checkpoint, sharding

STATUS_FILE = "run_status.json"


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; fully saved in every checkpoint.

    Randomness is a pure function of (config.seed, step) (per-step keys by
    `jax.random.fold_in`, data by stateless ops), so the step is the RNG state.
    """

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState


def apply_gradients(state: TrainState, tx: optax.GradientTransformation, schedule, loss_fn):
    """One optimizer update of state.params by the gradient of `loss_fn`.

    Args:
      state: the TrainState before the step.
      tx: the optimizer.
      schedule: step -> learning rate (logged).
      loss_fn: params -> (loss, (new batch_stats, measurements dict)).

    Returns:
      (new_state, measurements) with loss, learning_rate, grad_norm,
      param_norm (after the update) and finite added to loss_fn's.
    """
    (loss, (batch_stats, measurements)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    measurements = dict(
        measurements,
        loss=loss,
        learning_rate=schedule(state.step),
        grad_norm=optax.global_norm(grads),
        param_norm=optax.global_norm(params),
        finite=jnp.isfinite(loss),
    )
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, measurements


def check_workdir(workdir: str) -> str:
    """Checks that `workdir` can be created and written; returns its absolute path.

    Creates nothing: a run that fails later config checks leaves no trace.
    """
    if not workdir:
        raise ValueError("--workdir is required (where logs and checkpoints go)")
    path = os.path.abspath(os.path.expanduser(workdir))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"--workdir={workdir}: {probe} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(
            f"--workdir={workdir}: {probe} is not writable; choose a folder you can write to"
        )
    return path


def write_status(workdir: str, status: str, **fields) -> None:
    """Atomically writes WORKDIR/run_status.json (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    data = {"status": status, **fields}
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".status")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, os.path.join(workdir, STATUS_FILE))


def read_status(workdir: str) -> dict | None:
    """The run status of a workdir, or None when it has none."""
    try:
        with open(os.path.join(workdir, STATUS_FILE)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def create_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    image_size: int,
    seed: int,
    shard_min_size: int,
):
    """Initialises a sharded TrainState directly on the devices.

    Returns:
      (state, state_shardings, abstract_state) where abstract_state carries
      shapes, dtypes and shardings (for Orbax restore).
    """

    def init_fn():
        dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
        variables = model.init(jax.random.key(seed), dummy, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
        )

    shapes = jax.eval_shape(init_fn)
    shardings = sharding.tree_shardings(shapes, mesh, shard_min_size)
    state = jax.jit(init_fn, out_shardings=shardings)()
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return state, shardings, abstract


def restore_or_init(
    state: TrainState,
    abstract_state,
    state_shardings,
    manager,
    meta: dict,
    init_checkpoint: str,
    init_prefixes: tuple[str, ...],
) -> TrainState:
    """Resume order: this workdir's latest checkpoint, then init weights, then scratch.

    Args:
      state: the freshly initialised state.
      abstract_state, state_shardings: from `create_state`.
      manager: the workdir's CheckpointManager.
      meta: what this run would save as meta; a resumed checkpoint must agree
        on 'global_batch_size' and 'seed' (else the data position is wrong).
      init_checkpoint: '' or a workdir/checkpoint of another run (weights only).
      init_prefixes: modules copied from the init checkpoint (`weight_prefixes`).
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
        return restored
    if init_checkpoint:
        loaded = checkpoint.load_variables(init_checkpoint)
        target = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        merged, copied = checkpoint.merge_variables(target, loaded, init_prefixes)
        logging.info("Initialised %d arrays from %s", len(copied), init_checkpoint)
        state = state.replace(params=merged["params"], batch_stats=merged["batch_stats"])
        return jax.device_put(state, state_shardings)
    logging.info("Training from scratch")
    return state


class Preemption:
    """SIGTERM handler plus Orbax's multi-host preemption sync point.

    `should_stop(step)` is True on every process at the same step: a SIGTERM
    received by any process is shared through a small all-gather (only when
    there are several processes), and on TPU pods JAX's own preemption service
    answers through `manager.reached_preemption`.
    """

    def __init__(self, manager):
        self._manager = manager
        self._event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self._event.set()

    def should_stop(self, step: int) -> bool:
        stop = self._event.is_set()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop = bool(np.any(multihost_utils.process_allgather(np.array([stop]))))
        try:
            stop = stop or bool(self._manager.reached_preemption(step))
        except Exception:  # noqa: BLE001 - no preemption service on this platform
            pass
        return stop

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLoss(RuntimeError):
    """Raised when a training step produced a non-finite loss."""


def first_bad_step(pending: list[tuple[int, jax.Array]]) -> int | None:
    """The first step whose 'finite' flag is False, fetching the flags in one go.

    Args:
      pending: [(step, finite flag as a device scalar)] since the last check.
    """
    if not pending:
        return None
    flags = jax.device_get([flag for _, flag in pending])
    for (step, _), ok in zip(pending, flags, strict=True):
        if not bool(ok):
            return step
    return None


def drain_measurements(pending: list[tuple[int, dict]], manager) -> dict[str, float]:
    """Means of the measurements of `pending` steps, after checking they are finite.

    Called before every log line and every checkpoint, so only finite states
    are ever saved. One device fetch for all the steps since the last call.

    Args:
      pending: [(step, measurements dict with a 'finite' flag)], not empty.
      manager: the CheckpointManager, to name the last good checkpoint.

    Raises:
      NonFiniteLoss: naming the first non-finite step.
    """
    bad = first_bad_step([(step, m["finite"]) for step, m in pending])
    if bad is not None:
        raise NonFiniteLoss(nonfinite_message(bad, manager))
    fetched = jax.device_get([m for _, m in pending])
    keys = [k for k in fetched[0] if k != "finite"]
    return {k: float(np.mean([m[k] for m in fetched])) for k in keys}


def nonfinite_message(step: int, manager) -> str:
    """The message of a run stopped by a non-finite loss, naming the last good checkpoint."""
    good = manager.latest_step()
    where = (
        f"the last good checkpoint is {manager.directory}/{good} (kept; rerunning resumes from it)"
        if good is not None
        else "no checkpoint was saved before it"
    )
    return (
        f"non-finite loss at step {step}; {where}. Lower the learning rate, check the data, "
        "or use float32 (config.model.dtype)."
    )


def weight_prefixes(init_config) -> tuple[str, ...]:
    """Modules copied from an init checkpoint: the backbone and projection layers.

    init_config.init_proj_layers: k >= 0 copies projection layers 1..k, which
    must be in the checkpoint with the model's shapes (fine-tuning: SimCLR's
    ft_proj_selector); -1 copies every leading layer that the checkpoint and
    the model share (pre-training from a pre-training run: the whole head and
    its BatchNorm statistics, as SimCLR's --checkpoint restores the whole
    model; what a shallower or narrower head leaves fresh is logged). The
    supervised head `head` is never copied: its classes may differ.
    """
    proj = int(init_config.get("init_proj_layers", 0) or 0)
    if proj < -1:
        raise ValueError(
            f"config.init.init_proj_layers={proj}: expected -1 (every shared layer) or k >= 0"
        )
    if proj == -1:
        return ("backbone", checkpoint.SHARED_PROJECTION_LAYERS)
    return ("backbone", *checkpoint.projection_layer_prefixes(proj))


def run_periodically(every: int, step: int, total: int) -> bool:
    """True every `every` steps and at the last step."""
    return step == total or (every > 0 and step % every == 0)
