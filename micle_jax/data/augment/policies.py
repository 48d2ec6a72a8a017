"""Augmentation policies: named, configurable sequences of the registered ops.

A policy turns one decoded image and a stateless seed into one view:

    policy = policies.get_policy("simclr", 224, color_jitter_strength=0.5)
    view = policy(image, seed)   # image [h, w, 1 or 3] uint8/float; seed [2] int
                                 # view [224, 224, 3] float32 in [0, 1]

Policies (`POLICIES`): a function of keyword arguments returning the op list
[(op_name, kwargs), ...] of ops registered in registry.py (which builds the
list into a `registry.Policy`): simclr, simclr_small, cxr, supervised, eval, none. A config
selects one by name, `data.augment = 'simclr'` with `data.augment_kwargs =
dict(...)`, gives its own op list, `data.augment = [('random_resized_crop',
dict(area_range=(0.5, 1))), 'flip_left_right']`, or leaves the choice of
'cxr' or 'simclr' to the data with 'auto' (resolved where the pipeline opens
the data: micle_jax/data/stream/pipeline.py Data.augment_policy).

For speed every policy crops first, so later ops touch image_size**2 pixels;
gray images stay 1-channel until the end; and the colour-jitter order (but for
HSV on RGB) and the rotation coin are arithmetic, not tf.switch_case / tf.cond
(each executed one costs ~0.05-0.15 ms per view inside tf.data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from micle_jax.data.augment import registry

POLICIES: dict[str, Callable[..., list]] = {}


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


def get_policy(name, image_size: int, **kwargs) -> registry.Policy:
    """The augmentation policy `name` for views of image_size x image_size pixels.

    Args:
      name: a registered policy ('simclr', 'cxr', 'supervised', 'eval',
        'none'), or an op list ['op_name' or ('op_name', dict(...)), ...].
      image_size: output side in pixels.
      **kwargs: the policy's arguments (see its function below); none for an op list.

    Returns:
      A `registry.Policy`: `policy(image [h, w, c], seed [2]) -> [image_size, image_size, 3]`.
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
        return registry.Policy(name, image_size)
    if name not in POLICIES:
        auto = (
            "; 'auto' is resolved from the data by micle_jax.data.stream.pipeline "
            "(Data.augment_policy)"
            if name == "auto"
            else ""
        )
        raise ValueError(
            f"unknown augment policy {name!r}; registered: {', '.join(sorted(POLICIES))}, "
            f"or give an op list{auto}"
        )
    fn = POLICIES[name]
    registry.check_kwargs("policy", name, fn, kwargs)
    try:
        return registry.Policy(fn(**kwargs), image_size)
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


@register_policy("simclr_small")
def simclr_small(color_jitter_strength=0.5, blur_p=0.0, **kwargs):
    """SimCLR's views for small images (its CIFAR-10 command): colour jitter 0.5, no blur.

    google-research/simclr tf2/README trains CIFAR-10 with
    `--color_jitter_strength=0.5 --use_blur=False`: at a few dozen pixels a
    blur of sigma up to 2 px and full-strength colour jitter leave little of
    the image to match. The small-scale study and `make demo` use it for
    dermatology at 48 px; other arguments are simclr's.
    """
    return simclr(color_jitter_strength=color_jitter_strength, blur_p=blur_p, **kwargs)


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
