"""Tests for micle_jax/data/augment/{crop_boxes,geometry}.py: crop boxes, crops, flips, rotations.

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
from scipy import stats

from micle_jax.data.augment import crop_boxes, geometry, op_base

N_BOXES = 2000  # boxes per distribution compared with TensorFlow's sampler


def tensorflow_boxes(height, width, n=N_BOXES, **kwargs):
    """n boxes [n, 4] (y, x, h, w) of tf.image.sample_distorted_bounding_box as SimCLR calls it.

    SimCLR's tf2/data_util.py distorted_bounding_box_crop: the whole image as
    the object box, min_object_covered 0.1, aspect 3/4-4/3, area 0.08-1, 100
    attempts, use_image_if_no_bounding_boxes. The stateful op with a fixed op
    seed (no global seed: setting one would leak into other tests' tf.data
    shuffles), mapped sequentially: a reference independent of our seeding.
    """
    args = dict(
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=100,
        use_image_if_no_bounding_boxes=True,
    )
    args.update(kwargs)

    def sample(_):
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.constant([height, width, 3]), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=1, **args
        )
        return tf.concat([begin[:2], size[:2]], 0)

    return np.stack(list(tf.data.Dataset.range(n).map(sample).as_numpy_iterator()))


def box_statistics(boxes, height, width):
    """Area fraction, aspect (w / h), and offsets as fractions of the image side."""
    y, x, h, w = boxes.T.astype(np.float64)
    return dict(area=h * w / (height * width), aspect=w / h, y=y / height, x=x / width)


def test_crop_box_matches_tensorflows_sampler_in_distribution():
    # A non-square image, so that height and width limits differ.
    height, width = 224, 160
    boxes = map_over_seeds(lambda s: crop_boxes.sample_crop_box(s, height, width), n=N_BOXES)
    y, x, h, w = boxes.T
    assert (y >= 0).all() and (x >= 0).all()
    assert (y + h <= height).all() and (x + w <= width).all()
    ours = box_statistics(boxes, height, width)
    reference = box_statistics(tensorflow_boxes(height, width), height, width)
    # Two-sample Kolmogorov-Smirnov on 2000 boxes each: a torchvision-style
    # sampler (area and log-aspect uniform) gives p ~ 1e-19 on area and aspect;
    # the boxes are integers, which only makes the test conservative.
    for key in ("area", "aspect", "y", "x"):
        p_value = stats.ks_2samp(ours[key], reference[key]).pvalue
        assert p_value > 1e-3, f"{key}: p = {p_value:.2g}"
    # min_object_covered=0.1 of the whole image: no box below 10% of the area
    # (torchvision-style crops go down to 8%).
    assert ours["area"].min() >= 0.1 and reference["area"].min() >= 0.1
    # The whole range is used (a box of aspect >= 3/4 covers at most 95% of 224 x 160).
    assert ours["area"].min() < 0.12 and ours["area"].max() > 0.9
    assert ours["aspect"].min() < 0.78 and ours["aspect"].max() > 1.3


def test_crop_box_falls_back_to_the_whole_image():
    # No box of aspect 3/4-4/3 covers 8% of a 2 x 100 image: SimCLR's crop is the whole image.
    boxes = map_over_seeds(lambda s: crop_boxes.sample_crop_box(s, 2, 100), n=50)
    np.testing.assert_array_equal(boxes, np.tile([0, 0, 2, 100], (50, 1)))
    np.testing.assert_array_equal(tensorflow_boxes(2, 100, n=50), boxes)
    # Nor an aspect of 3-4 at >= 90% of a 60 x 90 image.
    box = crop_boxes.sample_crop_box(tf.constant([1, 2]), 60, 90, (0.9, 1.0), (3.0, 4.0))
    np.testing.assert_array_equal(box.numpy(), [0, 0, 60, 90])
    # One attempt on a 10 x 100 image succeeds about half the time (an aspect
    # >= 1 fits 10% of the area): the fallback rate is TensorFlow's.
    height, width = 10, 100

    def whole(boxes):
        return ((boxes[:, 2] == height) & (boxes[:, 3] == width)).mean()

    ours = whole(
        map_over_seeds(
            lambda s: crop_boxes.sample_crop_box(s, height, width, max_attempts=1), n=N_BOXES
        )
    )
    reference = whole(tensorflow_boxes(height, width, max_attempts=1))
    assert 0.2 < reference < 0.8
    # 4 standard deviations of the difference of two rates measured on N_BOXES each.
    assert abs(ours - reference) < math.sqrt(2) * binomial_tolerance(reference, N_BOXES)


def test_random_resized_crop_resizes_the_sampled_box():
    image = tf.constant(rgb_image(50, 60))
    op = make_op("random_resized_crop", size=16)
    for s in range(4):
        seed = tf.constant([s, 1])
        y, x, h, w = crop_boxes.sample_crop_box(seed, 50, 60).numpy()
        expected = tf.image.resize(image[y : y + h, x : x + w], [16, 16], method="bicubic")
        np.testing.assert_allclose(
            op(image, seed).numpy(), np.clip(expected.numpy(), 0, 1), atol=1e-6
        )


def test_cxr_area_range_is_configurable():
    boxes = map_over_seeds(lambda s: crop_boxes.sample_crop_box(s, 100, 100, (0.25, 1.0)), n=200)
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
        y, x, h, w = crop_boxes.sample_crop_box(seed, 60, 70, (0.25, 1.0)).numpy()
        expected = tf.image.resize(image[y : y + h, x : x + w], [20, 20], method="bilinear")
        got = op(tf.constant(image), seed).numpy()
        # Interior: the resize clamps at the box border, the transform reads past it.
        np.testing.assert_allclose(got[1:-1, 1:-1], expected.numpy()[1:-1, 1:-1], atol=1e-5)
