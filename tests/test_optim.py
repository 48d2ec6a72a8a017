"""Tests for micle_jax/optim.py against NumPy transcriptions of SimCLR's rules."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from micle_jax import config_lib, optim, recipes

# Flax parameter path -> the variable name SimCLR's TF model would give it.
SIMCLR_NAMES = {
    ("Conv_0", "kernel"): "conv2d/kernel",
    ("Dense_0", "kernel"): "dense/kernel",
    ("Dense_0", "bias"): "dense/bias",
    ("Dense_1", "kernel"): "head_supervised/kernel",
    ("BatchNorm_0", "scale"): "batch_normalization/gamma",
    ("BatchNorm_0", "bias"): "batch_normalization/beta",
}


def _config(**overrides):
    fields = dict(name="lars", base_lr=0.075, lr_scaling="sqrt", weight_decay=1e-4)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
        "Dense_0": {
            "kernel": rng.normal(size=(4, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32),
        },
        # All zeros: exercises LARS's zero-norm guard (trust ratio 1).
        "Dense_1": {"kernel": np.zeros((3, 2), np.float32)},
        "BatchNorm_0": {
            "scale": (1 + 0.1 * rng.normal(size=(4,))).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32),
        },
    }


def _flat(tree):
    return {
        tuple(k.key for k in path): leaf if isinstance(leaf, bool) else np.asarray(leaf, np.float64)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def simclr_lars_step(
    params, grads, velocity, lr, weight_decay, eeta, momentum, nesterov, head_excluded
):
    """NumPy transcription of SimCLR tf2/lars_optimizer.py, classic momentum.

    Exclusion follows SimCLR's rule on TF variable names: no weight decay and
    no layer adaptation for 'batch_normalization' and 'bias' variables. With
    head_excluded (SimCLR tf2/model.py), 'head_supervised' kernels get weight
    decay (through the loss) but no layer adaptation.
    """
    new_params, new_velocity = {}, {}
    for key, w in params.items():
        name = SIMCLR_NAMES[key]
        included = "batch_normalization" not in name and "bias" not in name
        g = grads[key]
        if included:
            g = g + weight_decay * w
        trust = 1.0
        if included and not (head_excluded and "head_supervised" in name):
            w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
            trust = eeta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
        scaled_lr = lr * trust
        v = momentum * velocity[key] + scaled_lr * g
        update = momentum * v + scaled_lr * g if nesterov else v
        new_params[key] = w - update
        new_velocity[key] = v
    return new_params, new_velocity


@pytest.mark.parametrize("nesterov,head_excluded", [(False, False), (True, False), (False, True)])
def test_lars_matches_simclr_update_rule(nesterov, head_excluded):
    exclude = ("^Dense_1/",) if head_excluded else ()
    config = _config(nesterov=nesterov, trust_ratio_exclude=exclude)
    # Warm-up over the first 3 steps, so the learning rate changes each step.
    schedule = optim.make_schedule(config, total_steps=10, warmup_steps=3, global_batch_size=64)
    tx = optim.make_optimizer(config, schedule)
    params = jax.tree.map(jnp.asarray, _params())
    state = tx.init(params)
    update = jax.jit(tx.update)

    ref_params = _flat(params)
    velocity = {k: np.zeros_like(v) for k, v in ref_params.items()}
    rng = np.random.default_rng(1)
    for step in range(6):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, p.dtype), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ref_params, velocity = simclr_lars_step(
            ref_params,
            _flat(grads),
            velocity,
            float(schedule(step)),
            1e-4,
            1e-3,
            0.9,
            nesterov,
            head_excluded,
        )
        for key, got in _flat(params).items():
            np.testing.assert_allclose(got, ref_params[key], atol=1e-6, err_msg=str((step, key)))
    # The zero kernel moved (trust ratio 1, not 0/0) and every leaf moved.
    for key, start in _flat(_params()).items():
        assert not np.allclose(ref_params[key], start), key


def test_lars_is_optax_lars_with_one_pass_per_norm():
    # optim's LARS is optax.lars with its own trust ratio: the same state (old
    # checkpoints restore), the same updates, but each norm computed once.
    config = _config(trust_ratio_exclude=())
    schedule = optim.make_schedule(config, total_steps=10, warmup_steps=3, global_batch_size=64)
    ours = optim.make_optimizer(config, schedule)
    reference = optax.lars(
        schedule,
        weight_decay=1e-4,
        weight_decay_mask=optim.decay_mask,
        trust_coefficient=1e-3,
        eps=0.0,
        trust_ratio_mask=optim.decay_mask,
        momentum=0.9,
        nesterov=False,
    )
    params = jax.tree.map(jnp.asarray, _params())
    states = [ours.init(params), reference.init(params)]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    rng = np.random.default_rng(2)
    for _ in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        (u0, states[0]), (u1, states[1]) = (
            jax.jit(tx.update)(grads, state, params)
            for tx, state in zip((ours, reference), states, strict=True)
        )
        jax.tree.map(np.testing.assert_array_equal, u0, u1)
        params = optax.apply_updates(params, u0)

    def sqrts(tx):
        # Each norm is one sqrt, nested jaxprs (jnp.linalg.norm's jit) included.
        def count(jaxpr):
            n = 0
            for eqn in jaxpr.eqns:
                n += eqn.primitive.name == "sqrt"
                n += sum(count(p.jaxpr) for p in eqn.params.values() if hasattr(p, "jaxpr"))
            return n

        return count(jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr)

    kernels = sum(jax.tree.leaves(optim.decay_mask(params)))
    assert (sqrts(ours), sqrts(reference)) == (2 * kernels, 4 * kernels)


def keras_sgd_step(params, grads, velocity, lr, momentum, nesterov):
    """NumPy transcription of Keras SGD, SimCLR's 'momentum' optimizer (tf2/model.py).

    v = m v - lr g; w = w + m v - lr g with Nesterov (SimCLR), else w = w + v.
    """
    new_params, new_velocity = {}, {}
    for key, w in params.items():
        g = grads[key]
        v = momentum * velocity[key] - lr * g
        new_params[key] = w + momentum * v - lr * g if nesterov else w + v
        new_velocity[key] = v
    return new_params, new_velocity


def _run(tx, grads_seq):
    params = jax.tree.map(jnp.asarray, _params())
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return _flat(params)


def _grads_seq(steps=3):
    rng = np.random.default_rng(5)
    return [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), _params())
        for _ in range(steps)
    ]


def test_momentum_from_the_default_config_is_simclr_nesterov_sgd():
    """SimCLR's momentum optimizer is Keras SGD(nesterov=True); the default config follows it."""
    config = config_lib.optim_config(
        name="momentum", base_lr=0.1, lr_scaling="sqrt", weight_decay=0.0
    )
    assert optim.uses_nesterov(config)
    grads_seq = _grads_seq()
    # Constant lr: exactly optax.sgd with Nesterov, not without.
    got = _run(optim.make_optimizer(config, optax.constant_schedule(0.5)), grads_seq)
    want = _run(optax.sgd(0.5, momentum=0.9, nesterov=True), grads_seq)
    classic = _run(optax.sgd(0.5, momentum=0.9, nesterov=False), grads_seq)
    for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=str(key))
    assert not all(np.allclose(got[k], classic[k]) for k in got)
    # A warm-up (a new lr every step): Keras' rule step by step.
    schedule = optim.make_schedule(config, total_steps=10, warmup_steps=3, global_batch_size=256)
    tx = optim.make_optimizer(config, schedule)
    params = jax.tree.map(jnp.asarray, _params())
    state = tx.init(params)
    ref = _flat(params)
    velocity = {k: np.zeros_like(v) for k, v in ref.items()}
    for step, grads in enumerate(grads_seq):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        lr = float(schedule(step))
        ref, velocity = keras_sgd_step(ref, _flat(grads), velocity, lr, 0.9, True)
        for key, value in _flat(params).items():
            np.testing.assert_allclose(value, ref[key], rtol=1e-6, atol=1e-6, err_msg=str(key))


