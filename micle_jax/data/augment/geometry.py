"""Geometric augmentation ops: crops, resizes, flips, rotations (boxes: crop_boxes.py).

Each `make_*` function checks its arguments (ValueError naming the fix) and
returns an `op_base.RandomOp` on one image [h, w, c], c in {1, 3}:
`op(image, seed)`, or `op.apply(image, u)` with its uniforms.
Ops that take `size` output [size, size, c] float32 in [0, 1] and accept the
raw decoded dtype (uint8, uint16 or float), scaling to [0, 1] after the crop
so that per-pixel float work touches the view, not the decoded image. The
other ops convert to float32 in [0, 1] themselves (flip keeps the dtype).
"""

from __future__ import annotations

import math

import tensorflow as tf

from micle_jax.data.augment import crop_boxes, op_base

RESIZE_METHODS = ("bicubic", "bilinear", "area", "nearest")
FILL_MODES = ("constant", "nearest", "reflect", "wrap")


def _check_size(op: str, size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"augment op {op!r}: size={size!r} must be a positive int (pixels)")
    return size


def _crop(image: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
    """image[y:y + h, x:x + w] for box (y, x, h, w), keeping the static channel count."""
    crop = tf.slice(image, [box[0], box[1], 0], [box[2], box[3], -1])
    crop.set_shape([None, None, image.shape[-1]])
    return crop


def _resize_to_unit(image: tf.Tensor, size: int, method: str, antialias: bool) -> tf.Tensor:
    """Resizes [h, w, c] (any dtype) to [size, size, c] float32 clipped to [0, 1]."""
    dtype = image.dtype
    out = tf.image.resize(image, [size, size], method=method, antialias=antialias)
    if dtype.is_integer:
        # tf.image.resize keeps the input's value scale; scale after the resize so
        # the division touches size*size pixels, not the whole decoded image.
        out = out * (1.0 / dtype.max)
    # Bicubic overshoots at edges; views must stay in [0, 1].
    return tf.clip_by_value(tf.cast(out, tf.float32), 0.0, 1.0)


def _check_crop(op, size, area_range, aspect_ratio_range, max_attempts, min_object_covered):
    size = _check_size(op, size)
    area_range = op_base.check_range(op, "area_range", area_range, 0.0, 1.0)
    if area_range[0] <= 0:
        raise ValueError(f"augment op {op!r}: area_range={area_range} must have min > 0")
    aspect_ratio_range = op_base.check_range(op, "aspect_ratio_range", aspect_ratio_range, 0.0)
    if aspect_ratio_range[0] <= 0:
        raise ValueError(
            f"augment op {op!r}: aspect_ratio_range={aspect_ratio_range} must have min > 0"
        )
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"augment op {op!r}: max_attempts={max_attempts!r} must be an int >= 1")
    min_object_covered = op_base.check_probability(op, "min_object_covered", min_object_covered)
    return size, area_range, aspect_ratio_range, min_object_covered


def make_random_resized_crop(
    size: int,
    area_range=(0.08, 1.0),
    aspect_ratio_range=(3 / 4, 4 / 3),
    max_attempts: int = 100,
    method: str = "bicubic",
    antialias: bool = False,
    min_object_covered: float = 0.1,
) -> op_base.Op:
    """Random resized crop to [size, size, c] (SimCLR's crop_and_resize).

    Defaults are SimCLR's: TensorFlow's sample_distorted_bounding_box with area
    0.08-1, aspect 3/4-4/3, min_object_covered 0.1, 100 attempts, else the
    whole image (`crop_boxes.crop_box`); bicubic resize without antialiasing. Uniforms:
    the box's two, so the op called with `seed` crops `crop_boxes.sample_crop_box(seed, ...)`.
    """
    op = "random_resized_crop"
    size, area_range, aspect_ratio_range, min_object_covered = _check_crop(
        op, size, area_range, aspect_ratio_range, max_attempts, min_object_covered
    )
    method = op_base.check_choice(op, "method", method, RESIZE_METHODS)

    def random_resized_crop(image, u):
        shape = tf.shape(image)
        box = crop_boxes.crop_box(
            u, shape[0], shape[1], area_range, aspect_ratio_range, max_attempts, min_object_covered
        )
        return _resize_to_unit(_crop(image, box), size, method, antialias)

    return op_base.RandomOp(random_resized_crop, crop_boxes.CROP_BOX_UNIFORMS, op)


def make_center_crop(
    size: int, crop_fraction: float = 0.875, method: str = "bicubic", antialias: bool = False
) -> op_base.Op:
    """Centre crop keeping `crop_fraction` of the short side, resized to [size, size, c].

    SimCLR's evaluation preprocessing (CROP_PROPORTION = 0.875, bicubic). Not random.
    """
    op = "center_crop"
    size = _check_size(op, size)
    if not isinstance(crop_fraction, int | float) or not 0 < crop_fraction <= 1:
        raise ValueError(f"augment op {op!r}: crop_fraction={crop_fraction!r} must be in (0, 1]")
    method = op_base.check_choice(op, "method", method, RESIZE_METHODS)

    def center_crop(image, u):
        del u
        shape = tf.shape(image)
        box = crop_boxes.center_crop_box(shape[0], shape[1], crop_fraction)
        return _resize_to_unit(_crop(image, box), size, method, antialias)

    return op_base.RandomOp(center_crop, 0, op)


