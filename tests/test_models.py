"""Tests for micle_jax/models: parameter counts, layout, freezing, heads, dtypes.

Cheap by design: counts use jax.eval_shape (no 375M-parameter arrays), real
forward passes use width-0.25 ResNets on 32x32 images, run eagerly (a jit of a
ResNet-200 costs minutes of XLA compilation on 2 cores; eager ops are compiled
once per shape and shared by all depths).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from micle_jax import config_lib, models
from micle_jax.models import resnet
from micle_jax.models.heads import LinearHead, ProjectionHead

IMAGES = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)


def _param_shapes(depth, width, sk_ratio=0.0):
    model = resnet.ResNet(depth=depth, width_multiplier=width, sk_ratio=sk_ratio)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    return variables["params"]


@pytest.mark.parametrize(
    "depth,width,expected",
    # torchvision's ResNet-50 minus its fc layer is 23,508,032: same v1 layout.
    [(50, 1, 23_508_032), (50, 2, 93_907_072), (50, 4, 375_378_176), (152, 2, 232_253_568)],
)
def test_backbone_parameter_counts_are_exact(depth, width, expected):
    assert models.count_params(_param_shapes(depth, width)) == expected


@pytest.mark.parametrize("depth,width,readme", [(50, 1, 35e6), (152, 3, 795e6)])
def test_selective_kernel_counts_match_simclr_readme(depth, width, readme):
    count = models.count_params(_param_shapes(depth, width, sk_ratio=0.0625))
    assert abs(count - readme) / readme < 0.03, count


def test_resnet18_has_simclr_projection_in_every_group():
    # SimCLR gives block_group1's first block a projection even where shapes match.
    params = _param_shapes(18, 1)
    assert models.count_params(params) == 11_176_512 + 64 * 64 + 2 * 64
    for group in resnet.STAGES[1:]:
        assert "proj_conv" in params[group]["block1"]
        assert "proj_conv" not in params[group]["block2"]


def _random_variables(model, images=IMAGES):
    """Random {'params', 'batch_stats'} from the shapes alone (no RNG compilation).

    Real init of a ResNet costs seconds of per-shape compilation; the forward
    tests only need well-scaled weights: kernels N(0, 1/fan_in), BN gammas and
    betas drawn around (1, 0), running averages at (0, 1).
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            value = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, size=leaf.shape)
        elif name == "var":
            value = np.ones(leaf.shape)
        elif name == "mean":
            value = np.zeros(leaf.shape)
        else:
            value = rng.normal(scale=0.1, size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize(
    "depth,sk_ratio,train",
    # ResNet-101/152/200 reuse ResNet-50's blocks; eval mode keeps them cheap.
    [(18, 0.0, True), (34, 0.0, True), (50, 0.0, True), (50, 0.0625, True)]
    + [(101, 0.0, False), (152, 0.0, False), (200, 0.0, False)],
)
def test_every_depth_runs_a_forward_pass(depth, sk_ratio, train):
    model = resnet.ResNet(depth=depth, width_multiplier=0.25, sk_ratio=sk_ratio)
    variables = _random_variables(model)
    num_blocks = sum(resnet.DEPTHS[depth][1])
    assert sum(len(variables["params"][g]) for g in resnet.STAGES[1:]) == num_blocks
    width = 16 * (8 if depth < 50 else 32)
    eval_out = model.apply(variables, IMAGES, train=False)
    outputs = [eval_out]
    if train:
        train_out, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
        outputs.append(train_out)
        # Batch statistics differ from the running averages (0 mean, 1 var).
        assert not np.allclose(train_out, eval_out, atol=1e-4)
        old = jax.tree.leaves(variables["batch_stats"])
        new = jax.tree.leaves(updates["batch_stats"])
        assert len(old) == len(new)
        assert all(not np.allclose(a, b) for a, b in zip(old, new, strict=True))
    for out in outputs:
        assert out.shape == (4, width) and out.dtype == jnp.float32
        assert np.all(np.isfinite(out)) and np.all(out >= 0)  # pooled after a ReLU
        assert np.std(out) > 1e-3  # not collapsed


@pytest.mark.parametrize(
    "block,last_bn",
    [
        (resnet.BasicBlock(features=8, strides=2, use_projection=True), "bn2"),
        (resnet.BottleneckBlock(features=8, strides=2, use_projection=True), "bn3"),
        (resnet.BottleneckBlock(features=8, strides=2, use_projection=True, sk_ratio=0.5), "bn3"),
    ],
)
def test_init_zeroes_only_the_last_batchnorm_of_a_block(block, last_bn):
    # The rbg key only makes the random kernels cheaper to compile eagerly.
    variables = block.init(jax.random.key(0, impl="rbg"), IMAGES[:2, :8, :8], train=False)
    flat = traverse_util.flatten_dict(variables["params"])
    for path, value in flat.items():
        if path[-1] == "scale":
            np.testing.assert_array_equal(value, 0.0 if path[-2] == last_bn else 1.0)
        if path[-1] == "bias":
            np.testing.assert_array_equal(value, 0.0)
    assert ("proj_bn", "scale") in flat and (last_bn, "scale") in flat
    # Convolutions: Keras VarianceScaling(1, fan_in), std = 1/sqrt(fan_in).
    kernel = np.asarray(flat[("conv1", "kernel")])
    assert abs(kernel.std() * np.sqrt(np.prod(kernel.shape[:-1])) - 1) < 0.15
    # At init the block is ReLU(shortcut): changing the residual branch's
    # weights does not change the output.
    images = IMAGES[:2, :8, :8]
    changed = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 1.0 if path[1].key == "conv1" else v, variables
    )
    np.testing.assert_array_equal(
        block.apply(variables, images, train=False), block.apply(changed, images, train=False)
    )


