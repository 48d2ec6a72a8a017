"""Tests for micle_jax/models/conv.py: patch matmuls equal XLA's convolution,
values and gradients, and are what the CPU lowering of the ResNets runs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax
from lowering_util import lowered, resnet_grad_lowerings

from micle_jax.models import conv, resnet

DN = ("NHWC", "HWIO", "NHWC")


def _xla(x, k, strides, padding):
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)


def _inputs(shape, kernel_shape, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=shape), jnp.float32),
        jnp.asarray(
            rng.normal(size=kernel_shape) / np.sqrt(np.prod(kernel_shape[:3])), jnp.float32
        ),
    )


@pytest.mark.parametrize(
    "shape,kernel,strides,padding",
    [
        ((2, 9, 7, 5), (3, 3, 5, 6), (1, 1), ((1, 1), (1, 1))),  # odd sizes
        ((2, 9, 7, 5), (3, 3, 5, 6), (2, 2), ((1, 1), (1, 1))),  # strided, SimCLR's fixed padding
        ((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), ((0, 0), (0, 0))),  # strided projection shortcut
        ((2, 8, 8, 4), (1, 1, 4, 8), (1, 1), ((0, 0), (0, 0))),  # plain matmul
        ((2, 11, 10, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),  # the stem
        ((3, 2, 2, 6), (3, 3, 6, 5), (1, 1), ((1, 1), (1, 1))),  # kernel larger than the map
        ((3, 1, 1, 6), (3, 3, 6, 5), (1, 1), ((1, 1), (1, 1))),  # 1x1 map (32 px, group 4)
        ((2, 6, 5, 3), (2, 3, 3, 4), (1, 2), ((0, 1), (2, 0))),  # asymmetric everything
        ((2, 6, 6, 3), (3, 3, 3, 4), (1, 1), "SAME"),  # string padding
    ],
)
def test_patch_matmul_equals_xla_convolution_and_its_gradients(shape, kernel, strides, padding):
    x, k = _inputs(shape, kernel)
    # A random cotangent: the gradients of <conv(x, k), t> with respect to x and k.
    t = jnp.asarray(np.random.default_rng(1).normal(size=_xla(x, k, strides, padding).shape))

    def loss(fn):
        return lambda x, k: jnp.sum(fn(x, k) * t)

    pads = ((1, 1), (1, 1)) if padding == "SAME" else padding
    ours = lambda x, k: conv.patch_matmul(x, k, strides, pads)  # noqa: E731
    xla = lambda x, k: _xla(x, k, strides, padding)  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(x, k), xla(x, k), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(loss(ours), (0, 1)))(x, k)
    expected = jax.grad(loss(xla), (0, 1))(x, k)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,kernel,strides,padding",
    [
        ((3, 2, 2, 6), (3, 3, 6, 5), (1, 1), ((1, 1), (1, 1))),  # 3x3 on 2 px (group 4)
        ((3, 1, 1, 6), (3, 3, 6, 5), (1, 1), ((1, 1), (1, 1))),  # 1x1 map: the centre tap
        ((2, 2, 3, 4), (3, 2, 4, 3), (1, 1), ((2, 0), (0, 1))),  # asymmetric everything
        ((2, 3, 3, 4), (3, 3, 4, 5), (2, 2), ((1, 1), (1, 1))),  # strided
    ],
)
def test_toeplitz_matmul_equals_xla_convolution_and_its_gradients(shape, kernel, strides, padding):
    x, k = _inputs(shape, kernel)
    t = jnp.asarray(np.random.default_rng(1).normal(size=_xla(x, k, strides, padding).shape))
    ours = lambda x, k: conv.toeplitz_matmul(x, k, strides, padding)  # noqa: E731
    xla = lambda x, k: _xla(x, k, strides, padding)  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(x, k), xla(x, k), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda x, k: jnp.sum(ours(x, k) * t), (0, 1)))(x, k)
    expected = jax.grad(lambda x, k: jnp.sum(xla(x, k) * t), (0, 1))(x, k)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,toeplitz",
    [
        ((8, 2, 2, 16), True),  # 3x3 on 2 px, batch >= half the channels
        ((8, 2, 2, 32), False),  # the dense kernel outweighs the batch: patches
        ((8, 4, 4, 8), False),  # more pixels than taps: XLA's convolution
    ],
)
def test_cpu_lowering_of_a_kernel_larger_than_the_map(shape, toeplitz):
    x, k = _inputs(shape, (3, 3, shape[3], 4))

    def f(x, k):
        return conv.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)

    text = lowered(f, x, k)
    if shape[1] * shape[2] >= 9:
        assert "convolution" in text
    else:
        # patches are 9 windows side by side; the dense kernel copies nothing
        assert "convolution" not in text and ("concatenate" not in text) == toeplitz
    np.testing.assert_allclose(jax.jit(f)(x, k), _xla(x, k, (1, 1), ((1, 1),) * 2), 1e-5, 1e-5)


@pytest.mark.parametrize(
    "shape,kernel,strides,patches",
    [
        ((2, 8, 8, 4), (1, 1, 4, 8), (1, 1), True),  # 1x1
        ((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), True),  # strided 1x1 (projection shortcut)
        ((2, 2, 2, 4), (3, 3, 4, 8), (1, 1), True),  # kernel larger than the 2 px map
        ((2, 4, 4, 4), (3, 3, 4, 8), (2, 2), True),  # strided onto a 2 px map
        ((2, 6, 6, 4), (3, 3, 4, 8), (2, 2), False),  # strided onto 3 px: XLA's
        ((2, 3, 3, 64), (3, 3, 64, 8), (1, 1), False),  # 3 px: the kernel fits
        ((2, 16, 16, 64), (3, 3, 64, 8), (1, 1), False),  # 16 px, 64 channels
        ((2, 32, 32, 3), (7, 7, 3, 64), (2, 2), False),  # ResNet-50 1x stem
        ((2, 12, 12, 3), (7, 7, 3, 16), (2, 2), True),  # a stem onto 6 px maps
    ],
)
def test_cpu_lowering_is_patch_matmul_where_measured_faster(shape, kernel, strides, patches):
    x, k = _inputs(shape, kernel)

    pad = (kernel[0] - 1) // 2
    pads = ((pad, pad), (pad, pad))

    def f(x, k):
        return conv.conv_general_dilated(x, k, strides, pads, dimension_numbers=DN)

    grads = jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2), (0, 1))
    assert ("convolution" not in lowered(f, x, k)) == patches
    assert ("convolution" not in lowered(grads, x, k)) == patches
    for platform in ("cuda", "tpu"):
        assert "stablehlo.convolution" in lowered(f, x, k, platforms=(platform,))
    np.testing.assert_allclose(jax.jit(f)(x, k), _xla(x, k, strides, pads), 1e-5, 1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rhs_dilation=(2, 2)),
        dict(lhs_dilation=(2, 2)),
        dict(feature_group_count=3, kernel=(3, 3, 1, 6)),
        dict(padding=((-1, 0), (0, 0))),
        dict(dimension_numbers=("NCHW", "OIHW", "NCHW"), shape=(2, 3, 6, 6), kernel=(4, 3, 3, 3)),
    ],
)
def test_other_convolutions_stay_xla_convolutions(kwargs):
    shape, kernel = kwargs.pop("shape", (2, 6, 6, 3)), kwargs.pop("kernel", (3, 3, 3, 4))
    padding = kwargs.pop("padding", ((1, 1), (1, 1)))
    dn = kwargs.pop("dimension_numbers", DN)
    x, k = _inputs(shape, kernel)

    def ours(x, k):
        return conv.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=dn, **kwargs)

    def xla(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=dn, **kwargs)

    assert "stablehlo.convolution" in lowered(ours, x, k)
    np.testing.assert_array_equal(jax.jit(ours)(x, k), jax.jit(xla)(x, k))


def test_resnet50_cpu_training_step_keeps_only_the_convolutions_xla_runs_well():
    # ResNet-50 1x at 64 px: of its 53 convolutions the 36 1x1 ones and the three
    # 3x3 ones onto 2 px maps (block group 4) are patch matmuls on the CPU; the stem
    # (forward and kernel gradient) and the 13 other 3x3 ones (each with its two
    # gradients) stay XLA convolutions. Everywhere else (a GPU) all 53 are, with
    # both gradients but the stem's input one.
    model = resnet.ResNet(depth=50, width_multiplier=1)
    text = resnet_grad_lowerings(model, (2, 64, 64, 3))
    cpu, cuda = text["cpu"], text["cuda"]
    assert cpu.count("stablehlo.convolution") == 2 + 3 * 13
    assert cuda.count("stablehlo.convolution") == 3 * 53 - 1


def _ynn_fused_ops(compiled_text: str) -> set[str]:
    """The kinds of heavy ops (convolution, dot, reduce) XLA:CPU handed to YNNPACK."""
    bodies = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", compiled_text, re.S | re.M))
    ops = set()
    for callee in re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", compiled_text):
        ops |= set(re.findall(r"= \S+ (convolution|dot|reduce)\(", bodies.get(callee, "")))
    return ops


def test_compiler_options_keep_convolutions_out_of_ynnpack_and_dots_in():
    model = resnet.ResNet(depth=18, width_multiplier=0.25)
    images = jnp.zeros((4, 32, 32, 3))
    variables = model.init(jax.random.key(0), images, train=False)

    def loss(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(out**2)

    options = conv.compiler_options()
    assert options == conv.CPU_COMPILER_OPTIONS
    ours = jax.jit(jax.grad(loss), compiler_options=options).lower(variables["params"])
    default = jax.jit(jax.grad(loss)).lower(variables["params"])
    # XLA's default hands the convolutions to YNNPACK, which runs them on one core.
    assert "convolution" in _ynn_fused_ops(default.compile().as_text())
    assert _ynn_fused_ops(ours.compile().as_text()) == {"dot", "reduce"}


def test_compiler_options_leave_a_users_xla_flags_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    conv.compiler_options.cache_clear()
    try:
        assert conv.compiler_options() is None
    finally:
        monkeypatch.undo()
        conv.compiler_options.cache_clear()
    assert conv.compiler_options() == conv.CPU_COMPILER_OPTIONS


def test_flax_conv_with_patch_matmul_keeps_parameters_and_outputs():
    x, _ = _inputs((2, 9, 9, 3), (3, 3, 3, 4))
    plain = nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)
    ours = plain.clone(conv_general_dilated=conv.conv_general_dilated)
    params = plain.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, params
    )
    np.testing.assert_allclose(
        jax.jit(ours.apply)(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-5
    )
