"""Tests for micle_jax/losses.py against NumPy transcriptions of the references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn import metrics as skm

from micle_jax import losses
from micle_jax.evaluators import metrics
from micle_jax.trainers import contrastive_step, supervised_step, train_state


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def simclr_contrastive_loss(z1, z2, temperature):
    """NumPy (float64) transcription of SimCLR tf2/objective.py add_contrastive_loss.

    hidden_norm=True, weights 1. Returns (loss, logits_a, labels) where logits_a
    is the [ab | aa] block of view 1.
    """
    hidden = np.concatenate([z1, z2]).astype(np.float64)
    hidden = hidden / np.sqrt(np.maximum((hidden**2).sum(-1, keepdims=True), 1e-12))
    h1, h2 = np.split(hidden, 2, axis=0)
    batch = h1.shape[0]
    labels = np.eye(batch, 2 * batch)
    masks = np.eye(batch)
    logits_aa = h1 @ h1.T / temperature - masks * 1e9
    logits_bb = h2 @ h2.T / temperature - masks * 1e9
    logits_ab = h1 @ h2.T / temperature
    logits_ba = h2 @ h1.T / temperature
    logits_a = np.concatenate([logits_ab, logits_aa], 1)
    loss_a = -(labels * _log_softmax(logits_a)).sum(1)
    loss_b = -(labels * _log_softmax(np.concatenate([logits_ba, logits_bb], 1))).sum(1)
    return np.mean(loss_a + loss_b), logits_a, labels


def _views(seed, batch, dim, scale=1.0, noise=0.5):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(batch, dim)).astype(np.float32) * scale
    # View 2 correlated with view 1, so the loss is far from its random value.
    z2 = (z1 + noise * rng.normal(size=(batch, dim)) * scale).astype(np.float32)
    return z1, z2


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("batch,dim", [(2, 3), (8, 16), (32, 128)])
def test_nt_xent_matches_simclr(temperature, batch, dim):
    z1, z2 = _views(batch * 7 + dim, batch, dim, scale=3.0, noise=2.0)
    want, _, _ = simclr_contrastive_loss(z1, z2, temperature)
    # A relative check means nothing near 0, where float32 cannot resolve it.
    assert want > 0.1
    got = jax.jit(losses.nt_xent)(z1, z2, temperature)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("batch", [4, 16, 64])
def test_accuracy_matches_simclr(batch):
    z1, z2 = _views(batch, batch, 8)
    # Make a few pairs unrelated, so the accuracy is strictly between 0 and 1.
    z2[: batch // 4] = np.random.default_rng(1).normal(size=(batch // 4, 8))
    want_loss, logits_a, labels = simclr_contrastive_loss(z1, z2, 0.1)
    want_acc = np.mean(np.argmax(logits_a[:, : len(z1)], 1) == np.argmax(labels, 1))
    loss, acc = jax.jit(losses.nt_xent_with_accuracy)(z1, z2)
    # losses.py's accuracy itself is a fraction of hits strictly between 0 and 1
    # (an all-right or all-wrong accuracy would match a broken reference too) ...
    hits = float(acc) * batch
    assert 0 < float(acc) < 1 and hits == pytest.approx(round(hits), abs=1e-4), float(acc)
    # ... and counts the rows whose nearest view-2 projection (cosine) is their own.
    h1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
    h2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
    assert round(hits) == np.sum(np.argmax(h1 @ h2.T, axis=1) == np.arange(batch))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(acc), want_acc, atol=1e-7)


def test_nt_xent_identical_views_gives_perfect_accuracy_and_scale_invariance():
    z1, _ = _views(0, 16, 32)
    loss, acc = losses.nt_xent_with_accuracy(z1, z1)
    assert float(acc) == 1.0
    # hidden_norm=True: rescaling a projection must not change the loss.
    np.testing.assert_allclose(
        float(losses.nt_xent(z1 * 5.0, z1)), float(loss), rtol=1e-5, atol=1e-6
    )


def test_nt_xent_computes_in_float32_from_bfloat16():
    z1, z2 = _views(3, 8, 16)
    b1, b2 = jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16)
    got = jax.jit(losses.nt_xent)(b1, b2)
    want, _, _ = simclr_contrastive_loss(
        np.asarray(b1.astype(jnp.float32)), np.asarray(b2.astype(jnp.float32)), 0.1
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    grads = jax.jit(jax.grad(losses.nt_xent))(b1, b2)
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))


def test_nt_xent_sharded_equals_single_device():
    """Sharded over 8 devices, every replica must still see all negatives."""
    assert jax.device_count() >= 8, "tests/conftest.py should give 8 fake CPU devices"
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    z1, z2 = _views(5, 32, 16, scale=2.0)

    loss_and_grads = jax.value_and_grad(losses.nt_xent, argnums=(0, 1))
    single_loss, single_grads = jax.jit(loss_and_grads)(z1, z2)
    s1, s2 = jax.device_put(z1, sharding), jax.device_put(z2, sharding)
    sharded_loss, sharded_grads = jax.jit(
        loss_and_grads, out_shardings=(NamedSharding(mesh, P()), (sharding, sharding))
    )(s1, s2)

    assert len(s1.sharding.device_set) == 8
    np.testing.assert_allclose(float(sharded_loss), float(single_loss), rtol=1e-6)
    for got, want in zip(sharded_grads, single_grads, strict=True):
        assert got.sharding.is_equivalent_to(sharding, 2)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    # A per-shard loss (negatives only from the local 4 rows) differs: the test
    # above would catch an implementation that lost the cross-device negatives.
    local = np.mean([simclr_contrastive_loss(z1[i::8], z2[i::8], 0.1)[0] for i in range(8)])
    assert abs(local - float(single_loss)) > 0.1


def test_nt_xent_rejects_bad_inputs():
    z = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="same shape"):
        losses.nt_xent(z, z[:2])
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        losses.nt_xent(z[None], z[None])
    with pytest.raises(ValueError, match="temperature"):
        losses.nt_xent(z, z, temperature=0.0)


def test_softmax_cross_entropy_matches_numpy_with_mask():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=10)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], np.float32)
    per_example = -_log_softmax(logits.astype(np.float64))[np.arange(10), labels]
    np.testing.assert_allclose(
        float(losses.softmax_cross_entropy(logits, labels)), per_example.mean(), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(losses.softmax_cross_entropy(logits, labels, mask)),
        per_example[mask > 0].mean(),
        rtol=1e-6,
    )
    assert float(losses.softmax_cross_entropy(logits, labels, np.zeros(10))) == 0.0
    # Padded examples get no gradient, and an all-padding batch no NaN.
    grads = jax.jit(jax.grad(losses.softmax_cross_entropy))(logits, labels, mask)
    assert np.all(np.asarray(grads)[mask == 0] == 0)
    grads = jax.jit(jax.grad(losses.softmax_cross_entropy))(logits, labels, np.zeros(10))
    assert np.all(np.asarray(grads) == 0)


def test_softmax_cross_entropy_rejects_one_hot_labels():
    logits = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="class indices"):
        losses.softmax_cross_entropy(logits, np.eye(4, 3))
    with pytest.raises(ValueError, match="integers"):
        losses.softmax_cross_entropy(logits, np.zeros(4, np.float32))


def _np_sigmoid_ce(logits, targets):
    logits = logits.astype(np.float64)
    return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


def test_sigmoid_cross_entropy_matches_numpy_with_mask():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 2
    targets = rng.integers(0, 2, size=(6, 5)).astype(np.float32)
    mask = (rng.random((6, 5)) > 0.3).astype(np.float32)
    # Uncertain labels ('ignore' policy): placeholder targets under mask 0.
    targets_with_placeholders = np.where(mask > 0, targets, np.float32(np.nan))
    per_entry = _np_sigmoid_ce(logits, targets)
    np.testing.assert_allclose(
        float(losses.sigmoid_cross_entropy(logits, targets)), per_entry.mean(), rtol=1e-6
    )
    got = losses.sigmoid_cross_entropy(logits, targets_with_placeholders, mask)
    np.testing.assert_allclose(float(got), per_entry[mask > 0].mean(), rtol=1e-6)
    grads = jax.jit(jax.grad(losses.sigmoid_cross_entropy))(logits, targets_with_placeholders, mask)
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[mask == 0] == 0)
    # A per-example mask [batch] drops whole rows (padding).
    rows = np.array([1, 0, 1, 1, 0, 1], np.float32)
    np.testing.assert_allclose(
        float(losses.sigmoid_cross_entropy(logits, targets, rows)),
        per_entry[rows > 0].mean(),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="mask must be"):
        losses.sigmoid_cross_entropy(logits, targets, np.ones((6, 4)))


def test_topk_correct_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(50, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=50)
    order = np.argsort(-logits, axis=1)
    for k in (1, 3, 7):
        want = np.array([labels[i] in order[i, :k] for i in range(50)], np.float32)
        got = losses.topk_correct(logits, labels, k)
        assert got.shape == (50,) and got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), want)
    assert float(losses.topk_correct(logits, labels, 7).mean()) == 1.0
    assert float(losses.topk_correct(logits, labels, 8).mean()) == 1.0  # as scikit-learn
    with pytest.raises(ValueError, match="k=0"):
        losses.topk_correct(logits, labels, 0)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_correct_with_ties_matches_sklearn_and_the_evaluators(k):
    """One tie rule in training (jax, jitted) and evaluation (NumPy): scikit-learn's."""
    rng = np.random.default_rng(10 + k)
    logits = rng.integers(0, 3, (300, 6)).astype(np.float32)  # most rows have ties
    labels = rng.integers(0, 6, 300)
    got = jax.jit(losses.topk_correct, static_argnums=2)(logits, labels, k)
    if k == 1:
        want = skm.accuracy_score(labels, np.argmax(logits, axis=1))
    else:
        want = skm.top_k_accuracy_score(labels, logits, k=k, labels=range(6))
    assert float(np.mean(np.asarray(got, np.float64))) == pytest.approx(want, abs=1e-12)
    np.testing.assert_array_equal(np.asarray(got) > 0, metrics.topk_correct(logits, labels, k))


