"""The train state and its in-jit update, shared by both update steps.

`create_state` initialises a sharded TrainState directly on the devices;
`apply_gradients` is the optimizer update inside the jitted steps
(contrastive_step.py, supervised_step.py). Free of the input pipeline's
imports, like the steps themselves.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from micle_jax import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; fully saved in every checkpoint.

    The update steps draw no random numbers (the models have no dropout; the
    views are augmented by the input pipeline's stateless ops, seeded by
    config.seed and the example's position in the stream), so the step is
    the only RNG state: a restart at `step` rebuilds the same data.
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


def run_once(fn, out_shardings=None):
    """fn() (no arguments) compiled for its one call: on the CPU with LLVM at -O0.

    For the models' initialisation (a random initializer per parameter), which
    runs once, so that its compile time is all that counts: XLA's CPU backend
    compiles ResNet-18 0.25x's in 3.8 s at -O0 against 10.2 s at its default
    -O2, ResNet-50 1x's in 8.2 s against 15.6 s (benchmarks/init_compile.py),
    for the same parameters up to float32 rounding (at most 9e-8 apart: the
    random bits are integer arithmetic, their mapping to normals is not).
    Other backends keep their defaults.
    """
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(fn, out_shardings=out_shardings).lower().compile(compiler_options=options)()


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
    state = run_once(init_fn, shardings)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return state, shardings, abstract
