"""What several benchmarks build: the trainer's jitted contrastive step with random inputs."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from micle_jax import config_lib, models, optim, recipes, sharding
from micle_jax.models import conv
from micle_jax.trainers import contrastive_step, train_state


def build_step(
    arch: str,
    image_size: int,
    batch_size: int,
    dtype: str,
    probe: bool = False,
    xla_defaults: bool = False,
):
    """The trainer's jitted contrastive step on this process's devices, with inputs.

    Compiled as the trainers compile it (conv.compiler_options()), or with
    XLA's default options (`xla_defaults`).

    Returns:
      (step, state, batch): step(state, batch) -> (state, measurements), the
      state donated; a random batch of `batch_size` pairs of views.
    """
    model_config = config_lib.model_config(arch, dtype=dtype)
    model = models.build_model(model_config)
    optim_config = recipes.pretrain_config(arch).optim
    schedule = optim.make_schedule(optim_config, 1000, 100, batch_size)
    tx = optim.make_optimizer(optim_config, schedule)
    mesh = sharding.make_mesh(config_lib.mesh_config())
    state, state_shardings, _ = train_state.create_state(model, tx, mesh, image_size, 0, 2**22)
    step = jax.jit(
        contrastive_step.make_train_step(model, tx, schedule, 0.1, probe=probe),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=None if xla_defaults else conv.compiler_options(),
    )
    rng = np.random.default_rng(0)
    shape = (batch_size, image_size, image_size, 3)
    batch = sharding.host_to_global(
        {
            "view1": rng.random(shape, dtype=np.float32),
            "view2": rng.random(shape, dtype=np.float32),
            "label": np.zeros(batch_size, np.int32),
            "multi_instance": np.zeros(batch_size, bool),
        },
        mesh,
    )
    return step, state, batch


def median_step_seconds(step, state, batch, steps: int):
    """Median wall time of `steps` calls of step(state, batch), after one warm-up call.

    Returns:
      (seconds, the final state): the state is donated, so callers continue from it.
    """
    state, out = step(state, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, out = step(state, batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), state


def peak_bytes(compiled) -> float | None:
    """XLA's memory analysis of a compiled step: arguments + outputs + temporaries -
    aliased (donated) buffers; None where the backend has no analysis."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return float(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


def time_fn(fn, *args, repeats: int) -> float:
    """Median wall seconds of fn(*args) (blocked until ready) over `repeats` calls."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_flops_per_s(n: int, dtype: str) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    seconds = time_fn(jax.jit(jnp.matmul), a, b, repeats=5)
    return 2 * n**3 / seconds


def matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every convolution and dot in a (closed) jaxpr, sub-jaxprs included.

    What the fraction of the matmul rate compares against where XLA's cost
    analysis cannot count the step: jax 0.11 on CUDA analyses no lowered
    computation, and the compiled one's convolutions are cuDNN calls it does
    not count. Element-wise work is left out (a few percent of a ResNet's).
    """
    import math

    from jax.extend import core

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars)
            out = eqn.outvars[0].aval
            p = eqn.params
            dims = p["dimension_numbers"]
            # Multiply-adds per (image, output feature): input features x the
            # (output position, tap) pairs that read a real input element, not
            # padding or a hole of lhs dilation (a strided conv's input gradient).
            pairs = 1
            for i, (lo, _) in enumerate(p["padding"]):
                size = lhs.shape[dims.lhs_spec[2 + i]]
                taps = rhs.shape[dims.rhs_spec[2 + i]]
                outs = out.shape[dims.out_spec[2 + i]]
                a, b = p["lhs_dilation"][i], p["rhs_dilation"][i]
                s_ = p["window_strides"][i]
                pairs *= sum(
                    1
                    for o in range(outs)
                    for k in range(taps)
                    if 0 <= o * s_ + k * b - lo <= (size - 1) * a and (o * s_ + k * b - lo) % a == 0
                )
            images = lhs.shape[dims.lhs_spec[0]]
            features = out.shape[dims.out_spec[1]] * rhs.shape[dims.rhs_spec[1]]
            total += 2.0 * images * features * pairs / p["batch_group_count"]
        elif name == "dot_general":
            lhs = eqn.invars[0].aval
            (contract, _), _ = eqn.params["dimension_numbers"]
            out = eqn.outvars[0].aval
            total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
        elif name == "cond":
            # One branch runs (e.g. platform_dependent's per-platform lowerings).
            total += max(matmul_flops(b.jaxpr) for b in eqn.params["branches"])
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, core.ClosedJaxpr):
                    total += matmul_flops(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    total += matmul_flops(sub)
    return total
