"""What every augmentation op shares: [0, 1] floats, stateless randomness, argument checks.

Every op is a pure function of (image, seed): its randomness is a fixed
number of uniforms in [0, 1) drawn from the seed (a [2] int tensor) by one
`tf.random.stateless_uniform` call (`draw_uniforms`), so a view is
reproducible from (image, seed) alone, eagerly or inside
`tf.data.Dataset.map`, which exact resume of the pipeline relies on. Built-in
ops are `RandomOp`s that say how many uniforms they use: a policy draws the
uniforms of all its ops in one call. Random ops cost ~15-30 us each inside
tf.data whatever their size, and drawing per number cost ~1 ms per 224 px view,
a third of the whole view.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tensorflow as tf

# An op maps (image [h, w, c] with c in {1, 3}, seed [2] int) to an image.
Op = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

# Pinned rather than 'auto_select' (which may pick another algorithm on another
# device or TF version), so a resumed run draws the same views.
RNG_ALG = "philox"


def to_unit_float(image: tf.Tensor) -> tf.Tensor:
    """Casts an image to float32 in [0, 1].

    Integer images are divided by their dtype's maximum (uint8 by 255, uint16
    by 65535, as `tf.image.convert_image_dtype`); float images are assumed to
    be in [0, 1] already and are only cast.

    Args:
      image: [..., c] uint8, uint16 or float.

    Returns:
      [..., c] float32.
    """
    if image.dtype == tf.float32:
        return image
    if image.dtype.is_floating:
        return tf.cast(image, tf.float32)
    return tf.image.convert_image_dtype(image, tf.float32)


def gray_to_rgb(image: tf.Tensor) -> tf.Tensor:
    """[h, w, 1] float32 -> [h, w, 3] with the gray value in every channel.

    A [h*w, 1] x [1, 3] matmul: about 2x cheaper on one CPU core than
    tf.image.grayscale_to_rgb (a concat along the innermost axis).
    """
    flat = tf.matmul(tf.reshape(image, [-1, 1]), tf.ones([1, 3], image.dtype))
    out = tf.reshape(flat, tf.concat([tf.shape(image)[:2], [3]], 0))
    out.set_shape(image.shape[:2].concatenate([3]))
    return out


def draw_uniforms(seed: tf.Tensor, n: int) -> tf.Tensor:
    """[n] float32 uniforms in [0, 1) from a [2] int stateless seed, in one random op.

    Counter-based (Philox): the first k numbers of a draw of n > k are the draw
    of k, so an op's leading uniforms can be reproduced by a shorter draw.
    """
    if n == 0:
        return tf.zeros([0], tf.float32)
    return tf.random.stateless_uniform([n], seed, dtype=tf.float32, alg=RNG_ALG)


def between(u, low, high) -> tf.Tensor:
    """Maps uniforms u in [0, 1) to [low, high) (as stateless_uniform's minval/maxval)."""
    return low + (high - low) * u


class RandomOp:
    """An augmentation op whose randomness is `num_uniforms` uniforms in [0, 1).

    `op(image, seed)` draws them from the seed (`draw_uniforms`) and returns
    `apply(image, u)`; a Policy calls `op.apply(image, u)` with its slice of one
    draw for the whole view. Ops document which uniform drives what.

    Args:
      apply: fn(image [h, w, c], u [num_uniforms] float32) -> image.
      num_uniforms: how many uniforms apply reads (a Python int >= 0).
      name: the op's registered name (for repr and errors).
    """

    def __init__(self, apply: Callable, num_uniforms: int, name: str):
        self.apply = apply
        self.num_uniforms = int(num_uniforms)
        self.__name__ = name

    def __call__(self, image, seed) -> tf.Tensor:
        return self.apply(image, draw_uniforms(seed, self.num_uniforms))

    def __repr__(self):
        return f"RandomOp({self.__name__}, num_uniforms={self.num_uniforms})"


def sub_seed(seed: tf.Tensor, index: int) -> tf.Tensor:
    """The `index`-th independent seed derived from `seed` (both [2] int)."""
    return tf.random.experimental.stateless_fold_in(seed, index, alg=RNG_ALG)


def uniform(seed: tf.Tensor, low, high, shape: Sequence[int] = ()) -> tf.Tensor:
    """Stateless float32 samples, uniform in [low, high); shape `shape`."""
    return tf.random.stateless_uniform(
        shape, seed, minval=low, maxval=high, dtype=tf.float32, alg=RNG_ALG
    )


def random_apply(fn: Callable[[tf.Tensor], tf.Tensor], p: float, image, u) -> tf.Tensor:
    """`fn(image)` with probability `p`, else `image` (as SimCLR's random_apply).

    With p of exactly 0 or 1 no branch is built, which keeps disabled ops
    free. `fn` must keep the image's shape and dtype.

    Args:
      fn: [h, w, c] -> [h, w, c].
      p: probability of applying `fn`.
      image: [h, w, c] float32.
      u: scalar float32 uniform in [0, 1); `fn` applies where u < p.
    """
    if p <= 0.0:
        return image
    if p >= 1.0:
        return fn(image)
    return tf.cond(u < p, lambda: fn(image), lambda: image)


# --- argument checks: each raises ValueError naming the argument and the fix ---


def check_probability(op: str, name: str, value) -> float:
    """Returns `value` as a float after checking it lies in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"augment op {op!r}: {name}={value!r} must be a probability in [0, 1]")
    return float(value)


def check_nonnegative(op: str, name: str, value) -> float:
    """Returns `value` as a float after checking it is a finite number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"augment op {op!r}: {name}={value!r} must be a finite number >= 0")
    return float(value)


def check_range(op: str, name: str, value, low: float | None = None, high: float | None = None):
    """Returns `value` as a (lo, hi) float pair with low <= lo <= hi <= high."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"augment op {op!r}: {name}={value!r} must be a pair (min, max) of numbers"
        ) from None
    bounds_ok = (low is None or lo >= low) and (high is None or hi <= high)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi and bounds_ok):
        allowed = f" within [{low}, {high}]" if low is not None or high is not None else ""
        raise ValueError(
            f"augment op {op!r}: {name}={value!r} must be a pair (min, max) "
            f"with min <= max{allowed}"
        )
    return lo, hi


def check_choice(op: str, name: str, value, choices: Sequence[str]) -> str:
    """Returns `value` after checking it is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"augment op {op!r}: {name}={value!r} is not accepted; use one of {', '.join(choices)}"
        )
    return value
