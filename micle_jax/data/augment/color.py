"""Colour augmentation ops: colour jitter, grayscale.

Each `make_*` function checks its arguments (ValueError naming the fix) and
returns an `op_base.RandomOp` (`op(image, seed)`) on one float32 image [h, w, c] in
[0, 1], c in {1, 3}. Ops keep the channel count: a 1-channel (grayscale)
image stays 1-channel and skips saturation and hue, which are the identity
on gray pixels, so chest X-rays pay for one channel only.

Per-pixel linear colour maps are one [h*w, 3] x [3, 3] matmul: on one CPU
core this is ~7x cheaper at 224 px than tf.image's fused HSV kernels or than
broadcasting per-channel products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from micle_jax.data.augment import op_base

# ITU-R 601 luma, the weights of tf.image.rgb_to_grayscale.
LUMA = (0.2989, 0.587, 0.114)
# RGB -> YIQ (NTSC) with the luma row above; I and Q span the chroma plane.
_RGB_TO_YIQ = np.array([LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
IMPLS = ("hsv", "linear")

# Jitter uniforms: 0-3 the transforms' parameters (index in TRANSFORM_NAMES,
# fixed, so a factor does not depend on which other transforms are enabled or
# on the channel count), 4-7 their order keys, 8 the coin for p.
_ORDER = slice(4, 8)
_COIN = 8
JITTER_UNIFORMS = 9


def apply_color_matrix(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Per-pixel linear colour map out = matrix @ rgb: [h, w, 3], [k, 3] -> [h, w, k]."""
    flat = tf.matmul(tf.reshape(image, [-1, 3]), matrix, transpose_b=True)
    out = tf.reshape(flat, tf.concat([tf.shape(image)[:2], [tf.shape(matrix)[0]]], 0))
    out.set_shape(image.shape[:2].concatenate([matrix.shape[0]]))
    return out


def saturation_matrix(factor: tf.Tensor) -> tf.Tensor:
    """[3, 3] matrix of luma + factor * (rgb - luma): PIL's/torchvision's saturation."""
    luma = tf.constant([LUMA] * 3, tf.float32)
    return factor * tf.eye(3) + (1.0 - factor) * luma


def hue_rotation_matrix(delta: tf.Tensor) -> tf.Tensor:
    """[3, 3] matrix turning the chroma (I, Q) plane by delta turns, keeping luma.

    The sign follows tf.image.adjust_hue: +delta moves red towards yellow and green.
    """
    angle = -2.0 * math.pi * delta
    cos, sin = tf.cos(angle), tf.sin(angle)
    zero, one = tf.zeros_like(cos), tf.ones_like(cos)
    rotation = tf.reshape(tf.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos]), [3, 3])
    return tf.constant(_YIQ_TO_RGB, tf.float32) @ rotation @ tf.constant(_RGB_TO_YIQ, tf.float32)


def _factor(u, strength):
    # A multiplicative factor in [max(1 - s, 0), 1 + s], as SimCLR's brightness
    # (impl 'simclrv2'), contrast and saturation; kept >= 0 for strengths > 1.
    return op_base.between(u, max(1.0 - strength, 0.0), 1.0 + strength)


def _hue_delta(u, strength):
    return op_base.between(u, -strength, strength)


class _Transform(NamedTuple):
    """One jitter transform: its parameter is `sample(u, strength)` for its uniform u."""

    needs_colour: bool  # the identity on gray pixels: skipped on 1-channel images
    sample: Callable
    apply: dict  # impl -> fn(image [h, w, c], param) -> image


def _brightness(image, factor):
    return image * factor


_TRANSFORMS = {
    "brightness": _Transform(False, _factor, dict(hsv=_brightness, linear=_brightness)),
    # tf.image.adjust_contrast: (x - mean) * f + mean, per channel.
    "contrast": _Transform(
        False, _factor, dict(hsv=tf.image.adjust_contrast, linear=tf.image.adjust_contrast)
    ),
    "saturation": _Transform(
        True,
        _factor,
        dict(
            hsv=tf.image.adjust_saturation,
            linear=lambda x, f: apply_color_matrix(x, saturation_matrix(f)),
        ),
    ),
    "hue": _Transform(
        True,
        _hue_delta,
        dict(
            hsv=tf.image.adjust_hue,
            linear=lambda x, d: apply_color_matrix(x, hue_rotation_matrix(d)),
        ),
    ),
}
TRANSFORM_NAMES = tuple(_TRANSFORMS)  # uniform index = position in this tuple


def jitter_order(seed: tf.Tensor) -> tf.Tensor:
    """Sort keys of the jitter transforms (brightness, contrast, saturation, hue).

    Those of color_jitter called with `seed`. Enabled transforms run in
    increasing key order. One uniform key per transform, so the relative
    order of two transforms is the same whatever else is enabled.

    Returns:
      [4] float32 sort keys.
    """
    return op_base.draw_uniforms(seed, JITTER_UNIFORMS)[_ORDER]


def _gray_jitter(image, names, params, ranks):
    """Brightness and contrast on [h, w, 1] as x -> clip(a x + b mean(x)), no control flow.

    On one channel both are scalar affine maps, so each position picks its
    (a, b) by index; on 3 channels broadcasting a per-channel mean is slower
    than the tf.switch_case this avoids.
    """
    scales = tf.stack(params)
    mean_weights = tf.stack(
        [1.0 - f if n == "contrast" else 0.0 for n, f in zip(names, params, strict=True)]
    )
    uses_mean = "contrast" in names
    for position in range(len(names)):
        k = ranks[position]
        out = image * tf.gather(scales, k)
        if uses_mean:
            out = out + tf.gather(mean_weights, k) * tf.reduce_mean(image)
        image = tf.clip_by_value(out, 0.0, 1.0)
    return image


