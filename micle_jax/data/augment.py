"""Augmentation policies: named, configurable sequences of small registered ops.

A policy turns one decoded image and a stateless seed into one view:

    policy = augment.get_policy("simclr", 224, color_jitter_strength=0.5)
    view = policy(image, seed)   # image [h, w, 1 or 3] uint8/float; seed [2] int
                                 # view [224, 224, 3] float32 in [0, 1]

It is a pure function of (image, seed), built only from `tf.random.stateless_*`
ops, so it gives the same view eagerly and inside `tf.data.Dataset.map`, and
the input pipeline is reproducible from (seed, step). The uniforms of all the
ops (`op_base.RandomOp.num_uniforms` each) are drawn from the seed in one
random op and sliced in op order; an op that is a plain function gets its own
seed `stateless_fold_in(seed, position)`.

Ops (big_vision style registry, `OPS`): a factory `make(**kwargs)` that checks
its arguments and returns `op(image, seed) -> image` (built-in ops return an
`op_base.RandomOp`):
  geometry.py  random_resized_crop, random_rotated_crop, center_crop, resize,
               flip_left_right, rotate
  color.py     color_jitter, grayscale, to_gray
  blur.py      gaussian_blur
Policies (`POLICIES`): a function of keyword arguments returning the op list
[(op_name, kwargs), ...]: simclr, cxr, supervised, eval, none. A config selects
one by name, `data.augment = 'simclr'` with `data.augment_kwargs = dict(...)`,
gives its own op list, `data.augment = [('random_resized_crop',
dict(area_range=(0.5, 1))), 'flip_left_right']`, or leaves the choice of
'cxr' or 'simclr' to the data with 'auto' (resolved where the pipeline opens
the data: micle_jax/data/pipeline.py resolve_augment).

For speed every policy crops first, so later ops touch image_size**2 pixels;
gray images stay 1-channel until the end; and the colour-jitter order (but for
HSV on RGB) and the rotation coin are arithmetic, not tf.switch_case / tf.cond
(each executed one costs ~0.05-0.15 ms per view inside tf.data).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import tensorflow as tf

from micle_jax.data import blur, color, geometry, op_base

OPS: dict[str, Callable[..., op_base.Op]] = {}
POLICIES: dict[str, Callable[..., list]] = {}


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


def register_policy(name: str, fn: Callable[..., list] | None = None):
    """Registers a policy under `name`; usable as `@register_policy("name")`.

    `fn(**kwargs)` returns the op list [(op_name, op_kwargs), ...].
    """

    def register(f):
        if name in POLICIES and POLICIES[name] is not f:
            raise ValueError(f"augment policy {name!r} is already registered")
        POLICIES[name] = f
        return f

    return register(fn) if fn is not None else register


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


def _check_kwargs(kind: str, name: str, fn: Callable, kwargs: dict, reserved=()) -> None:
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
            _check_kwargs("op", name, factory, kwargs, reserved=("size",))
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


def get_policy(name, image_size: int, **kwargs) -> Policy:
    """The augmentation policy `name` for views of image_size x image_size pixels.

    Args:
      name: a registered policy ('simclr', 'cxr', 'supervised', 'eval',
        'none'), or an op list ['op_name' or ('op_name', dict(...)), ...].
      image_size: output side in pixels.
      **kwargs: the policy's arguments (see its function below); none for an op list.

    Returns:
      A `Policy`: `policy(image [h, w, c], seed [2]) -> [image_size, image_size, 3]`.
    """
    if not isinstance(name, str):
        if not isinstance(name, Sequence):
            raise ValueError(
                f"augment={name!r} is neither a policy name ({', '.join(sorted(POLICIES))}) "
                "nor an op list"
            )
        if kwargs:
            raise ValueError(
                f"augment kwargs {sorted(kwargs)} apply to a named policy only; "
                "put them in the op list as ('op_name', dict(...))"
            )
        return Policy(name, image_size)
    if name not in POLICIES:
        auto = (
            "; 'auto' is resolved from the data by micle_jax.data.pipeline.resolve_augment"
            if name == "auto"
            else ""
        )
        raise ValueError(
            f"unknown augment policy {name!r}; registered: {', '.join(sorted(POLICIES))}, "
            f"or give an op list{auto}"
        )
    fn = POLICIES[name]
    _check_kwargs("policy", name, fn, kwargs)
    try:
        return Policy(fn(**kwargs), image_size)
    except ValueError as e:
        raise ValueError(f"augment policy {name!r} with {kwargs}: {e}") from e


def eval_transform(image, image_size: int, crop_fraction: float = 0.875) -> tf.Tensor:
    """SimCLR's evaluation preprocessing: centre crop keeping 87.5% of the short side, resize.

    Args:
      image: [h, w, c] or [h, w] uint8, uint16 or float in [0, 1], c = 1 or 3.
      image_size: output side in pixels.
      crop_fraction: side of the centred square crop as a fraction of min(h, w).

    Returns:
      [image_size, image_size, 3] float32 in [0, 1] (bicubic resize).
    """
    policy = get_policy("eval", image_size, crop_fraction=crop_fraction)
    return policy(image, tf.zeros([2], tf.int32))


# --- the policies ---


@register_policy("simclr")
def simclr(
    area_range=(0.08, 1.0),
    aspect_ratio_range=(3 / 4, 4 / 3),
    flip_p=0.5,
    color_jitter_strength=1.0,
    color_jitter_p=0.8,
    grayscale_p=0.2,
    blur_p=0.5,
    blur_sigma_range=(0.1, 2.0),
    color_jitter_impl="hsv",
):
    """SimCLR's views (google-research/simclr tf2/data_util.py), used for dermatology.

    Crop before the colour ops, so they touch image_size**2 pixels only.
    color_jitter_impl='linear' makes RGB views about 2x cheaper (see
    color.make_color_jitter); 'hsv' is SimCLR's.
    """
    return [
        ("random_resized_crop", dict(area_range=area_range, aspect_ratio_range=aspect_ratio_range)),
        ("flip_left_right", dict(p=flip_p)),
        (
            "color_jitter",
            dict(strength=color_jitter_strength, p=color_jitter_p, impl=color_jitter_impl),
        ),
        ("grayscale", dict(p=grayscale_p)),
        ("gaussian_blur", dict(p=blur_p, sigma_range=blur_sigma_range)),
    ]


@register_policy("cxr")
def cxr(
    area_range=(0.25, 1.0),
    aspect_ratio_range=(3 / 4, 4 / 3),
    max_degrees=45.0,
    rotate_p=1.0,
    fill_mode="constant",
    flip_p=0.5,
    color_jitter_strength=0.5,
    color_jitter_p=0.8,
):
    """Chest X-ray views (Azizi et al. 2021, as summarised): no blur, which erases texture.

    One gray channel (first: RGB-stored X-rays then cost one channel), a
    random resized crop over a narrower area range (0.25-1: our choice, the
    paper's is not known) turned by up to +-45 degrees in the same
    resampling (random_rotated_crop: black fill only where the turned box
    leaves the image) and mirrored left-right with probability flip_p, in
    the same resampling (a fused flip_left_right), brightness and contrast jitter of
    strength 0.5 (no saturation/hue: X-rays are gray). The view has 3
    identical channels.
    """
    return [
        ("to_gray", {}),
        (
            "random_rotated_crop",
            dict(
                area_range=area_range,
                aspect_ratio_range=aspect_ratio_range,
                max_degrees=max_degrees,
                p=rotate_p,
                fill_mode=fill_mode,
                flip_p=flip_p,
            ),
        ),
        (
            "color_jitter",
            dict(strength=color_jitter_strength, p=color_jitter_p, saturation=0.0, hue=0.0),
        ),
    ]


@register_policy("supervised")
def supervised(
    area_range=(0.08, 1.0),
    aspect_ratio_range=(3 / 4, 4 / 3),
    flip_p=0.5,
    color_jitter_strength=0.5,
    color_jitter_p=0.8,
    blur_p=0.0,
    max_degrees=0.0,
    color_jitter_impl="hsv",
):
    """Fine-tuning views: crop and resize, flip, light colour jitter.

    SimCLR fine-tunes with crop and flip only; the paper's fine-tuning adds
    colour, blur and rotation (as summarised), here off or light by default:
    set blur_p and max_degrees to enable them.
    """
    ops = [
        ("random_resized_crop", dict(area_range=area_range, aspect_ratio_range=aspect_ratio_range)),
        ("flip_left_right", dict(p=flip_p)),
    ]
    if max_degrees:
        ops.append(("rotate", dict(max_degrees=max_degrees)))
    ops.append(
        (
            "color_jitter",
            dict(strength=color_jitter_strength, p=color_jitter_p, impl=color_jitter_impl),
        )
    )
    if blur_p:
        ops.append(("gaussian_blur", dict(p=blur_p)))
    return ops


@register_policy("eval")
def eval_policy(crop_fraction=0.875):
    """SimCLR's evaluation view: centre crop keeping 87.5% of the short side, bicubic resize."""
    return [("center_crop", dict(crop_fraction=crop_fraction))]


@register_policy("none")
def no_augmentation(method="bicubic"):
    """Resize only (the whole image, aspect ratio not kept)."""
    return [("resize", dict(method=method))]
