"""Tests for micle_jax/data/geometry.py: crop boxes, crops, flips, rotations.

Statistics use a few hundred seeds through `tf.data`; tolerances are about
4 binomial standard deviations.
"""

import math

import numpy as np
import tensorflow as tf
from fixtures.augment_images import (
    binomial_tolerance,
    changed_fraction,
    make_op,
    map_over_seeds,
    rgb_image,
)

from micle_jax.data import geometry, op_base


def test_crop_box_statistics_match_reference_sampler():
    height = width = 200
    boxes = map_over_seeds(lambda s: geometry.sample_crop_box(s, height, width))
    y, x, h, w = boxes.T
    assert (y >= 0).all() and (x >= 0).all()
    assert (y + h <= height).all() and (x + w <= width).all()
    area = h * w / (height * width)
    aspect = w / h
    # Rounding to whole pixels moves the area and aspect by <~2% at the smallest crops.
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.98 and aspect.max() <= 4 / 3 * 1.02
    assert area.min() < 0.15 and area.max() > 0.9  # the whole range is used

    # NumPy reference of the documented rule: area uniform, log aspect uniform,
    # first candidate that fits.
    rng = np.random.default_rng(0)
    a = rng.uniform(0.08, 1.0, 200_000) * height * width
    r = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), a.size))
    fits = (np.round(np.sqrt(a * r)) <= width) & (np.round(np.sqrt(a / r)) <= height)
    ref = (np.round(np.sqrt(a * r)) * np.round(np.sqrt(a / r)))[fits] / (height * width)
    assert abs(area.mean() - ref.mean()) < 4 * ref.std() / math.sqrt(len(area))
    # Positions are uniform: box centres average to the image centre.
    for centre in ((y + h / 2) / height, (x + w / 2) / width):
        assert abs(centre.mean() - 0.5) < 0.03


def test_crop_box_falls_back_to_centre_crop():
    # An aspect ratio of 3-4 at >= 90% of the area never fits: centre crop, aspect clamped to 3.
    box = geometry.sample_crop_box(tf.constant([1, 2]), 60, 90, (0.9, 1.0), (3.0, 4.0))
    np.testing.assert_array_equal(box.numpy(), [15, 0, 30, 90])


def test_random_resized_crop_resizes_the_sampled_box():
    image = tf.constant(rgb_image(50, 60))
    op = make_op("random_resized_crop", size=16)
    for s in range(4):
        seed = tf.constant([s, 1])
        y, x, h, w = geometry.sample_crop_box(seed, 50, 60).numpy()
        expected = tf.image.resize(image[y : y + h, x : x + w], [16, 16], method="bicubic")
        np.testing.assert_allclose(
            op(image, seed).numpy(), np.clip(expected.numpy(), 0, 1), atol=1e-6
        )


def test_cxr_area_range_is_configurable():
    boxes = map_over_seeds(lambda s: geometry.sample_crop_box(s, 100, 100, (0.25, 1.0)), n=200)
    area = boxes[:, 2] * boxes[:, 3] / 1e4
    assert area.min() >= 0.25 * 0.97


def test_flip_rate_and_values():
    image = rgb_image(8, 10)
    outputs, rate = changed_fraction(make_op("flip_left_right", p=0.5), image)
    assert abs(rate - 0.5) < binomial_tolerance(0.5)
    for out in outputs:
        assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])


def test_rotation_angles_are_bounded():
    angles = map_over_seeds(lambda s: geometry.sample_rotation_angle(s, 45.0))
    assert angles.min() >= -45.0 and angles.max() <= 45.0
    assert angles.min() < -40 and angles.max() > 40 and abs(angles.mean()) < 4


def principal_angle(image):
    """Angle in degrees (counter-clockwise, y up) of an image's principal axis."""
    ys, xs = np.indices(image.shape)
    w = image / image.sum()
    x = xs - (w * xs).sum()
    y = -(ys - (w * ys).sum())
    cov = [[(w * x * x).sum(), (w * x * y).sum()], [(w * x * y).sum(), (w * y * y).sum()]]
    values, vectors = np.linalg.eigh(cov)
    vx, vy = vectors[:, -1]
    return math.degrees(math.atan2(vy, vx) if vx > 0 else math.atan2(-vy, -vx))


def bar_image():
    bar = np.zeros((41, 41, 1), np.float32)
    bar[19:22, 6:35] = 1.0
    return bar


def test_rotation_turns_by_the_sampled_angle():
    bar = bar_image()
    op = make_op("rotate", max_degrees=30.0)
    for s in range(5):
        seed = tf.constant([s, 4])
        angle = geometry.sample_rotation_angle(seed, 30.0).numpy()
        out = op(tf.constant(bar), seed).numpy()[..., 0]
        assert abs(principal_angle(out) - angle) < 1.5
        assert abs(out.sum() - bar.sum()) < 0.05 * bar.sum()  # nothing lost at the borders
    np.testing.assert_array_equal(make_op("rotate", max_degrees=0.0)(bar, seed), bar)
    np.testing.assert_array_equal(make_op("rotate", p=0.0)(bar, seed), bar)


def test_rotated_crop_turns_the_sampled_box():
    # Whole-image box at the same size: the view is the bar turned by the op's angle.
    bar = bar_image()
    op = make_op("random_rotated_crop", size=41, area_range=(1.0, 1.0), aspect_ratio_range=(1, 1))
    slot = geometry.rotated_crop_layout()["angle"]
    assert op.num_uniforms == slot + 3  # the box's, angle, rotation coin, flip coin
    for s in range(5):
        seed = tf.constant([s, 5])
        u = op_base.draw_uniforms(seed, op.num_uniforms)
        angle = geometry.rotation_angle(u[slot], 45.0).numpy()
        out = op(tf.constant(bar), seed).numpy()[..., 0]
        assert abs(principal_angle(out) - angle) < 1.5
    angles = map_over_seeds(
        lambda s: geometry.rotation_angle(op_base.draw_uniforms(s, op.num_uniforms)[slot], 45.0),
        n=200,
    )
    assert np.abs(angles).max() <= 45.0 and angles.min() < -40 and angles.max() > 40


def test_rotated_crop_flip_is_fused_and_fair():
    # Whole image, no rotation: the view is the bilinear resize or its mirror.
    image = tf.constant(rgb_image(30, 30))
    op = make_op(
        "random_rotated_crop",
        size=30,
        area_range=(1.0, 1.0),
        aspect_ratio_range=(1, 1),
        max_degrees=0.0,
        flip_p=0.5,
    )
    flips = map_over_seeds(
        lambda s: tf.reduce_max(tf.abs(op(image, s) - image[:, ::-1])) < 1e-5, n=400
    )
    same = map_over_seeds(lambda s: tf.reduce_max(tf.abs(op(image, s) - image)) < 1e-5, n=400)
    assert (flips | same).all()
    assert abs(flips.mean() - 0.5) < binomial_tolerance(0.5, 400)


def test_rotated_crop_without_rotation_is_a_bilinear_resized_crop():
    image = rgb_image(60, 70)
    op = make_op("random_rotated_crop", size=20, max_degrees=0.0)
    for s in range(4):
        seed = tf.constant([s, 6])
        y, x, h, w = geometry.sample_crop_box(seed, 60, 70, (0.25, 1.0)).numpy()
        expected = tf.image.resize(image[y : y + h, x : x + w], [20, 20], method="bilinear")
        got = op(tf.constant(image), seed).numpy()
        # Interior: the resize clamps at the box border, the transform reads past it.
        np.testing.assert_allclose(got[1:-1, 1:-1], expected.numpy()[1:-1, 1:-1], atol=1e-5)