def make_resize(size: int, method: str = "bicubic", antialias: bool = False) -> op_base.Op:
    """Resizes the whole image to [size, size, c] (the aspect ratio is not kept)."""
    size = _check_size("resize", size)
    method = op_base.check_choice("resize", "method", method, RESIZE_METHODS)

    def resize(image, u):
        del u
        return _resize_to_unit(image, size, method, antialias)

    return op_base.RandomOp(resize, 0, "resize")


def _mirror(image: tf.Tensor) -> tf.Tensor:
    if image.shape[-1] != 1:
        return tf.reverse(image, axis=[1])
    # Reversing the last axis of [h, w] is ~5x cheaper than axis 1 of [h, w, 1].
    shape = tf.shape(image)
    out = tf.reshape(tf.reverse(tf.reshape(image, shape[:2]), axis=[1]), shape)
    out.set_shape(image.shape)
    return out


def make_flip_left_right(p: float = 0.5) -> op_base.Op:
    """Mirrors the image left-right with probability p (SimCLR: 0.5); one uniform, the coin."""
    p = op_base.check_probability("flip_left_right", "p", p)

    def flip_left_right(image, u):
        return op_base.random_apply(_mirror, p, image, u[0])

    return op_base.RandomOp(flip_left_right, 1, "flip_left_right")


def rotation_angle(u: tf.Tensor, max_degrees: float) -> tf.Tensor:
    """The rotation angle in degrees for a uniform u in [0, 1): uniform in [-max, max].

    Positive angles turn the image counter-clockwise as displayed (rows down).
    """
    return op_base.between(u, -max_degrees, max_degrees)


def sample_rotation_angle(seed: tf.Tensor, max_degrees: float) -> tf.Tensor:
    """`rotation_angle` of the first uniform drawn from `seed`: `rotate`'s angle for that seed."""
    return rotation_angle(op_base.draw_uniforms(seed, 1)[0], max_degrees)


def box_transform(box: tf.Tensor, angle_degrees: tf.Tensor, out_height, out_width) -> tf.Tensor:
    """Projective transform (output pixel -> input pixel) of a turned, resized box.

    The output [out_height, out_width] shows the box (y, x, h, w) of the input
    turned by `angle_degrees` about its centre (counter-clockwise on screen),
    sampled at pixel centres as tf.image.resize (half-pixel centres).

    Returns:
      [1, 8] float32, the `transforms` of ImageProjectiveTransformV3.
    """
    y0, x0, h, w = tf.unstack(tf.cast(box, tf.float32))
    scale_y = h / tf.cast(out_height, tf.float32)
    scale_x = w / tf.cast(out_width, tf.float32)
    angle = angle_degrees * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Output pixel (u, v) sits at (dx, dy) = (scale_x (u + 0.5) - w / 2, ...)
    # from the box centre before turning; pixel centres are integers.
    dx0, dy0 = 0.5 * scale_x - w / 2.0, 0.5 * scale_y - h / 2.0
    cx, cy = x0 + w / 2.0 - 0.5, y0 + h / 2.0 - 0.5
    return tf.stack(
        [
            cos * scale_x,
            -sin * scale_y,
            cx + cos * dx0 - sin * dy0,
            sin * scale_x,
            cos * scale_y,
            cy + sin * dx0 + cos * dy0,
            0.0,
            0.0,
        ]
    )[None]


def mirror_transform(transform: tf.Tensor, flip: tf.Tensor, out_width) -> tf.Tensor:
    """`transform` of a left-right mirrored output where `flip` (scalar bool) is True.

    Output column u then reads what column out_width - 1 - u read: the flip
    costs no pass over the pixels.
    """
    a0, a1, a2, b0, b1, b2, c0, c1 = tf.unstack(transform[0])
    last = tf.cast(out_width, tf.float32) - 1.0
    mirrored = tf.stack([-a0, a1, a2 + a0 * last, -b0, b1, b2 + b0 * last, c0, c1])[None]
    return tf.where(flip, mirrored, transform)


def _transform(image, transform, out_hw, fill_mode, fill_value):
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=out_hw,
        fill_value=fill_value,
        interpolation="BILINEAR",
        fill_mode=fill_mode.upper(),
    )[0]
    return out


def _check_rotation(op, max_degrees, p, fill_mode, fill_value):
    max_degrees = op_base.check_nonnegative(op, "max_degrees", max_degrees)
    if max_degrees > 180:
        raise ValueError(f"augment op {op!r}: max_degrees={max_degrees} must be <= 180")
    p = op_base.check_probability(op, "p", p)
    fill_mode = op_base.check_choice(op, "fill_mode", fill_mode, FILL_MODES)
    if not isinstance(fill_value, int | float) or not 0 <= fill_value <= 1:
        raise ValueError(f"augment op {op!r}: fill_value={fill_value!r} must be in [0, 1]")
    return max_degrees, p, fill_mode, float(fill_value)


