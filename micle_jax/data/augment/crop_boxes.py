"""SimCLR's crop boxes: the random box sampler and the evaluation centre crop.

Where in an image the crop ops of geometry.py cut, as boxes (offset_y,
offset_x, height, width) in pixels. The random box is TensorFlow's
sample_distorted_bounding_box kernel as SimCLR calls it, seeded by the op's
uniforms, so a box is a pure function of (seed, image size) and tests can
draw the exact box an op called with a seed crops (`sample_crop_box`).
"""

from __future__ import annotations

import tensorflow as tf

from micle_jax.data.augment import op_base

# Uniforms a crop box reads: two, whose random bits seed TensorFlow's sampler.
CROP_BOX_UNIFORMS = 2
# A float32 uniform of stateless_uniform is k / 2**23 with 23 random bits k.
_UNIFORM_BITS = 23


def crop_box(
    u: tf.Tensor,
    height,
    width,
    area_range=(0.08, 1.0),
    aspect_ratio_range=(3 / 4, 4 / 3),
    max_attempts: int = 100,
    min_object_covered: float = 0.1,
) -> tf.Tensor:
    """SimCLR's random crop box: TensorFlow's sample_distorted_bounding_box, seeded by u.

    As SimCLR's tf2/data_util.py `distorted_bounding_box_crop` (called by
    `crop_and_resize` with the whole image as the object box,
    min_object_covered=0.1, aspect 3/4-4/3, area 0.08-1, 100 attempts,
    use_image_if_no_bounding_boxes=True). This calls the stateless version of
    the same kernel, so the boxes follow its distribution exactly. The kernel,
    per attempt: an aspect ratio (width / height) uniform in
    `aspect_ratio_range`; a height uniform among the integers from
    round(sqrt(min_area / aspect)) to round(sqrt(max_area / aspect)), the
    latter cut so that the box fits; width = round(height * aspect); the box
    is kept if its area lies in `area_range` and it covers at least
    `min_object_covered` of the image (so with the defaults the area is at
    least 10%, not 8%); offsets uniform in [0, H - h) and [0, W - w) (0 when
    the box spans that side). If no attempt succeeds, the box is the whole
    image. Unlike torchvision's crop, neither the area nor the log-aspect is
    uniform.

    Args:
      u: [CROP_BOX_UNIFORMS] float32 uniforms in [0, 1) from
        `op_base.draw_uniforms`: their random bits form the kernel's [2] seed.
      height, width: the image's size in pixels (Python ints or int32 scalars).
      area_range: (min, max) fraction of the image area, within (0, 1].
      aspect_ratio_range: (min, max) crop width / height in pixels.
      max_attempts: candidates drawn before falling back to the whole image.
      min_object_covered: fraction of the image the box must cover.

    Returns:
      [4] int32: (offset_y, offset_x, crop_height, crop_width), inside the image.
    """
    # Exact integers: uniforms are multiples of 2**-23 below 1.
    seed = tf.cast(tf.floor(u[:CROP_BOX_UNIFORMS] * float(2**_UNIFORM_BITS)), tf.int32)
    size = tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32), 1])
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        size,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=min_object_covered,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], extent[0], extent[1]])


def sample_crop_box(
    seed: tf.Tensor,
    height,
    width,
    area_range=(0.08, 1.0),
    aspect_ratio_range=(3 / 4, 4 / 3),
    max_attempts: int = 100,
    min_object_covered: float = 0.1,
) -> tf.Tensor:
    """`crop_box` on uniforms drawn from `seed`: the box of the crop ops called with `seed`.

    random_resized_crop and random_rotated_crop read their box from their
    first CROP_BOX_UNIFORMS uniforms, so `op(image, seed)` crops exactly this
    box. Returns [4] int32 (offset_y, offset_x, h, w).
    """
    u = op_base.draw_uniforms(seed, CROP_BOX_UNIFORMS)
    return crop_box(
        u, height, width, area_range, aspect_ratio_range, max_attempts, min_object_covered
    )


def center_crop_box(height, width, crop_fraction: float) -> tf.Tensor:
    """SimCLR's evaluation crop: a centred square of side crop_fraction * min(h, w).

    As SimCLR's center_crop for a square output: the side is rounded to the
    nearest pixel and the offsets are (h - side + 1) // 2, (w - side + 1) // 2.

    Returns:
      [4] int32: (offset_y, offset_x, side, side).
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    short = tf.cast(tf.minimum(height, width), tf.float32)
    side = tf.maximum(tf.cast(tf.math.rint(crop_fraction * short), tf.int32), 1)
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])
