"""The augmentation op registry and `Policy`, a list of registered ops run as one view.

Ops (big_vision style registry, `OPS`): a factory `make(**kwargs)` that checks
its arguments and returns `op(image, seed) -> image` (built-in ops return an
`op_base.RandomOp`):
  geometry.py  random_resized_crop, random_rotated_crop, center_crop, resize,
               flip_left_right, rotate
  color.py     color_jitter, grayscale, to_gray
  blur.py      gaussian_blur

A `Policy` built from an op list [(op_name, kwargs) or 'op_name', ...] is a
pure function of (image, seed), built only from `tf.random.stateless_*` ops,
so it gives the same view eagerly and inside `tf.data.Dataset.map`, and the
input pipeline is reproducible from (seed, step). The uniforms of all the
ops (`op_base.RandomOp.num_uniforms` each) are drawn from the seed in one
random op and sliced in op order; an op that is a plain function gets its own
seed `stateless_fold_in(seed, position)`. The named policies are in
policies.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import tensorflow as tf

from micle_jax.data.augment import blur, color, geometry, op_base

OPS: dict[str, Callable[..., op_base.Op]] = {}


def register_op(name: str, factory: Callable[..., op_base.Op] | None = None):
    """Registers an op factory under `name`; usable as `@register_op("name")`.

    The factory takes keyword arguments only, raises ValueError on bad ones, and
    returns `op(image [h, w, c], seed [2] int) -> image [h', w', c]`. An op
    must keep pixel values in [0, 1] and may only use stateless random ops
    keyed on its seed. A factory with a `size` parameter is a sizing op: the
    policy passes it `image_size`, and it must return [size, size, c] float32
    from any decoded dtype.
    """

    def register(fn):
        if name in OPS and OPS[name] is not fn:
            raise ValueError(f"augment op {name!r} is already registered")
        OPS[name] = fn
        return fn

    return register(factory) if factory is not None else register


for _name, _factory in {
    "random_resized_crop": geometry.make_random_resized_crop,
    "random_rotated_crop": geometry.make_random_rotated_crop,
    "center_crop": geometry.make_center_crop,
    "resize": geometry.make_resize,
    "flip_left_right": geometry.make_flip_left_right,
    "rotate": geometry.make_rotate,
    "color_jitter": color.make_color_jitter,
    "grayscale": color.make_grayscale,
    "to_gray": color.make_to_gray,
    "gaussian_blur": blur.make_gaussian_blur,
}.items():
    register_op(_name, _factory)


def _parameters(fn: Callable) -> list[str]:
    return list(inspect.signature(fn).parameters)


def check_kwargs(kind: str, name: str, fn: Callable, kwargs: dict, reserved=()) -> None:
    """Raises ValueError naming the accepted arguments if `kwargs` has others."""
    accepted = [k for k in _parameters(fn) if k not in reserved]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"augment {kind} {name!r} got unknown argument(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )


def _parse_op_spec(spec) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Sequence) and len(spec) == 2 and isinstance(spec[0], str):
        kwargs = spec[1]
        if hasattr(kwargs, "items"):  # dict, ConfigDict, FrozenConfigDict
            return spec[0], dict(kwargs.items())
    raise ValueError(
        f"augment op spec {spec!r} is not understood; write 'op_name' or "
        f"('op_name', dict(arg=value)); ops: {', '.join(sorted(OPS))}"
    )


class Policy:
    """A built policy: `policy(image, seed) -> view [image_size, image_size, 3]`.

    Attributes:
      ops: [(op_name, kwargs)], the ops in order, with their explicit kwargs.
      image_size: side of the output views in pixels.
    """

    def __init__(self, ops: Sequence, image_size: int):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be a positive int (pixels)")
        self.image_size = image_size
        self.ops = [_parse_op_spec(spec) for spec in ops]
        self._fns = []
        for name, kwargs in self.ops:
            if name not in OPS:
                raise ValueError(
                    f"unknown augment op {name!r}; registered ops: {', '.join(sorted(OPS))}"
                )
            factory = OPS[name]
            check_kwargs("op", name, factory, kwargs, reserved=("size",))
            if "size" in _parameters(factory):
                kwargs = dict(kwargs, size=image_size)
            self._fns.append(factory(**kwargs))
        if not any("size" in _parameters(OPS[name]) for name, _ in self.ops):
            sizing = sorted(n for n, f in OPS.items() if "size" in _parameters(f))
            raise ValueError(
                f"augment ops {[n for n, _ in self.ops]} never bring the image to "
                f"image_size={image_size}; add one of {', '.join(sizing)}"
            )

    @property
    def num_uniforms(self) -> int:
        """Uniforms drawn per view: the sum over the policy's RandomOps."""
        return sum(fn.num_uniforms for fn in self._fns if isinstance(fn, op_base.RandomOp))

    def __repr__(self):
        return f"Policy(image_size={self.image_size}, ops={self.ops})"

    # Plain TF ops only: autograph must not rewrite the Python control flow, which
    # runs at trace time, so the graph is the same eagerly and in Dataset.map.
    @tf.autograph.experimental.do_not_convert
    def __call__(self, image, seed) -> tf.Tensor:
        """One augmented view of `image`.

        Args:
          image: [h, w, c] or [h, w] uint8, uint16 or float in [0, 1]; c = 1 or
            3 and known statically (decode with `channels=1` or `channels=3`).
          seed: [2] int32 or int64 stateless seed; the view is a pure function
            of (image, seed).

        Returns:
          [image_size, image_size, 3] float32 in [0, 1]; gray input gives 3
          identical channels.
        """
        image = _check_image(image)
        seed = _check_seed(seed)
        uniforms = op_base.draw_uniforms(seed, self.num_uniforms)
        start = 0
        for position, fn in enumerate(self._fns):
            if isinstance(fn, op_base.RandomOp):
                image = fn.apply(image, uniforms[start : start + fn.num_uniforms])
                start += fn.num_uniforms
            else:
                image = fn(image, op_base.sub_seed(seed, position))
        image = op_base.to_unit_float(image)
        if image.shape[-1] == 1:
            image = op_base.gray_to_rgb(image)
        return tf.ensure_shape(image, [self.image_size, self.image_size, 3])


def _check_image(image) -> tf.Tensor:
    image = tf.convert_to_tensor(image)
    if image.shape.rank == 2:
        image = image[..., None]
    if image.shape.rank != 3:
        raise ValueError(
            f"augment expects one image [h, w, c] or [h, w], got shape {image.shape}; "
            "map the policy over single images, not batches"
        )
    if image.shape[-1] not in (1, 3):
        raise ValueError(
            f"augment expects 1 (gray) or 3 (RGB) channels known statically, got shape "
            f"{image.shape}; decode with tf.io.decode_image(..., channels=1 or 3, "
            "expand_animations=False) or drop the alpha channel"
        )
    if not (image.dtype.is_floating or image.dtype in (tf.uint8, tf.uint16)):
        raise ValueError(f"augment expects uint8, uint16 or float images, got {image.dtype}")
    return image


def _check_seed(seed) -> tf.Tensor:
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64) or not seed.shape.is_compatible_with([2]):
        raise ValueError(
            f"augment seed must be a [2] int32/int64 tensor (a stateless seed), got "
            f"{seed.dtype.name} {seed.shape}; e.g. tf.random.experimental.stateless_fold_in"
            "(base_seed, index)"
        )
    return seed
