"""Tests for micle_jax/data/augment/color.py: colour jitter (both impls) and grayscale.

Values are checked against NumPy / colorsys references; rates over a few
hundred seeds within about 4 binomial standard deviations.
"""

import colorsys
import math

import numpy as np
import pytest
import tensorflow as tf
from fixtures.augment_images import (
    N_SEEDS,
    binomial_tolerance,
    changed_fraction,
    make_op,
    map_over_seeds,
    rgb_image,
)

from micle_jax.data.augment import color, op_base


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_grayscale_rate_and_values(p):
    image = rgb_image(8, 10)
    outputs, rate = changed_fraction(make_op("grayscale", p=p), image)
    assert abs(rate - p) < binomial_tolerance(p)
    gray = image @ np.array([0.2989, 0.587, 0.114], np.float32)
    for out in outputs:
        if not np.array_equal(out, image):
            np.testing.assert_allclose(out, np.repeat(gray[..., None], 3, -1), atol=1e-4)


def test_color_jitter_rate():
    _, rate = changed_fraction(make_op("color_jitter", p=0.8), rgb_image(8, 10))
    assert abs(rate - 0.8) < binomial_tolerance(0.8)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_brightness_factor_range(strength):
    op = make_op("color_jitter", strength=strength, p=1.0, contrast=0, saturation=0, hue=0)
    image = np.full((4, 4, 3), 0.3, np.float32)  # 0.3 * 1.8 < 1: no clipping
    factors = map_over_seeds(lambda s: op(tf.constant(image), s)[0, 0, 0]) / 0.3
    lo, hi = 1 - 0.8 * strength, 1 + 0.8 * strength
    assert factors.min() >= lo - 1e-5 and factors.max() <= hi + 1e-5
    assert factors.min() < lo + 0.05 * (hi - lo) and factors.max() > hi - 0.05 * (hi - lo)
    assert abs(factors.mean() - 1.0) < 4 * (hi - lo) / math.sqrt(12 * N_SEEDS)


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_matches_numpy_reference_with_random_order(channels):
    # Brightness and contrast only: their order matters, and both orders must occur.
    op = make_op("color_jitter", strength=1.0, p=1.0, saturation=0, hue=0)
    image = rgb_image(6, 6, seed=3)[..., :channels]
    orders = set()
    for s in range(12):
        seed = tf.constant([s, 8])
        # The op's uniforms: one parameter per transform, then the order keys.
        u = op_base.draw_uniforms(seed, color.JITTER_UNIFORMS).numpy()
        b, c = 0.2 + 1.6 * u[0], 0.2 + 1.6 * u[1]
        keys = color.jitter_order(seed).numpy()
        np.testing.assert_array_equal(keys, u[4:8])

        def brightness(x, b=b):
            return np.clip(x * b, 0, 1)

        def contrast(x, c=c):
            mean = x.mean(axis=(0, 1), keepdims=True)
            return np.clip((x - mean) * c + mean, 0, 1)

        first_brightness = keys[0] < keys[1]
        orders.add(first_brightness)
        if first_brightness:
            expected = contrast(brightness(image))
        else:
            expected = brightness(contrast(image))
        np.testing.assert_allclose(op(tf.constant(image), seed).numpy(), expected, atol=1e-5)
    assert orders == {True, False}


def test_jitter_order_is_a_uniform_permutation():
    keys = map_over_seeds(color.jitter_order, n=480)
    perms = [tuple(np.argsort(k)) for k in keys]
    counts = np.array([perms.count(p) for p in set(perms)])
    assert len(counts) == 24  # every order occurs
    assert counts.max() < 20 + 4 * math.sqrt(20)


def hsv_hue(rgb):
    return colorsys.rgb_to_hsv(*rgb)[0]