def test_lars_from_the_default_config_uses_classic_momentum():
    """SimCLR's LARSOptimizer runs with use_nesterov=False; so does the pre-training recipe."""
    config = recipes.pretrain_config("r50x1").optim  # lr 0.075, weight decay 1e-4
    assert config.name == "lars" and not optim.uses_nesterov(config)
    grads_seq = _grads_seq()
    got = _run(optim.make_optimizer(config, optax.constant_schedule(0.5)), grads_seq)
    for nesterov in (False, True):
        ref = _flat(jax.tree.map(jnp.asarray, _params()))
        velocity = {k: np.zeros_like(v) for k, v in ref.items()}
        for grads in grads_seq:
            ref, velocity = simclr_lars_step(
                # Its trust_ratio_exclude ('^head/') matches none of these names.
                ref,
                _flat(grads),
                velocity,
                0.5,
                1e-4,
                1e-3,
                0.9,
                nesterov,
                False,
            )
        close = all(np.allclose(got[k], ref[k], rtol=1e-5, atol=1e-6) for k in got)
        assert close == (not nesterov), nesterov


def test_decay_mask_selects_kernels_of_a_flax_model():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=False)(x)
            x = nn.Dense(3)(x.mean(axis=(1, 2)))
            return nn.Dense(2, use_bias=False)(x)

    # Shapes are all decay_mask needs; eval_shape skips the computation.
    variables = jax.eval_shape(Tiny().init, jax.random.key(0), jnp.ones((2, 8, 8, 3)))
    mask = _flat(optim.decay_mask(variables["params"]))
    assert mask == {
        ("Conv_0", "kernel"): True,
        ("Conv_0", "bias"): False,
        ("BatchNorm_0", "scale"): False,
        ("BatchNorm_0", "bias"): False,
        ("Dense_0", "kernel"): True,
        ("Dense_0", "bias"): False,
        ("Dense_1", "kernel"): True,
    }


