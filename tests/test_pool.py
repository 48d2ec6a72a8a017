"""Tests for micle_jax/models/pool.py: the CPU max-pool equals flax's, values and
gradients (ties included), and is what the CPU lowering of the ResNet stem runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from lowering_util import lowered, resnet_grad_lowerings

from micle_jax.models import conv, pool, resnet


def _post_relu(shape, seed=0, dtype=jnp.float32):
    """ReLU outputs as the stem's max-pool sees them: half zeros (ties in most windows),
    and a few repeated positive values (ties between positives)."""
    x = np.maximum(np.random.default_rng(seed).normal(size=shape), 0.0)
    x[..., ::3, ::2, :] = np.round(x[..., ::3, ::2, :], 1)
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize(
    "shape,window,strides,padding",
    [
        ((2, 12, 12, 4), (3, 3), (2, 2), "SAME"),  # the ResNet stem's
        ((2, 11, 9, 3), (3, 3), (2, 2), "SAME"),  # odd sizes: asymmetric SAME padding
        ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),  # windows that do not overlap
        ((2, 7, 7, 2), (3, 3), (1, 1), ((1, 1), (1, 1))),  # stride 1, explicit padding
        ((1, 6, 9, 2), (3, 2), (2, 3), ((0, 2), (1, 0))),  # asymmetric everything
        ((2, 2, 2, 3), (3, 3), (2, 2), "SAME"),  # a window larger than the map
    ],
)
def test_max_pool_equals_flax_values_and_gradients(shape, window, strides, padding):
    x = _post_relu(shape)

    def ours(x):
        return pool.max_pool(x, window, strides=strides, padding=padding)

    def flax(x):
        return nn.max_pool(x, window, strides=strides, padding=padding)

    want = flax(x)
    np.testing.assert_array_equal(jax.jit(ours)(x), want)
    # A random cotangent: the gradient of <pool(x), t> goes, per output, to the first
    # position of its window holding the maximum, as XLA's select-and-scatter sends it.
    t = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ours(x) * t)))(x)
    np.testing.assert_allclose(grad, jax.grad(lambda x: jnp.sum(flax(x) * t))(x), atol=1e-6)


def test_forward_mode_inside_xla_convolutions_equals_flax():
    """jax.jvp through the model on the CPU: the custom VJP has no JVP, flax's has."""
    x = _post_relu((2, 12, 12, 4))
    t = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

    def ours(x):
        return pool.max_pool(x, (3, 3), (2, 2), "SAME")

    with conv.xla_convolutions():
        out, tangent = jax.jit(lambda x, t: jax.jvp(ours, (x,), (t,)))(x, t)
    want_out, want_tangent = jax.jvp(lambda x: nn.max_pool(x, (3, 3), (2, 2), "SAME"), (x,), (t,))
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(tangent, want_tangent)


def test_bfloat16_keeps_its_dtype_and_values():
    x = _post_relu((2, 10, 10, 4), dtype=jnp.bfloat16)
    got = jax.jit(lambda x: pool.max_pool(x, (3, 3), (2, 2), "SAME"))(x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, nn.max_pool(x, (3, 3), (2, 2), "SAME"))


def _pool_grad(x):
    return jax.grad(lambda x: jnp.sum(pool.max_pool(x, (3, 3), (2, 2), "SAME") ** 2))(x)


def test_cpu_lowering_has_no_select_and_scatter_other_platforms_keep_it():
    x = _post_relu((2, 12, 12, 4))
    cpu = lowered(_pool_grad, x)
    assert "select_and_scatter" not in cpu and "reduce_window" not in cpu
    for platform in ("cuda", "tpu"):
        assert "stablehlo.select_and_scatter" in lowered(_pool_grad, x, platforms=(platform,))
    with conv.xla_convolutions():  # the accelerator's program, lowered on the CPU
        # (a function jit has not traced yet: its trace cache does not see the context)
        assert "stablehlo.select_and_scatter" in lowered(lambda x: _pool_grad(x), x)


def test_integers_and_negative_padding_stay_flax():
    ints = jnp.arange(2 * 6 * 6 * 2, dtype=jnp.int32).reshape(2, 6, 6, 2)
    assert "reduce_window" in lowered(lambda x: pool.max_pool(x, (3, 3), (2, 2), "SAME"), ints)
    x = _post_relu((2, 6, 6, 2))

    def cropped(x):
        return pool.max_pool(x, (2, 2), (1, 1), ((-1, 0), (0, 0)))

    assert "reduce_window" in lowered(cropped, x)
    np.testing.assert_array_equal(cropped(x), nn.max_pool(x, (2, 2), (1, 1), ((-1, 0), (0, 0))))


def test_resnet_stem_cpu_gradient_has_no_select_and_scatter():
    model = resnet.ResNet(depth=18, width_multiplier=0.25)
    text = resnet_grad_lowerings(model, (2, 48, 48, 3))
    assert "select_and_scatter" not in text["cpu"]
    assert text["cuda"].count("stablehlo.select_and_scatter") == 1
