"""Synthetic cases, generated in memory: MICLe and a linear probe run without data.

Each class has its own colour, stripe orientation and stripe frequency; each
case has its own disk (position, size) and stripe phase; each image of a case
moves the disk a little, shifts brightness and adds noise, like repeat exams
of one patient. So the class is linearly decodable, two images of a case are
similar but not identical (a real MICLe positive pair), and everything is a
deterministic function of (split, options).
"""

from __future__ import annotations

import numpy as np

from micle_jax.data.sources import image_table

DEFAULTS = dict(num_cases=256, num_classes=10, image_size=64, max_images_per_case=3)
_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
_MAX_BYTES = 1024**3
_CHUNK = 256  # images generated at once, bounding float temporaries
_NOISE_BANK = 16


def num_cases_of(split: str, num_cases: int) -> int:
    """'train' has num_cases cases; 'validation' and 'test' a quarter (at least 1)."""
    return num_cases if split == "train" else max(1, num_cases // 4)


def check_options(options) -> None:
    """Raises ValueError for options that cannot make a dataset."""
    for key in DEFAULTS:
        if options[key] < 1:
            raise ValueError(f"synthetic source: {key}={options[key]} must be >= 1")
    if options.image_size < 8:
        raise ValueError(f"synthetic source: image_size={options.image_size} must be >= 8")
    worst = options.num_cases * options.max_images_per_case * options.image_size**2 * 3
    if worst > _MAX_BYTES:
        raise ValueError(
            f"synthetic source would hold up to {worst / 1024**3:.1f} GiB of pixels "
            f"(limit {_MAX_BYTES / 1024**3:.0f}); lower num_cases, image_size or "
            "max_images_per_case"
        )


def _palette(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [n, 3] one saturated colour per class (a cosine colour wheel)."""
    hue = classes[:, None] / num_classes + np.array([0.0, 1 / 3, 2 / 3])
    return (0.5 + 0.5 * np.cos(2 * np.pi * hue)).astype(np.float32)


def _render(params: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, size, size, 3] images from per-image parameter arrays [n]."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = coords[None, None, :], coords[None, :, None]
    theta = params["theta"][:, None, None]
    projection = x * np.cos(theta) + y * np.sin(theta)
    stripes = 0.5 + 0.5 * np.sin(
        2 * np.pi * params["frequency"][:, None, None] * projection + params["phase"][:, None, None]
    )
    image = params["colour"][:, None, None, :] * (0.35 + 0.65 * stripes[..., None])
    disk = (x - params["cx"][:, None, None]) ** 2 + (y - params["cy"][:, None, None]) ** 2
    inside = disk < params["radius"][:, None, None] ** 2
    image = np.where(inside[..., None], 1.0 - image, image) * params["gain"][:, None, None, None]
    # Noise fields drawn from a small bank: generating fresh Gaussian noise per
    # pixel would dominate the cost, and images already differ in every parameter.
    bank = 0.06 * rng.standard_normal((_NOISE_BANK, size, size, 3), dtype=np.float32)
    image = image + bank[rng.integers(0, _NOISE_BANK, len(image))]
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def make_table(
    split: str, num_cases: int, num_classes: int, image_size: int, max_images_per_case: int
) -> image_table.ImageTable:
    """The synthetic split as an ImageTable of RGB images [image_size, image_size, 3].

    Classes are balanced (case i has class i % num_classes before shuffling);
    each case has 1..max_images_per_case images, uniformly.
    """
    rng = np.random.default_rng(_SPLIT_SEEDS.get(split, 3))
    k = num_cases_of(split, num_cases)
    case_class = rng.permutation(np.arange(k) % num_classes)
    case_size = rng.integers(1, max_images_per_case + 1, size=k)
    case_of_image = np.repeat(np.arange(k), case_size)
    n = len(case_of_image)
    cls = case_class[case_of_image]
    per_case = {
        "cx": rng.uniform(0.3, 0.7, k),
        "cy": rng.uniform(0.3, 0.7, k),
        "radius": rng.uniform(0.12, 0.25, k),
        "phase": rng.uniform(0.0, 2 * np.pi, k),
    }
    params = {key: value[case_of_image].astype(np.float32) for key, value in per_case.items()}
    params["cx"] += rng.normal(0.0, 0.04, n).astype(np.float32)
    params["cy"] += rng.normal(0.0, 0.04, n).astype(np.float32)
    params["phase"] += rng.normal(0.0, 0.3, n).astype(np.float32)
    params["gain"] = rng.uniform(0.85, 1.15, n).astype(np.float32)
    params["theta"] = (np.pi * cls / num_classes).astype(np.float32)
    params["frequency"] = (2.0 + 2.0 * (cls % 3)).astype(np.float32)
    params["colour"] = _palette(cls, num_classes)
    images = []
    for start in range(0, n, _CHUNK):
        chunk = {key: value[start : start + _CHUNK] for key, value in params.items()}
        images.extend(_render(chunk, image_size, rng))
    case_ids = [f"synthetic-{split}-{i:06d}" for i in range(k)]
    image_ids = [f"{case_ids[c]}/{j}" for c, size in enumerate(case_size) for j in range(size)]
    return image_table.pack(
        images,
        image_ids=image_ids,
        label_class=cls,
        label_multi=np.zeros([n, 0], np.float32),
        case_ids=case_ids,
        case_size=case_size,
    )