def test_scaled_learning_rate():
    assert math.isclose(optim.scaled_learning_rate(0.075, "sqrt", 4096), 4.8)
    assert math.isclose(optim.scaled_learning_rate(0.3, "linear", 4096), 4.8)
    assert math.isclose(optim.scaled_learning_rate(0.1, "linear", 512), 0.2)
    with pytest.raises(ValueError, match="lr_scaling='cube'.*sqrt.*linear"):
        optim.scaled_learning_rate(0.1, "cube", 256)
    with pytest.raises(ValueError, match="global_batch_size"):
        optim.scaled_learning_rate(0.1, "sqrt", 0)


def simclr_warmup_cosine(step, peak, warmup, total):
    """NumPy transcription of SimCLR tf2/model.py WarmUpAndCosineDecay."""
    warm = step / warmup * peak if warmup else peak
    decay_steps = total - warmup
    t = min(step - warmup, decay_steps)
    cosine = peak * 0.5 * (1 + np.cos(np.pi * t / decay_steps))
    return warm if step < warmup else cosine


def test_cosine_schedule_matches_simclr():
    schedule = optim.make_schedule(
        _config(), total_steps=100, warmup_steps=10, global_batch_size=4096
    )
    np.testing.assert_allclose(float(schedule(0)), 0.0)
    np.testing.assert_allclose(float(schedule(5)), 2.4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 4.8, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(55)), 2.4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(schedule(150)), 0.0, atol=1e-6)
    steps = np.arange(0, 120)
    want = [simclr_warmup_cosine(s, 4.8, 10, 100) for s in steps]
    np.testing.assert_allclose(np.asarray(jax.vmap(schedule)(steps)), want, rtol=1e-5, atol=1e-6)


def test_linear_and_constant_schedules_and_no_warmup():
    linear = optim.make_schedule(_config(schedule="linear"), 100, 10, 4096)
    assert [round(float(linear(s)), 5) for s in (0, 10, 55, 100)] == [0.0, 4.8, 2.4, 0.0]
    constant = optim.make_schedule(_config(schedule="constant"), 100, 10, 4096)
    assert [round(float(constant(s)), 5) for s in (0, 5, 10, 55, 100)] == [0, 2.4, 4.8, 4.8, 4.8]
    no_warmup = optim.make_schedule(_config(), 100, 0, 4096)
    np.testing.assert_allclose(float(no_warmup(0)), 4.8, rtol=1e-6)
    all_warmup = optim.make_schedule(_config(), 4, 4, 4096)
    np.testing.assert_allclose([float(all_warmup(s)) for s in range(4)], [0, 1.2, 2.4, 3.6])
    with pytest.raises(ValueError, match="schedule='step'"):
        optim.make_schedule(_config(schedule="step"), 100, 10, 256)
    with pytest.raises(ValueError, match="warmup_steps=20"):
        optim.make_schedule(_config(), 10, 20, 256)


