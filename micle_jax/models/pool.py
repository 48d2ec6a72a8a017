"""The ResNet stem's max-pool: XLA's own on GPUs and TPUs, windows and masks on the CPU.

`max_pool` takes `flax.linen.max_pool`'s arguments and computes the same
values. Through `lax.platform_dependent`, a lowering for the CPU takes the
maximum of the kh x kw strided windows of the (-inf padded) input and
differentiates it with its own VJP: the gradient of each output goes to the
first window position (in row-major window order) that holds the maximum,
as XLA's select-and-scatter does, as a sum of interior-padded masks that
XLA fuses into one loop. (A custom JVP instead, whose transpose JAX
derives, gives the same gradients and would allow forward mode, but made
the demo's step 10% slower than this VJP: 342 against 310 ms, alternating in
one process. Forward-mode autodiff through the CPU model, jax.jvp or
jax.jacfwd, needs `conv.xla_convolutions()` around the tracing.) Every
other platform gets `nn.max_pool` (reduce-window, select-and-scatter), and
so does every lowering inside `conv.xla_convolutions()` (the accelerator's
program).

Why on the CPU: XLA:CPU runs select-and-scatter as per-element index
arithmetic. In the demo's step (ResNet-18 0.25x, 48 px, 128 pairs) the stem
max-pool's backward took 41 ms of a 273 ms profile, on the 2-core
development machine; this VJP takes 8.5 ms on the same [256, 24, 24, 16]
input (docs/performance.md). Gradients agree with select-and-scatter's to
float32 rounding (a position that is the first maximum of two overlapping
windows sums their gradients in another order; tests/test_pool.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from micle_jax.models import conv


def max_pool(
    x: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """`nn.max_pool` over the two spatial axes of NHWC `x`, lowered for the CPU as above."""
    window, strides = tuple(window_shape), tuple(strides or (1,) * len(window_shape))
    xla = functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding)
    if (
        x.ndim != 4
        or len(window) != 2
        or not jnp.issubdtype(x.dtype, jnp.floating)
        or conv.xla_only()
    ):
        return xla(x)
    spatial = conv.explicit_padding(x.shape, window, strides, padding)
    if len(spatial) != 2 or min(min(p) for p in spatial) < 0:
        return xla(x)
    pads = ((0, 0), *spatial, (0, 0))
    cpu = functools.partial(_window_max, window=window, strides=strides, pads=pads)
    return lax.platform_dependent(x, cpu=cpu, default=xla)


def _windows(x, window, strides, pads) -> tuple[jax.Array, list[jax.Array], tuple[int, int]]:
    """(x padded with -inf, its strided windows in row-major order, (Ho, Wo))."""
    padded = jnp.pad(x, pads, constant_values=-jnp.inf)
    return (padded, *conv.strided_windows(padded, window, strides))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _window_max(x, window, strides, pads):
    _, views, _ = _windows(x, window, strides, pads)
    return functools.reduce(jnp.maximum, views)


def _window_max_fwd(x, window, strides, pads):
    out = _window_max(x, window, strides, pads)
    return out, (x, out)


def _window_max_bwd(window, strides, pads, residuals, g):
    x, out = residuals
    padded, views, out_hw = _windows(x, window, strides, pads)
    free = jnp.ones(out.shape, bool)  # outputs whose maximum is not yet assigned
    grad = jnp.zeros_like(padded)
    zero = jnp.zeros((), g.dtype)
    for k, view in enumerate(views):
        i, j = divmod(k, window[1])
        hit = free & (view == out)
        free = free & ~hit
        # The transpose of the strided slice: interior padding between the outputs.
        config = [(0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)]
        for axis, offset in ((1, i), (2, j)):
            span = strides[axis - 1] * (out_hw[axis - 1] - 1) + 1
            config[axis] = (offset, padded.shape[axis] - offset - span, strides[axis - 1] - 1)
        grad = grad + lax.pad(jnp.where(hit, g, zero), zero, config)
    (_, _), (top, bottom), (left, right), _ = pads
    h, w = padded.shape[1:3]
    return (grad[:, top : h - bottom, left : w - right, :],)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)
