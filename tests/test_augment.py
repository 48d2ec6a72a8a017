"""Tests for micle_jax/data/augment/ registry.py and policies.py: ops, policies, contract.

Every op and policy must give the same view eagerly and inside Dataset.map
(big_vision found these can differ). The ops themselves are tested in
test_geometry.py, test_color.py and test_blur.py.
"""

import numpy as np
import pytest
import tensorflow as tf
from fixtures.augment_images import (
    gray_image,
    make_op,
    map_over_seeds,
    rgb_image,
)

from micle_jax.data.augment import crop_boxes, op_base, policies, registry

# --- eager == Dataset.map, determinism, output contract ---

OP_SPECS = [
    ("random_resized_crop", dict(size=16)),
    ("random_rotated_crop", dict(size=16, max_degrees=30.0, p=0.7)),
    ("center_crop", dict(size=16)),
    ("resize", dict(size=16)),
    ("flip_left_right", dict(p=0.5)),
    ("rotate", dict(max_degrees=30.0, p=0.7)),
    ("color_jitter", dict(strength=1.0, p=0.8)),
    ("color_jitter", dict(strength=1.0, p=0.8, impl="linear")),
    ("grayscale", dict(p=0.5)),
    ("to_gray", {}),
    ("gaussian_blur", dict(p=0.5, kernel_fraction=0.25)),
]


def test_every_registered_op_is_tested():  # in the eager/map test below
    assert {name for name, _ in OP_SPECS} == set(registry.OPS)


@pytest.mark.parametrize("name,kwargs", OP_SPECS, ids=[s[0] for s in OP_SPECS])
@pytest.mark.parametrize("channels", [1, 3])
def test_op_same_eagerly_and_in_dataset_map(name, kwargs, channels):
    op = make_op(name, **kwargs)
    image = tf.constant(rgb_image()[..., :channels])
    seeds = [tf.constant([s, 99], tf.int32) for s in range(4)]
    eager = np.stack([op(image, s).numpy() for s in seeds])
    mapped = np.stack(
        list(
            tf.data.Dataset.from_tensor_slices(tf.stack(seeds))
            .map(lambda s: op(image, s))
            .as_numpy_iterator()
        )
    )
    # Same random draws; floats may differ by rounding (Grappler rewrites the
    # graph's arithmetic), far below any augmentation's effect.
    np.testing.assert_allclose(eager, mapped, atol=2e-5)


@pytest.mark.parametrize("name", sorted(policies.POLICIES))
def test_policy_same_eagerly_and_in_dataset_map_and_deterministic(name):
    policy = policies.get_policy(name, 24)
    image = tf.constant((rgb_image(50, 44) * 255).astype(np.uint8))
    seeds = tf.constant([[s, 7] for s in range(5)], tf.int64)
    eager = np.stack([policy(image, s).numpy() for s in seeds])
    mapped = np.stack(
        list(
            tf.data.Dataset.from_tensor_slices(seeds)
            .map(lambda s: policy(image, s), num_parallel_calls=2)
            .as_numpy_iterator()
        )
    )
    np.testing.assert_allclose(eager, mapped, atol=2e-5)
    np.testing.assert_array_equal(eager[0], policy(image, seeds[0]).numpy())
    distinct = len({v.tobytes() for v in eager})
    assert distinct == (1 if name in ("eval", "none") else len(eager))


@pytest.mark.parametrize("name", sorted(policies.POLICIES))
@pytest.mark.parametrize(
    "image",
    [
        (rgb_image(70, 64) * 255).astype(np.uint8),
        (gray_image(70, 64) * 255).astype(np.uint8),
        (gray_image(28, 28)[..., 0] * 255).astype(np.uint8),  # MedMNIST-like [h, w]
        (gray_image(30, 36) * 65535).astype(np.uint16),
        rgb_image(30, 36).astype(np.float64),
    ],
    ids=["rgb_u8", "gray_u8", "gray_2d", "gray_u16", "rgb_f64"],
)
def test_policy_output_contract(name, image):
    view = policies.get_policy(name, 20)(image, tf.constant([1, 2])).numpy()
    assert view.shape == (20, 20, 3) and view.dtype == np.float32
    assert view.min() >= 0.0 and view.max() <= 1.0
    if image.ndim == 2 or image.shape[-1] == 1 or name == "cxr":
        np.testing.assert_array_equal(view[..., 0], view[..., 1])
        np.testing.assert_array_equal(view[..., 0], view[..., 2])


@pytest.mark.parametrize("name", ["simclr", "cxr"])
def test_uint8_and_float_inputs_give_the_same_view(name):
    image = (rgb_image(50, 60) * 255).astype(np.uint8)
    policy = policies.get_policy(name, 24)
    seed = tf.constant([5, 6])
    np.testing.assert_allclose(
        policy(image, seed).numpy(), policy(image / np.float32(255), seed).numpy(), atol=2e-5
    )


