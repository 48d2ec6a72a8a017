"""The ResNets' convolution: XLA's own, but for patch matmuls where XLA:CPU is slow.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, so it
plugs into `flax.linen.Conv(conv_general_dilated=...)` and leaves parameters
and checkpoints as they are. Through `lax.platform_dependent`, a lowering for
the CPU computes an NHWC x HWIO convolution as one matmul of its patches (the
kh x kw shifted windows of the padded input side by side on the channel axis,
[B * Ho * Wo, kh * kw * Cin] @ [kh * kw * Cin, Cout]) wherever that was
measured faster (`_patch_matmul_faster`: 1x1 convolutions, kernels larger
than their output map), or, for stride-1 kernels with more taps than the map
has pixels (3x3 on 2x2), as one matmul with its dense Toeplitz kernel where
the batch is large enough (`toeplitz_matmul`, `_toeplitz_matmul_faster`);
every other platform, every other convolution and
every convolution outside that form (dilations, feature groups, other
layouts) gets `lax.conv_general_dilated` unchanged. An export lowered for
several platforms carries both.

Why on the CPU: where a 3x3 kernel meets a 2 px output map (the last block
group at 48-64 px), XLA's algebraic simplifier swaps the input-gradient
convolution's operands and the result falls back to XLA's naive loop
emitter (a ResNet-50 1x SimCLR step at 64 px, 32 pairs, spent 6.2 s of 11.9
s in five of them), and a 1x1 convolution is a matmul that XLA's kernel
gradient reaches through layout transposes. The rest run best as XLA's own
convolutions, not YNNPACK's, which `compiler_options()` selects for the
trainers' jitted steps. `benchmarks/cpu_convolutions.py` times the step both
ways (docs/performance.md).

Numerics: the same products summed in another order, so results agree with
XLA's convolution to float32 rounding (tests/test_conv.py), not bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")

_XLA_ONLY = contextvars.ContextVar("micle_jax_xla_convolutions", default=False)


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Within it, models traced use XLA's convolution (and max-pool) on the CPU too.

    For a program compiled on the CPU that stands for an accelerator's
    (micle_jax.plan's memory and FLOPs for a GPU or TPU slice). The choice is
    made when a function is traced, and jit's trace cache does not see this
    context: lower a step function built anew inside it, not a jitted one
    already traced outside it (which keeps its first trace, either way).
    """
    token = _XLA_ONLY.set(True)
    try:
        yield
    finally:
        _XLA_ONLY.reset(token)


def xla_only() -> bool:
    """Whether a model traced now is the accelerator's program (inside xla_convolutions)."""
    return _XLA_ONLY.get()


# XLA:CPU hands convolutions, dots and reductions to YNNPACK by default. Its
# convolutions ran on one of the 2 cores at the ResNets' shapes (the same time
# pinned to one core); XLA's own use both. Dots and reductions stay YNNPACK's:
# without them the BatchNorm sums fall back to slow reduce-windows.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """XLA options for jitting a model's steps on this process's default backend.

    On the CPU, CPU_COMPILER_OPTIONS: convolutions by XLA's own emitter, not
    YNNPACK's (the demo's training step 0.85x the time, ResNet-50 1x at 64 px
    0.89x, in one process alternating; docs/performance.md). None elsewhere,
    where XLA_FLAGS already sets the option (the user's choice stands) and
    for a jaxlib that does not know it (options of another version fail the
    compile).
    """
    if jax.default_backend() != "cpu":
        return None
    if any(name in os.environ.get("XLA_FLAGS", "") for name in CPU_COMPILER_OPTIONS):
        return None
    try:
        jax.jit(jnp.negative).lower(jnp.zeros(())).compile(compiler_options=CPU_COMPILER_OPTIONS)
    except jax.errors.JaxRuntimeError:
        return None
    return dict(CPU_COMPILER_OPTIONS)


def patch_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """An NHWC x HWIO convolution as a matmul of the input's patches.

    Args:
      lhs: [B, H, W, Cin] input.
      rhs: [kh, kw, Cin, Cout] kernel.
      window_strides: (sh, sw).
      padding: ((top, bottom), (left, right)), non-negative.

    Returns:
      [B, Ho, Wo, Cout], Ho = (H + top + bottom - kh) // sh + 1 (likewise Wo),
      what `lax.conv_general_dilated` returns for the same arguments.
    """
    kh, kw, cin, cout = rhs.shape
    (sh, sw), ((top, bottom), (left, right)) = window_strides, padding
    if (top, bottom, left, right) != (0, 0, 0, 0):
        lhs = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    windows, (out_h, out_w) = strided_windows(lhs, (kh, kw), (sh, sw))
    batch = lhs.shape[0]
    patches = jnp.concatenate(windows, axis=-1) if len(windows) > 1 else windows[0]
    out = jnp.dot(
        patches.reshape(batch * out_h * out_w, kh * kw * cin),
        rhs.reshape(kh * kw * cin, cout),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return out.reshape(batch, out_h, out_w, cout)


def toeplitz_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """An NHWC x HWIO convolution as one matmul with its Toeplitz (dense) kernel.

    [B, H * W * Cin] @ [H * W * Cin, Ho * Wo * Cout]: the dense kernel holds,
    for every input and output pixel, the tap joining them (zero where none
    does), built from `rhs` by a matmul with a constant 0/1 selection. For maps
    of fewer pixels than the kernel has taps (a 3x3 kernel on 2x2 maps) it
    multiplies H * W / (kh * kw) of the patches' work (4/9) and copies nothing.

    Args and returns: as `patch_matmul`.
    """
    batch, height, width, cin = lhs.shape
    kh, kw, _, cout = rhs.shape
    (sh, sw), ((top, _), (left, _)) = window_strides, padding
    out_h, out_w = _output_size(lhs.shape, rhs.shape, window_strides, padding)
    select = np.zeros((height * width, out_h * out_w, kh * kw), np.float32)
    for y, x, i, j in itertools.product(range(out_h), range(out_w), range(kh), range(kw)):
        row, col = y * sh + i - top, x * sw + j - left
        if 0 <= row < height and 0 <= col < width:
            select[row * width + col, y * out_w + x, i * kw + j] = 1
    dense = jnp.einsum(
        "pqk,kio->piqo", jnp.asarray(select, rhs.dtype), rhs.reshape(kh * kw, cin, cout)
    )
    out = jnp.dot(
        lhs.reshape(batch, height * width * cin),
        dense.reshape(height * width * cin, out_h * out_w * cout),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return out.reshape(batch, out_h, out_w, cout)


def strided_windows(x: jax.Array, window, strides) -> tuple[list[jax.Array], tuple[int, int]]:
    """The kh x kw strided windows of NHWC `x` (already padded), in row-major order.

    Returns:
      ([B, Ho, Wo, C] for each of the kh * kw window positions, (Ho, Wo)):
      window (i, j) holds x[:, i + sh * y, j + sw * z, :] at output (y, z).
    """
    (kh, kw), (sh, sw) = window, strides
    out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    windows = [
        x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return windows, (out_h, out_w)


def explicit_padding(lhs_shape, window, window_strides, padding):
    """((top, bottom), (left, right)) from lax's padding: a string or pairs."""
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(lhs_shape[1:3], window[:2], window_strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _output_size(lhs_shape, rhs_shape, window_strides, padding) -> tuple[int, int]:
    """(Ho, Wo) of an NHWC x HWIO convolution with explicit ((top, bottom), (left, right))."""
    (sh, sw), ((top, bottom), (left, right)) = window_strides, padding
    return (
        (lhs_shape[1] + top + bottom - rhs_shape[0]) // sh + 1,
        (lhs_shape[2] + left + right - rhs_shape[1]) // sw + 1,
    )


def _patch_matmul_applies(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups):
    """Whether the convolution is one patch_matmul computes: 2-D NHWC x HWIO,
    no dilation, one feature and batch group, no negative padding."""
    if lhs.ndim != 4 or rhs.ndim != 4 or groups != (1, 1):
        return False
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return False
    if any(p < 0 for pair in padding for p in pair):
        return False
    return lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, dimension_numbers
    ) == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)