def make_color_jitter(
    strength: float = 1.0,
    p: float = 0.8,
    brightness: float = 0.8,
    contrast: float = 0.8,
    saturation: float = 0.8,
    hue: float = 0.2,
    random_order: bool = True,
    impl: str = "hsv",
) -> op_base.Op:
    """SimCLR's colour jitter, applied with probability p (SimCLR: 0.8).

    The transforms' maximum strengths are `strength` times brightness 0.8,
    contrast 0.8, saturation 0.8 and hue 0.2 (SimCLR's color_jitter). They
    run in random order (SimCLR's color_jitter_rand) or in that fixed order,
    and the image is clipped to [0, 1] after each, as SimCLR does. A
    component of strength 0 is skipped. Saturation and hue are skipped on
    1-channel images, where they are the identity.

    Uniforms (JITTER_UNIFORMS): one parameter per transform in TRANSFORM_NAMES
    order, the four order keys (`jitter_order`), the coin for p.

    impl: 'hsv' is SimCLR's (tf.image.adjust_saturation / adjust_hue in HSV
    space); 'linear' uses 3x3 colour matrices instead (saturation as a blend
    with luma, as PIL and torchvision; hue as a turn of YIQ chroma), several
    times cheaper on RGB views, with similar but not identical colours.
    """
    op = "color_jitter"
    strength = op_base.check_nonnegative(op, "strength", strength)
    p = op_base.check_probability(op, "p", p)
    maxima = {
        name: op_base.check_nonnegative(op, name, value) * strength
        for name, value in dict(
            brightness=brightness, contrast=contrast, saturation=saturation, hue=hue
        ).items()
    }
    if maxima["hue"] > 0.5:
        raise ValueError(
            f"augment op {op!r}: hue * strength = {maxima['hue']} must be <= 0.5 "
            "(a hue shift of 0.5 is already half the colour circle)"
        )
    if not isinstance(random_order, bool):
        raise ValueError(f"augment op {op!r}: random_order={random_order!r} must be True or False")
    impl = op_base.check_choice(op, "impl", impl, IMPLS)

    def jitter(image, u):
        channels = image.shape[-1]
        active = [
            (index, name)
            for index, name in enumerate(TRANSFORM_NAMES)
            if maxima[name] > 0 and (channels == 3 or not _TRANSFORMS[name].needs_colour)
        ]
        if not active:
            return image
        names = [name for _, name in active]
        params = [_TRANSFORMS[name].sample(u[index], maxima[name]) for index, name in active]
        if random_order:
            ranks = tf.argsort(tf.gather(u[_ORDER], [index for index, _ in active]))
        else:
            ranks = list(range(len(active)))
        if channels == 1:
            return _gray_jitter(image, names, params, ranks)

        branches = [
            lambda x, fn=_TRANSFORMS[name].apply[impl], param=param: tf.clip_by_value(
                fn(x, param), 0.0, 1.0
            )
            for name, param in zip(names, params, strict=True)
        ]
        shape = image.shape
        for position in range(len(active)):
            if random_order:
                # Each executed Case costs ~0.15 ms in tf.data; on 3 channels that
                # is still less than selecting arithmetically (see _gray_jitter).
                image = tf.switch_case(
                    ranks[position], [lambda b=b, x=image: b(x) for b in branches]
                )
            else:
                image = branches[position](image)
            image.set_shape(shape)
        return image

    def color_jitter(image, u):
        image = op_base.to_unit_float(image)
        out = op_base.random_apply(lambda x: jitter(x, u), p, image, u[_COIN])
        out.set_shape(image.shape)
        return out

    return op_base.RandomOp(color_jitter, JITTER_UNIFORMS, op)


def make_grayscale(p: float = 0.2) -> op_base.Op:
    """Converts to gray with probability p (SimCLR: 0.2), keeping the channel count; one uniform.

    ITU-R 601 luma (`LUMA`, as tf.image.rgb_to_grayscale), copied to the 3 channels as
    SimCLR's to_grayscale(keep_channels=True). The identity on 1-channel images.
    """
    p = op_base.check_probability("grayscale", "p", p)

    def to_gray(image):
        return apply_color_matrix(image, tf.constant([LUMA] * 3, tf.float32))

    def grayscale(image, u):
        image = op_base.to_unit_float(image)
        if image.shape[-1] != 3:
            return image
        out = op_base.random_apply(to_gray, p, image, u[0])
        out.set_shape(image.shape)
        return out

    return op_base.RandomOp(grayscale, 1, "grayscale")


def make_to_gray() -> op_base.Op:
    """Always converts to one gray channel [h, w, 1] (ITU-R 601 luma); 1-channel input is kept.

    For gray modalities (chest X-ray), first in the policy: later ops then work
    on one channel, and the policy's output still has 3 identical channels.
    1-channel input passes through in its own dtype, so a later crop can still
    skip converting the whole image.
    """

    def to_gray(image, u):
        del u
        if image.shape[-1] == 1:
            return image
        # Cast and fold the 1 / dtype max into the luma weights: one pass, not two.
        scale = 1.0 / image.dtype.max if image.dtype.is_integer else 1.0
        weights = tf.constant([[w * scale for w in LUMA]], tf.float32)
        return apply_color_matrix(tf.cast(image, tf.float32), weights)

    return op_base.RandomOp(to_gray, 0, "to_gray")