def test_gray_image_gives_the_view_of_its_rgb_copy():
    # Saturation, hue and grayscale are the identity on gray pixels, so the
    # 1-channel fast path must agree with running the full RGB path.
    gray = gray_image(40, 40)
    policy = policies.get_policy("simclr", 24, blur_p=1.0)
    for s in range(5):
        seed = tf.constant([s, 3])
        np.testing.assert_allclose(
            policy(gray, seed).numpy(), policy(np.repeat(gray, 3, -1), seed).numpy(), atol=1e-3
        )


def test_simclr_policy_has_the_recipe_ops():
    policy = policies.get_policy("simclr", 224)
    assert [name for name, _ in policy.ops] == [
        "random_resized_crop",
        "flip_left_right",
        "color_jitter",
        "grayscale",
        "gaussian_blur",
    ]
    kwargs = dict(policy.ops)
    assert kwargs["color_jitter"] == dict(strength=1.0, p=0.8, impl="hsv")
    assert kwargs["grayscale"] == dict(p=0.2) and kwargs["gaussian_blur"]["p"] == 0.5
    weaker = policies.get_policy("simclr", 224, color_jitter_strength=0.5)
    assert dict(weaker.ops)["color_jitter"]["strength"] == 0.5


def test_simclr_small_is_simclrs_cifar_recipe():
    # tf2/README's CIFAR-10 command: --color_jitter_strength=0.5 --use_blur=False.
    ops = dict(policies.get_policy("simclr_small", 32).ops)
    assert ops["color_jitter"] == dict(strength=0.5, p=0.8, impl="hsv")
    assert ops["grayscale"] == dict(p=0.2) and ops["gaussian_blur"]["p"] == 0.0
    assert (
        ops["random_resized_crop"]
        == dict(policies.get_policy("simclr", 32).ops)["random_resized_crop"]
    )
    # A view is the simclr view with the same draws but those two settings.
    image = (rgb_image(50, 44) * 255).astype(np.uint8)
    same = policies.get_policy("simclr", 24, color_jitter_strength=0.5, blur_p=0.0)
    for s in range(3):
        seed = tf.constant([s, 4])
        np.testing.assert_array_equal(
            policies.get_policy("simclr_small", 24)(image, seed).numpy(),
            same(image, seed).numpy(),
        )


# --- chest X-ray policy ---


def test_cxr_never_blurs_and_is_gray():
    policy = policies.get_policy("cxr", 24)
    names = [name for name, _ in policy.ops]
    assert "gaussian_blur" not in names
    assert dict(policy.ops)["random_rotated_crop"]["max_degrees"] == 45.0
    assert dict(policy.ops)["color_jitter"]["saturation"] == 0.0
    # A sharp checkerboard keeps its edges: neighbouring pixels still differ a lot.
    board = np.kron((np.indices((8, 8)).sum(0) % 2), np.ones((6, 6))).astype(np.float32)
    policy = policies.get_policy(
        "cxr", 48, area_range=(1.0, 1.0), max_degrees=0.0, color_jitter_p=0.0
    )
    views = map_over_seeds(lambda s: policy(board[..., None], s), n=20)
    assert np.abs(np.diff(views[..., 0], axis=2)).max(axis=(1, 2)).min() > 0.99


def test_cxr_on_real_chest_xray(shared_data):
    path = sorted((shared_data / "hannover-covid-cxr" / "png").glob("*.png"))[0]
    image = tf.io.decode_png(tf.io.read_file(str(path)), channels=1)
    assert image.shape[0] > 500
    for name in ("cxr", "simclr", "eval"):
        view = policies.get_policy(name, 64)(image, tf.constant([0, 1])).numpy()
        assert view.shape == (64, 64, 3) and 0 <= view.min() and view.max() <= 1
        assert view.std() > 0.02  # an X-ray, not a blank


# --- evaluation transform ---


def test_eval_transform_centre_crops_87_5_percent():
    image = np.arange(40 * 32, dtype=np.float32).reshape(40, 32, 1) / (40 * 32)
    # min side 32 -> crop side rint(0.875 * 32) = 28 at offsets (40-28+1)//2, (32-28+1)//2.
    view = policies.eval_transform(image, 28).numpy()
    np.testing.assert_allclose(view, np.repeat(image[6:34, 2:30], 3, -1), atol=1e-5)
    assert policies.eval_transform(image, 16).shape == (16, 16, 3)
    np.testing.assert_array_equal(
        crop_boxes.center_crop_box(640, 700, 0.875).numpy(), [40, 70, 560, 560]
    )


# --- configuration: custom op lists, registry, errors ---