def _patch_matmul_faster(lhs_shape, rhs_shape, window_strides, padding) -> bool:
    """Whether patches beat XLA:CPU's convolution, forward + backward, by measurement.

    Measured against XLA's own convolutions, as `compiler_options()` compiles
    them, on the 2-core machine (2026-12-03; forward + both gradients, batch
    256 at the demo's shapes and 64 at ResNet-50 1x's, patches / XLA time):
    1x1 convolutions 0.35-0.9 (the patch is the input itself; XLA transposes
    for the kernel gradient); kernels larger than the output map (3x3 on 2 px,
    strided onto 2 px) 0.02-0.31, where XLA's input gradient falls back to
    naive loops. Elsewhere XLA's: stride-1 3x3 on 3-16 px maps 0.8-4.5 (1.3-4.5
    below 4 px or 64 channels), the 7x7 stems 1.5-3.2, strided 3x3 onto 3-8 px
    maps 0.55-1.4, which as patches made the demo's whole step 14-27% slower.
    """
    kh, kw = rhs_shape[:2]
    if (kh, kw) == (1, 1):
        return True
    out_h, out_w = _output_size(lhs_shape, rhs_shape, window_strides, padding)
    return out_h < kh or out_w < kw


def _toeplitz_matmul_faster(lhs_shape, rhs_shape, window_strides) -> bool:
    """Whether the dense-kernel matmul beats patches (where patches beat XLA), by measurement.

    Stride-1 kernels with more taps than the map has pixels (3x3 on 2x2 maps),
    forward + both gradients, 2-core machine (2026-12-03), Toeplitz / patch
    time: 0.46-0.83 with a batch of at least half the input channels (batch
    64-512, 64-512 channels), 1.5-2.8 below (batch 32-64, 512 channels),
    where the dense kernel (16 x Cin x Cout) outweighs the batch's work. A
    symbolic batch (a shape-polymorphic export) gets patches.
    """
    kh, kw = rhs_shape[:2]
    return (
        isinstance(lhs_shape[0], int)
        and all(s == 1 for s in window_strides)
        and lhs_shape[1] * lhs_shape[2] < kh * kw
        and 2 * lhs_shape[0] >= lhs_shape[3]
    )


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """`lax.conv_general_dilated`, lowered to patch_matmul on the CPU where it applies."""
    xla = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if dimension_numbers is None or lhs.ndim != 4 or xla_only():
        return xla(lhs, rhs)
    pads = explicit_padding(lhs.shape, rhs.shape, tuple(window_strides), padding)
    groups = (feature_group_count, batch_group_count)
    if not _patch_matmul_applies(
        lhs, rhs, pads, lhs_dilation, rhs_dilation, dimension_numbers, groups
    ) or not _patch_matmul_faster(lhs.shape, rhs.shape, tuple(window_strides), pads):
        return xla(lhs, rhs)
    dense = _toeplitz_matmul_faster(lhs.shape, rhs.shape, tuple(window_strides))
    cpu = functools.partial(
        toeplitz_matmul if dense else patch_matmul,
        window_strides=tuple(window_strides),
        padding=pads,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=xla)