def _zero_grad_steps(config, steps):
    """Runs `steps` updates with zero gradients at a constant lr of 0.5."""
    tx = optim.make_optimizer(config, optax.constant_schedule(0.5))
    params = jax.tree.map(jnp.asarray, _params())
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
    return _flat(params)


@pytest.mark.parametrize("name", ["momentum", "adamw"])
def test_weight_decay_only_on_kernels(name):
    """With zero gradients only weight decay moves the weights, on kernels only."""
    start = _flat(_params())
    # Classic momentum keeps the expected values short; Nesterov is tested above.
    classic = dict(nesterov=False) if name == "momentum" else {}
    got = _zero_grad_steps(_config(name=name, weight_decay=0.1, **classic), steps=2)
    for key, w in start.items():
        if key[-1] != "kernel":
            np.testing.assert_array_equal(got[key], w, err_msg=str(key))
            continue
        w1 = w - 0.5 * 0.1 * w
        if name == "momentum":  # v1 = lr wd w0; v2 = 0.9 v1 + lr wd w1.
            want = w1 - (0.9 * 0.5 * 0.1 * w + 0.5 * 0.1 * w1)
        else:  # Decoupled: Adam's own update is 0 for zero gradients.
            want = w1 - 0.5 * 0.1 * w1
        np.testing.assert_allclose(got[key], want, rtol=1e-6, err_msg=str(key))


def test_trainable_mask_freezes_leaves_and_keeps_no_state_for_them():
    config = _config()
    schedule = optax.constant_schedule(0.5)
    params = jax.tree.map(jnp.asarray, _params())
    # Linear evaluation style: only the last Dense layer trains.
    mask = jax.tree.map(lambda _: False, params)
    mask["Dense_1"]["kernel"] = True
    mask["Dense_0"]["bias"] = True
    frozen_tx = optim.make_optimizer(config, schedule, trainable_mask=mask)
    full_tx = optim.make_optimizer(config, schedule)
    frozen_state, full_state = frozen_tx.init(params), full_tx.init(params)
    frozen_params = full_params = params
    update = jax.jit(frozen_tx.update)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        updates, frozen_state = update(grads, frozen_state, frozen_params)
        frozen_params = optax.apply_updates(frozen_params, updates)
        updates, full_state = full_tx.update(grads, full_state, full_params)
        full_params = optax.apply_updates(full_params, updates)

    start, frozen, full, flat_mask = (
        _flat(params),
        _flat(frozen_params),
        _flat(full_params),
        _flat(mask),
    )
    for key, trainable in flat_mask.items():
        if trainable:  # LARS is per-leaf, so a trainable leaf moves as without the mask.
            np.testing.assert_allclose(frozen[key], full[key], rtol=1e-6, err_msg=str(key))
            assert not np.allclose(frozen[key], start[key])
        else:
            np.testing.assert_array_equal(frozen[key], start[key], err_msg=str(key))
    # Momentum buffers exist for the trainable leaves only (plus scalar counts).
    state_size = sum(x.size for x in jax.tree.leaves(frozen_state) if x.ndim > 0)
    assert state_size == sum(start[k].size for k, t in flat_mask.items() if t)


def test_bad_configs_name_the_field():
    schedule = optax.constant_schedule(0.1)
    cases = [
        (_config(name="sgd"), "name='sgd'"),
        (_config(momentum=1.5), "momentum=1.5"),
        (_config(name="momentum", nesterov="yes"), "nesterov='yes' must be True, False or None"),
        (_config(weight_decay=-1.0), "weight_decay"),
        (_config(eeta=0.0), "eeta"),
        (_config(trust_ratio_exclude="head"), "trust_ratio_exclude"),
        (_config(trust_ratio_exclude=("head[",)), "bad regex"),
        (_config(name="adamw", b2=1.0), "b2"),
        (_config(weight_decey=1e-4), "weight_decey"),
        (
            ml_collections.ConfigDict(dict(name="lars", base_lr=0.1, lr_scaling="sqrt")),
            "weight_decay",
        ),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            optim.make_optimizer(config, schedule)
    params = _params()
    with pytest.raises(ValueError, match="Python bools"):
        optim.make_optimizer(_config(), schedule, jax.tree.map(lambda _: 1, params))
    tx = optim.make_optimizer(_config(), schedule, {"Conv_0": {"kernel": True}})
    with pytest.raises(ValueError, match="structure of the parameters"):
        tx.init(params)
