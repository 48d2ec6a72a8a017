"""The train loop's own measurements, on a trivial step (seconds, no model)."""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from micle_jax import checkpoint, config_lib, sharding
from micle_jax.models import conv
from micle_jax.trainers import loop, train_state

STEPS, LOG_EVERY = 8, 4


class RecordingWriter:
    """A metric writer keeping every write_scalars call: [(step, scalars)]."""

    def __init__(self):
        self.scalars = []

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))

    def flush(self):
        pass


def _matmuls(x: jax.Array, repeats: int) -> jax.Array:
    return jax.lax.fori_loop(0, repeats, lambda _, y: jnp.tanh(y @ y) / 8, x)


def _run(tmp_path, batch_seconds: float, matmul_repeats: int) -> list[float]:
    """loop.train for STEPS steps: each batch takes `batch_seconds` to arrive, each step
    `matmul_repeats` 256 x 256 matmuls; the logged data_wait_fraction values."""
    mesh = sharding.make_mesh(config_lib.mesh_config())
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32), params={}, batch_stats={}, opt_state=optax.EmptyState()
    )
    replicated = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    config = ml_collections.ConfigDict(dict(log_every_steps=LOG_EVERY, checkpoint_every_steps=0))
    workdir = str(tmp_path)
    writer = RecordingWriter()
    manager = checkpoint.make_manager(workdir, 1)
    run = loop.Run(config, workdir, mesh, manager, {}, writer, replicated, STEPS)

    def step_fn(state, batch):
        work = _matmuls(jnp.full((256, 256), jnp.mean(batch["x"])), matmul_repeats)
        return state.replace(step=state.step + 1), {
            "finite": jnp.isfinite(work[0, 0]),
            "w": work[0, 0],
        }

    def batches():
        while True:
            time.sleep(batch_seconds)
            yield {"x": np.ones((8, 4), np.float32)}

    loop.train(run, state, step_fn, batches(), evals={})
    manager.close()
    logged = [s for _, s in writer.scalars if "data_wait_fraction" in s]
    assert [step for step, s in writer.scalars if "w" in s] == [LOG_EVERY, STEPS]
    return [s["data_wait_fraction"] for s in logged]


def test_log_lines_measure_the_share_of_time_waiting_for_the_next_batch(tmp_path):
    # The second of the two logged intervals (the first holds the step's compilation).
    # Batches that take 0.2 s to arrive, a step of microseconds: the loop waits.
    slow_input = _run(tmp_path / "slow_input", 0.2, 1)
    assert len(slow_input) == 2 and slow_input[1] > 0.8, slow_input
    # Instant batches, steps of 100 matmuls: the loop waits for the steps instead.
    slow_steps = _run(tmp_path / "slow_steps", 0.0, 100)
    assert len(slow_steps) == 2 and slow_steps[1] < 0.1, slow_steps


def test_the_step_is_compiled_with_the_models_compiler_options(tmp_path, monkeypatch):
    # An option value XLA rejects: the loop's compile fails on it only if it passes
    # conv.compiler_options() to jit (the trainers' CPU convolutions depend on it).
    bad = {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"}
    monkeypatch.setattr(conv, "compiler_options", lambda: bad)
    with pytest.raises(jax.errors.JaxRuntimeError, match="NOT_A_FUSION_TYPE"):
        _run(tmp_path, 0.0, 1)