def test_custom_op_list_and_registered_op():
    ops = [("random_resized_crop", dict(area_range=(0.5, 1.0))), "flip_left_right"]
    view = policies.get_policy(ops, 16)(rgb_image(), tf.constant([0, 0]))
    assert view.shape == (16, 16, 3)

    @registry.register_op("invert_for_test")
    def make_invert():
        return lambda image, seed: 1.0 - op_base.to_unit_float(image)

    try:
        policy = policies.get_policy(["resize", "invert_for_test"], 8)
        image = np.full((8, 8, 3), 0.25, np.float32)
        np.testing.assert_allclose(policy(image, tf.constant([0, 0])), 0.75)
        with pytest.raises(ValueError, match="already registered"):
            registry.register_op("invert_for_test", lambda: None)
    finally:
        del registry.OPS["invert_for_test"]


def test_policy_draws_every_uniform_in_one_call_and_slices_in_op_order():
    crop = make_op("random_resized_crop", size=16, area_range=(0.5, 1.0))
    jitter = make_op("color_jitter")  # defaults, as the policy's
    flip = make_op("flip_left_right")
    policy = policies.get_policy(
        [("random_resized_crop", dict(area_range=(0.5, 1.0))), "color_jitter", "flip_left_right"],
        16,
    )
    assert policy.num_uniforms == crop.num_uniforms + jitter.num_uniforms + flip.num_uniforms
    # The crop's two uniforms seed TensorFlow's box sampler (crop_boxes.crop_box).
    assert (crop.num_uniforms, jitter.num_uniforms, flip.num_uniforms) == (2, 9, 1)
    image = tf.constant(rgb_image())
    for s in range(4):
        seed = tf.constant([s, 3])
        u = op_base.draw_uniforms(seed, policy.num_uniforms)
        expected = flip.apply(jitter.apply(crop.apply(image, u[:2]), u[2:11]), u[11:])
        np.testing.assert_allclose(policy(image, seed), expected, atol=1e-6)
    # A leading slice of a draw is the shorter draw (Philox is counter-based),
    # so an op called on its own with the seed reads the policy's first uniforms.
    seed = tf.constant([7, 3])
    np.testing.assert_array_equal(
        op_base.draw_uniforms(seed, 2), op_base.draw_uniforms(seed, 12)[:2]
    )
    alone = policies.get_policy([("random_resized_crop", dict(area_range=(0.5, 1.0)))], 16)
    np.testing.assert_allclose(crop(image, seed), alone(image, seed), atol=1e-6)


def test_plain_function_op_gets_its_own_seed():
    @registry.register_op("seed_probe_for_test")
    def make_probe():
        # Fills the view with a uniform drawn from the seed the op receives.
        return lambda image, seed: image * 0.0 + op_base.uniform(seed, 0.0, 1.0)

    try:
        policy = policies.get_policy(["resize", "flip_left_right", "seed_probe_for_test"], 4)
        seed = tf.constant([5, 6])
        expected = op_base.uniform(op_base.sub_seed(seed, 2), 0.0, 1.0)
        np.testing.assert_allclose(policy(rgb_image(), seed), np.full((4, 4, 3), expected))
        assert policy.num_uniforms == 1  # resize draws none, the flip one, the plain op none
    finally:
        del registry.OPS["seed_probe_for_test"]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: policies.get_policy("simclrr", 32), "unknown augment policy.*simclr"),
        (lambda: policies.get_policy(None, 32), "neither a policy name.*cxr"),
        (lambda: policies.get_policy(["resize", "blurr"], 32), "unknown augment op.*gaussian_blur"),
        (
            lambda: policies.get_policy("simclr", 32, colour_jitter_strength=0.5),
            "unknown argument.*colour_jitter_strength.*color_jitter_strength",
        ),
        (lambda: policies.get_policy([("resize", dict(size=8))], 32), "unknown argument.*size"),
        (lambda: policies.get_policy("simclr", 32, flip_p=1.5), "flip_left_right.*probability"),
        (lambda: policies.get_policy("simclr", 32, area_range=(0.9, 0.1)), "area_range"),
        (lambda: policies.get_policy("simclr", 32, color_jitter_strength=-1), "strength"),
        (lambda: policies.get_policy("simclr", 32, color_jitter_strength=3), "hue"),
        (lambda: policies.get_policy("cxr", 32, fill_mode="edge"), "fill_mode.*nearest"),
        (lambda: policies.get_policy("cxr", 32, max_degrees=200), "max_degrees"),
        (lambda: policies.get_policy(["flip_left_right"], 32), "never bring.*random_resized"),
        (lambda: policies.get_policy(["resize"], 32, p=1), "named policy only"),
        (lambda: policies.get_policy([("resize", 3)], 32), "op spec"),
        (lambda: policies.get_policy("none", 0), "image_size"),
        (
            lambda: policies.get_policy("none", 8)(np.zeros((8, 8, 4), np.uint8), [0, 0]),
            "channels",
        ),
        (lambda: policies.get_policy("none", 8)(np.zeros((2, 8, 8, 3)), [0, 0]), "batches"),
        (lambda: policies.get_policy("none", 8)(np.zeros((8, 8, 3)), [0, 0, 0]), "seed"),
        (lambda: policies.get_policy("none", 8)(np.zeros((8, 8, 3)), [0.5, 1.0]), "seed"),
    ],
)
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