def test_linear_hue_and_saturation_matrices():
    luma = np.array(color.LUMA, np.float32)
    for delta in (0.0, 0.05, -0.2, 0.5):
        m = color.hue_rotation_matrix(tf.constant(delta)).numpy()
        np.testing.assert_allclose(luma @ m, luma, atol=1e-5)  # brightness kept
        back = color.hue_rotation_matrix(tf.constant(-delta)).numpy()
        np.testing.assert_allclose(m @ back, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(color.hue_rotation_matrix(tf.constant(0.0)), np.eye(3), atol=1e-6)
    # Same direction as tf.image.adjust_hue: +delta turns red towards yellow and green.
    red = np.array([0.8, 0.2, 0.2], np.float32)
    for delta in (0.05, 0.1):
        turned = np.clip(color.hue_rotation_matrix(tf.constant(delta)).numpy() @ red, 0, 1)
        assert 0.5 * delta < hsv_hue(turned) < 1.6 * delta
    # Saturation: PIL's blend with luma; factor 0 is gray, 1 the identity.
    image = rgb_image(4, 5)
    s = color.saturation_matrix(tf.constant(1.7)).numpy()
    gray = (image @ luma)[..., None]
    np.testing.assert_allclose(image @ s.T, gray + 1.7 * (image - gray), atol=1e-5)
    np.testing.assert_allclose(color.saturation_matrix(tf.constant(1.0)), np.eye(3), atol=1e-6)


def hsv_map(image, fn):
    """Applies fn(h, s, v) -> (h, s, v) to every pixel of [h, w, 3] via colorsys."""
    pixels = [colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*px))) for px in image.reshape(-1, 3)]
    return np.array(pixels).reshape(image.shape)


REFERENCE_SATURATION = {
    "hsv": lambda x, f: hsv_map(x, lambda h, s, v: (h, min(s * f, 1.0), v)),
    "linear": lambda x, f: x @ color.saturation_matrix(tf.constant(f)).numpy().T,
}
REFERENCE_HUE = {
    "hsv": lambda x, d: hsv_map(x, lambda h, s, v: ((h + d) % 1.0, s, v)),
    "linear": lambda x, d: x @ color.hue_rotation_matrix(tf.constant(d)).numpy().T,
}


@pytest.mark.parametrize("impl", color.IMPLS)
def test_full_jitter_matches_numpy_reference(impl):
    image = rgb_image(5, 6, seed=7)
    op = make_op("color_jitter", strength=0.5, p=1.0, impl=impl)
    orders = set()
    for s in range(6):
        seed = tf.constant([s, 9])
        u = op_base.draw_uniforms(seed, color.JITTER_UNIFORMS).numpy()
        params = [0.6 + 0.8 * u[i] for i in range(3)] + [-0.1 + 0.2 * u[3]]
        steps = [
            lambda x, b: x * b,
            lambda x, c: (x - x.mean(axis=(0, 1))) * c + x.mean(axis=(0, 1)),
            REFERENCE_SATURATION[impl],
            REFERENCE_HUE[impl],
        ]
        order = tuple(np.argsort(color.jitter_order(seed).numpy()))
        orders.add(order)
        expected = image.astype(np.float64)
        for k in order:
            expected = np.clip(steps[k](expected, params[k]), 0, 1)
        np.testing.assert_allclose(op(tf.constant(image), seed), expected, atol=2e-4)
    assert len(orders) > 1


def test_to_gray_gives_one_luma_channel():
    image = (rgb_image(6, 7) * 255).astype(np.uint8)
    out = make_op("to_gray")(tf.constant(image), tf.constant([0, 0])).numpy()
    np.testing.assert_allclose(out[..., 0], image / 255 @ np.array(color.LUMA), atol=1e-5)
    gray = image[..., :1]
    kept = make_op("to_gray")(tf.constant(gray), tf.constant([0, 0]))
    assert kept.dtype == tf.uint8  # passed through: the crop converts only what it keeps
    np.testing.assert_array_equal(kept, gray)