class _TiedLogits(nn.Module):
    """A model whose logits are all equal (zero head) for every input."""

    num_classes: int

    @nn.compact
    def __call__(self, images, train):
        x = nn.BatchNorm(use_running_average=not train)(images.reshape(images.shape[0], -1))
        zeros = nn.initializers.zeros
        logits = nn.Dense(self.num_classes, kernel_init=zeros, bias_init=zeros)(x)
        return {"projections": nn.Dense(8)(x), "logits": logits}


def test_training_steps_score_all_equal_logits_as_sklearn():
    """train_accuracy and probe_acc on all-equal logits: 1 / classes, as the evaluators."""
    num_classes, batch = 4, 8
    model = _TiedLogits(num_classes)
    images = np.random.default_rng(0).random((batch, 4, 4, 3), dtype=np.float32)
    labels = (np.arange(batch) % num_classes).astype(np.int32)
    variables = model.init(jax.random.key(0), images, train=False)
    tx = optax.sgd(0.1)
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )
    want = skm.accuracy_score(labels, np.zeros(batch, np.int64))
    assert want == 1 / num_classes
    schedule = optax.constant_schedule(0.1)
    step = supervised_step.make_train_step(model, tx, schedule, "multiclass")
    _, measured = step(state, {"image": images, "label": labels})
    assert float(measured["train_accuracy"]) == want
    step = contrastive_step.make_train_step(model, tx, schedule, 0.1, probe=True)
    batch_views = {"view1": images, "view2": images[::-1], "label": labels}
    _, measured = step(state, dict(batch_views, multi_instance=np.zeros(batch, bool)))
    assert float(measured["probe_acc"]) == want