def test_fine_tune_after_block_freezes_earlier_stages():
    assert [resnet.frozen_stages(k) for k in (-1, 0, 4)] == [(), ("stem",), resnet.STAGES]
    model = resnet.ResNet(depth=18, width_multiplier=0.25, fine_tune_after_block=2)
    # Random (nonzero) BN gammas: every parameter gets a gradient unless frozen.
    variables = _random_variables(model)
    params, stats = variables["params"], variables["batch_stats"]
    direction = np.random.default_rng(1).normal(size=(128,)).astype(np.float32)

    @jax.jit  # a jitted gradient compiles faster than an eager one
    def grad(p):
        def loss(p):
            out, updates = model.apply(
                {"params": p, "batch_stats": stats}, IMAGES, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.tanh(out @ direction)), updates

        return jax.grad(loss, has_aux=True)(p)

    grads, updates = grad(params)
    frozen = resnet.frozen_stages(2)
    assert frozen == ("stem", "block_group1", "block_group2")
    for stage in resnet.STAGES:
        leaves = jax.tree.leaves(grads[stage])
        old = jax.tree.leaves(stats[stage])
        new = jax.tree.leaves(updates["batch_stats"][stage])
        if stage in frozen:
            assert all(not np.any(g) for g in leaves), stage
            # Frozen BatchNorm runs on running averages: nothing is updated.
            assert all(np.array_equal(a, b) for a, b in zip(old, new, strict=True)), stage
        else:
            assert all(np.any(g) for g in leaves), stage
            assert all(not np.array_equal(a, b) for a, b in zip(old, new, strict=True)), stage


