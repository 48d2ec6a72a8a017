"""benchmarks/common.matmul_flops: the FLOP count gpu_check.sh divides by, against XLA's."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from common import matmul_flops  # noqa: E402


@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [
        ((4, 14, 14, 8), (3, 3, 8, 16), 2, "SAME"),  # input gradient: lhs dilation holes
        ((4, 7, 7, 16), (3, 3, 16, 16), 1, "SAME"),  # padding is a large share of the taps
        ((4, 9, 9, 8), (1, 1, 8, 32), 2, "VALID"),
        ((2, 12, 12, 3), (7, 7, 3, 8), 2, ((3, 3), (3, 3))),
    ],
)
def test_conv_and_both_gradients_count_as_xla_counts(shape, kernel, stride, padding):
    def loss(x, w, d):
        y = jax.lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.vdot(y.reshape(y.shape[0], -1), d).real

    x = jnp.ones(shape)
    w = jnp.ones(kernel)
    y_shape = jax.eval_shape(
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        x,
        w,
    ).shape
    d = jnp.ones((y_shape[0], y_shape[1] * y_shape[2] * y_shape[3]))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))  # the forward conv too
    counted = matmul_flops(f.trace(x, w, d).jaxpr.jaxpr)
    xla = f.lower(x, w, d).cost_analysis()["flops"]
    # XLA also counts the element-wise work (the dot with d, a few adds).
    assert counted == pytest.approx(xla, rel=0.05)
    assert counted <= xla


def test_only_one_branch_of_a_cond_counts():
    a = jnp.ones((64, 64))

    def f(i, a):
        return jax.lax.cond(i > 0, lambda a: a @ a, lambda a: (a @ a) @ a, a)

    counted = matmul_flops(jax.make_jaxpr(f)(1, a).jaxpr)
    assert counted == 2 * 2 * 64**3  # the larger branch, two matmuls; not three
