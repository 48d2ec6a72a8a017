"""Tests for micle_jax/data/augment/blur.py: the Gaussian blur against scipy, its rate and sigma."""

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
from fixtures.augment_images import (
    binomial_tolerance,
    changed_fraction,
    make_op,
    map_over_seeds,
    rgb_image,
)

from micle_jax.data.augment import blur


@pytest.mark.parametrize("channels", [1, 3])
def test_blur_matches_scipy(channels):
    image = rgb_image(64, 40)[..., :channels]
    op = make_op("gaussian_blur", p=1.0, sigma_range=(1.5, 1.5), kernel_fraction=0.2)
    radius = blur.blur_radius(64, 0.2)
    assert radius == 6
    expected = scipy.ndimage.gaussian_filter(
        image, sigma=(1.5, 1.5, 0), mode="mirror", radius=(radius, radius, 0)
    )
    seed = tf.constant([0, 0])
    np.testing.assert_allclose(op(tf.constant(image), seed), expected, atol=1e-5)
    # Same result when the image size is only known at run time.
    signature = [tf.TensorSpec([None, None, channels]), tf.TensorSpec([2], tf.int32)]
    dynamic = tf.function(op, input_signature=signature)
    np.testing.assert_allclose(dynamic(image, seed), expected, atol=1e-5)
    # A radius (here 12 // 2) wider than the image is cut to width - 1.
    narrow = image[:12, :3]
    expected = scipy.ndimage.gaussian_filter(
        narrow, sigma=(1.5, 1.5, 0), mode="mirror", radius=(2, 2, 0)
    )
    op = make_op("gaussian_blur", p=1.0, sigma_range=(1.5, 1.5), kernel_fraction=1.0)
    np.testing.assert_allclose(op(tf.constant(narrow), seed), expected, atol=1e-5)


def test_blur_rate_and_sigma_range():
    # sigma >= 1 so that every applied blur visibly changes the image.
    op = make_op("gaussian_blur", p=0.5, sigma_range=(1.0, 2.0))
    _, rate = changed_fraction(op, rgb_image(40, 40))
    assert abs(rate - 0.5) < binomial_tolerance(0.5)
    sigmas = map_over_seeds(lambda s: blur.sample_blur_sigma(s, (0.1, 2.0)))
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    assert blur.blur_radius(224, 0.1) == 11  # SimCLR: 224 // 10 // 2