def test_everything_frozen_trains_like_eval():
    # fine_tune_after_block=4: training mode must compute exactly the eval features.
    model = resnet.ResNet(depth=18, width_multiplier=0.25, fine_tune_after_block=4)
    variables = _random_variables(model)
    train_out, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(train_out, model.apply(variables, IMAGES, train=False))
    for a, b in zip(
        jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_computes_in_bf16_with_float32_params_and_outputs():
    config = models.get_config(depth=18, width=0.25, num_classes=3, dtype="bfloat16")
    model = models.build_model(config)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES, train=False))
    assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}

    def apply(v):
        return model.apply(v, IMAGES, train=True, mutable=["batch_stats"])

    out, updates = jax.eval_shape(apply, variables)
    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(out, jnp.dtype(jnp.float32))
    assert {v.dtype for v in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
    jaxpr = jax.make_jaxpr(apply)(variables)
    # Some convolutions are platform_dependent switches (models/conv.py): XLA's
    # convolution in one branch, a patch matmul in the CPU one; all compute in bf16.
    eqns = list(_all_eqns(jaxpr.jaxpr))
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(convs) == 21
    # patch matmuls (the 4 1x1 projection shortcuts), projection head, linear head
    assert len(dots) == 4 + 3 + 1
    assert all(eqn.invars[0].aval.dtype == jnp.bfloat16 for eqn in convs + dots)


def _all_eqns(jaxpr):
    """The equations of a jaxpr and of every jaxpr nested in them (cond branches, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _all_eqns(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    yield from _all_eqns(sub)


def _projection_head_reference(params, x):
    """NumPy SimCLR v2 projection head in training mode (batch statistics)."""
    h = np.asarray(x, np.float64)
    hiddens = [h]
    for i in range(1, len(params) // 2 + 1):
        h = h @ np.asarray(params[f"dense{i}"]["kernel"], np.float64)
        h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * np.asarray(params[f"bn{i}"]["scale"])
        if "bias" in params[f"bn{i}"]:
            h = np.maximum(h + np.asarray(params[f"bn{i}"]["bias"]), 0)
        hiddens.append(h)
    return hiddens


def test_projection_head_layers_and_reference():
    x = np.random.default_rng(2).normal(size=(16, 24)).astype(np.float32)
    head = ProjectionHead(num_layers=3, out_dim=8)
    variables = head.init(jax.random.key(0), x, train=False)
    params = variables["params"]
    # No Dense has a bias (SimCLR's LinearLayer with BN); only the last BN has no beta.
    assert {k: set(v) for k, v in params.items()} == {
        "dense1": {"kernel"},
        "dense2": {"kernel"},
        "dense3": {"kernel"},
        "bn1": {"scale", "bias"},
        "bn2": {"scale", "bias"},
        "bn3": {"scale"},
    }
    assert params["dense1"]["kernel"].shape == (24, 24)  # hidden_dim None = input dim
    assert params["dense3"]["kernel"].shape == (24, 8)
    assert abs(np.std(params["dense1"]["kernel"]) - 0.01) < 0.002
    # Random gammas / betas so the reference checks that they are applied.
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda v: v + rng.normal(size=v.shape).astype(np.float32), params)
    (proj, hiddens), _ = head.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    reference = _projection_head_reference(params, x)
    assert len(hiddens) == 4 and proj.shape == (16, 8) and proj.dtype == jnp.float32
    np.testing.assert_array_equal(hiddens[0], x)
    for got, want in zip(hiddens, reference, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(proj, hiddens[-1])
    assert np.any(reference[-1] < 0)  # no ReLU on the last layer
    wide = ProjectionHead(num_layers=2, out_dim=8, hidden_dim=40)
    shapes = jax.eval_shape(lambda: wide.init(jax.random.key(0), x, train=False))
    assert shapes["params"]["dense1"]["kernel"].shape == (24, 40)
    assert shapes["params"]["dense2"]["kernel"].shape == (40, 8)


def test_batchnorm_is_global_under_sharded_jit():
    # SimCLR's global_bn: with the batch split over 8 devices, statistics are
    # still those of the whole batch (the NumPy reference above).
    x = np.random.default_rng(4).normal(size=(16, 12)).astype(np.float32)
    head = ProjectionHead(num_layers=2, out_dim=4)
    variables = head.init(jax.random.key(0), x, train=False)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    assert len(sharded.sharding.device_set) == 8

    @jax.jit
    def project(v, images):
        return head.apply(v, images, train=True, mutable=["batch_stats"])[0][0]

    reference = _projection_head_reference(variables["params"], x)[-1]
    np.testing.assert_allclose(project(variables, sharded), reference, rtol=1e-4, atol=1e-4)


def test_linear_head_init_and_output():
    x = np.random.default_rng(5).normal(size=(3, 300)).astype(np.float32)
    head = LinearHead(num_classes=50)
    params = head.init(jax.random.key(0), x)["params"]
    assert abs(np.std(params["dense"]["kernel"]) - 0.01) < 0.001
    np.testing.assert_array_equal(params["dense"]["bias"], 0.0)
    logits = head.apply({"params": params}, x)
    assert logits.shape == (3, 50) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, x @ params["dense"]["kernel"], rtol=1e-5, atol=1e-5)


class _TinyBackbone(nn.Module):
    """Stand-in backbone: [B, H, W, C] -> [B, 6] (keeps head tests cheap)."""

    @nn.compact
    def __call__(self, images, train):
        return nn.Dense(6)(images.reshape(images.shape[0], -1))


@pytest.mark.parametrize("head_input,head_stop_gradient", [(0, True), (1, False), (2, True)])
def test_head_input_selects_the_hidden_layer(head_input, head_stop_gradient):
    model = models.SimCLRModel(
        backbone=_TinyBackbone(),
        projection_head=ProjectionHead(num_layers=2, out_dim=4),
        head=LinearHead(num_classes=3),
        head_input=head_input,
        head_stop_gradient=head_stop_gradient,
    )
    images = IMAGES[:, :4, :4]
    variables = model.init(jax.random.key(0), images, train=False)
    assert set(variables["params"]) == {"backbone", "projection_head", "head"}
    out, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    (_, hiddens), _ = ProjectionHead(num_layers=2, out_dim=4).apply(
        {
            "params": variables["params"]["projection_head"],
            "batch_stats": variables["batch_stats"]["projection_head"],
        },
        out["features"],
        train=True,
        mutable=["batch_stats"],
    )
    np.testing.assert_allclose(out["projections"], hiddens[-1], atol=1e-6)
    expected = LinearHead(3).apply({"params": variables["params"]["head"]}, hiddens[head_input])
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)

    def logit_sum(params):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        return model.apply(v, images, train=True, mutable=["batch_stats"])[0]["logits"].sum()

    grads = jax.jit(jax.grad(logit_sum))(variables["params"])
    backbone_grad = np.abs(grads["backbone"]["Dense_0"]["kernel"]).sum()
    assert (backbone_grad == 0) == head_stop_gradient


def test_build_model_from_config():
    config = ml_collections.ConfigDict(
        dict(name="resnet", depth=18, width=0.25, proj_layers=2, proj_dim=16, num_classes=7)
    )
    model = models.build_model(config)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES, train=False))
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"backbone", "projection_head", "head"}
    assert set(variables["params"]["backbone"]) == set(resnet.STAGES)
    out = jax.eval_shape(lambda v: model.apply(v, IMAGES, train=False), variables)
    assert {k: v.shape for k, v in out.items()} == {
        "features": (4, 128),
        "projections": (4, 16),
        "logits": (4, 7),
    }
    no_head = models.build_model(models.get_config(depth=18, width=0.25))
    variables = jax.eval_shape(lambda: no_head.init(jax.random.key(0), IMAGES, train=False))
    assert "head" not in variables["params"]
    assert models.count_params(variables["params"]["projection_head"]) == 3 * 128 * 128 + 5 * 128


def _stem_and_last_map(config, size):
    """(stem param shapes, [H, W] of block_group4's output) for a size x size input."""
    model = models.build_model(config)
    images = jnp.zeros((2, size, size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))

    def apply(v):
        capture = lambda mdl, _: mdl.name == "block_group4"  # noqa: E731
        return model.apply(v, images, train=False, capture_intermediates=capture)

    _, state = jax.eval_shape(apply, variables)
    last = state["intermediates"]["backbone"]["block_group4"]["__call__"][0]
    stem = traverse_util.flatten_dict(variables["params"]["backbone"]["stem"], sep="/")
    return {k: v.shape for k, v in stem.items() if k.endswith("kernel")}, last.shape[1:3]


@pytest.mark.parametrize(
    "config",
    [models.get_config(depth=18, width=0.25), config_lib.model_config("r18x0.25")],
    ids=["models.get_config", "config_lib.model_config"],
)
def test_stem_default_follows_simclr_image_size_rule(config):
    """SimCLR tf2/model.py: cifar_stem=FLAGS.image_size <= 32, by default from both configs."""
    assert config.cifar_stem is None  # 'decide from the image size'
    # 32 px: one 3x3/1 conv and no max-pool, so only block groups 2-4 halve: 32 -> 4.
    assert _stem_and_last_map(config, 32) == ({"conv1/kernel": (3, 3, 3, 16)}, (4, 4))
    # 64 px: ImageNet stem (7x7/2 conv + 3x3/2 max-pool): 64 / 32 = 2.
    assert _stem_and_last_map(config, 64) == ({"conv1/kernel": (7, 7, 3, 16)}, (2, 2))


@pytest.mark.parametrize("sk_ratio", [0.0, 0.0625])
def test_cifar_stem_override_wins_both_ways(sk_ratio):
    cifar = models.get_config(depth=50, width=0.25, sk_ratio=sk_ratio, cifar_stem=True)
    assert _stem_and_last_map(cifar, 64) == ({"conv1/kernel": (3, 3, 3, 16)}, (8, 8))
    imagenet = models.get_config(depth=50, width=0.25, sk_ratio=sk_ratio, cifar_stem=False)
    want = {"conv1/kernel": (7, 7, 3, 16)}
    if sk_ratio:  # SimCLR v2's ResNet-D stem: three 3x3 convs, outside the CIFAR case only.
        want = {"conv1/kernel": (3, 3, 3, 8), "conv2/kernel": (3, 3, 8, 8)}
        want["conv3/kernel"] = (3, 3, 8, 16)
    assert _stem_and_last_map(imagenet, 32) == (want, (1, 1))


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(name="vit"), "model.name"),
        (dict(depth=42), "model.depth"),
        (dict(width=0.001), "model.width"),
        (dict(sk_ratio=1.5), "model.sk_ratio"),
        (dict(dtype="float16"), "model.dtype"),
        (dict(head_input=4), "model.head_input"),
        (dict(proj_layers=-1), "model.proj_layers"),
        (dict(num_classes=-2), "model.num_classes"),
        (dict(fine_tune_after_block=5), "model.fine_tune_after_block"),
        (dict(head_stop_gradient="yes"), "model.head_stop_gradient"),
        (dict(bn_momentum=1.5), "model.bn_momentum"),
        (dict(cifar_stem="yes"), "model.cifar_stem='yes' must be True"),
        (dict(widht=2), "widht"),
    ],
)
def test_bad_config_values_are_named(overrides, field):
    config = ml_collections.ConfigDict(dict(config_lib.MODEL_DEFAULTS, **overrides))
    with pytest.raises(ValueError, match=field):
        models.build_model(config)


def test_bad_inputs_get_clear_errors():
    model = resnet.ResNet(depth=18, width_multiplier=0.25)
    with pytest.raises(ValueError, match="batch, height, width"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES[0], train=False))
    with pytest.raises(ValueError, match="float images"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES.astype(np.uint8), train=False))
    with pytest.raises(ValueError, match="fine_tune_after_block"):
        resnet.frozen_stages(7)