def make_random_rotated_crop(
    size: int,
    area_range=(0.25, 1.0),
    aspect_ratio_range=(3 / 4, 4 / 3),
    max_attempts: int = 100,
    max_degrees: float = 45.0,
    p: float = 1.0,
    fill_mode: str = "constant",
    fill_value: float = 0.0,
    flip_p: float = 0.0,
    min_object_covered: float = 0.1,
) -> op_base.Op:
    """Random resized crop whose box is also turned, in one bilinear resampling.

    The box is `crop_boxes.sample_crop_box(seed, ...)` as in random_resized_crop; with
    probability p it is turned about its centre by `rotation_angle`. Uniforms
    (`rotated_crop_layout`): the box's, then the angle, the rotation coin and
    the flip coin. One resampling instead of crop-resize then rotate: about 40% cheaper
    on gray 224 px views, and the corners show the image around the box
    rather than fill, which appears only where the turned box leaves the
    image (fill_mode as in `make_rotate`). Bilinear without antialiasing,
    like SimCLR's bicubic resize. With probability flip_p the view is
    mirrored left-right in the same resampling: a fused `flip_left_right`,
    which saves a pass over the view.
    """
    op = "random_rotated_crop"
    size, area_range, aspect_ratio_range, min_object_covered = _check_crop(
        op, size, area_range, aspect_ratio_range, max_attempts, min_object_covered
    )
    max_degrees, p, fill_mode, fill_value = _check_rotation(
        op, max_degrees, p, fill_mode, fill_value
    )
    flip_p = op_base.check_probability(op, "flip_p", flip_p)
    slots = rotated_crop_layout()

    def random_rotated_crop(image, u):
        # Interpolate floats (the kernel truncates interpolated integers), but
        # only cast here: the 1 / 255 scaling touches the small output only.
        scale = 1.0 / image.dtype.max if image.dtype.is_integer else None
        image = tf.cast(image, tf.float32) if scale else op_base.to_unit_float(image)
        fill = fill_value / scale if scale else fill_value
        shape = tf.shape(image)
        box = crop_boxes.crop_box(
            u, shape[0], shape[1], area_range, aspect_ratio_range, max_attempts, min_object_covered
        )
        angle = rotation_angle(u[slots["angle"]], max_degrees)
        if p < 1.0:
            angle = tf.where(u[slots["rotate_coin"]] < p, angle, 0.0)
        transform = box_transform(box, angle, size, size)
        if flip_p > 0.0:
            transform = mirror_transform(transform, u[slots["flip_coin"]] < flip_p, size)
        out = _transform(image, transform, [size, size], fill_mode, fill)
        if scale:
            out = tf.minimum(out * scale, 1.0)  # 255 * (1 / 255) may round above 1
        out.set_shape([size, size, image.shape[-1]])
        return out

    return op_base.RandomOp(random_rotated_crop, slots["flip_coin"] + 1, op)


def rotated_crop_layout() -> dict[str, int]:
    """Index of each of random_rotated_crop's uniforms after the box's: angle, coins."""
    first = crop_boxes.CROP_BOX_UNIFORMS
    return dict(angle=first, rotate_coin=first + 1, flip_coin=first + 2)


def make_rotate(
    max_degrees: float = 45.0,
    p: float = 1.0,
    fill_mode: str = "constant",
    fill_value: float = 0.0,
) -> op_base.Op:
    """Rotates about the centre by an angle uniform in [-max_degrees, max_degrees].

    Bilinear interpolation. Pixels rotated in from outside the image are
    `fill_value` (default 0, black, as torchvision's RandomRotation) with
    fill_mode 'constant'; 'nearest' repeats the edge pixels, 'reflect' and
    'wrap' mirror or tile the image. Uniforms: the angle (so the op called
    with `seed` turns by `sample_rotation_angle(seed, max_degrees)`), the coin.
    """
    op = "rotate"
    max_degrees, p, fill_mode, fill_value = _check_rotation(
        op, max_degrees, p, fill_mode, fill_value
    )

    def rotate_once(image, u):
        shape = tf.shape(image)
        angle = rotation_angle(u, max_degrees)
        whole = tf.stack([0, 0, shape[0], shape[1]])
        transform = box_transform(whole, angle, shape[0], shape[1])
        out = _transform(image, transform, shape[:2], fill_mode, fill_value)
        out.set_shape(image.shape)
        return out

    def rotate(image, u):
        if max_degrees == 0:
            return image
        image = op_base.to_unit_float(image)
        return op_base.random_apply(lambda x: rotate_once(x, u[0]), p, image, u[1])

    return op_base.RandomOp(rotate, 2, op)
