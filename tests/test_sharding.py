"""The sharded update equals the single-device update (global NT-Xent and BatchNorm)."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from micle_jax import config_lib, models, optim, recipes, sharding
from micle_jax.trainers import contrastive_step, train_state


def mesh_of(n, model=1):
    return sharding.make_mesh(
        ml_collections.ConfigDict(dict(data=-1, model=model)), devices=jax.devices()[:n]
    )


def test_make_mesh_shapes_and_errors():
    assert dict(mesh_of(8).shape) == {"data": 8, "model": 1}
    assert dict(mesh_of(8, model=2).shape) == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="must be >= 1 and divide the 8 devices"):
        mesh_of(8, model=3)
    with pytest.raises(ValueError, match="set config.mesh.data=-1"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=3, model=1)))


def test_param_sharding_splits_only_large_params_on_the_model_axis():
    mesh = mesh_of(8, model=2)
    big = sharding.param_sharding((3, 3, 256, 512), mesh, min_size=1000)
    assert big.spec == P(None, None, None, "model")
    assert sharding.param_sharding((64,), mesh, min_size=1000).spec == P()
    assert sharding.param_sharding((3, 3, 256, 512), mesh_of(8), min_size=1).spec == P()


def one_step(n_devices, model_axis=1):
    mesh = mesh_of(n_devices, model_axis)
    model = models.build_model(config_lib.model_config("r18x0.25", num_classes=3))
    optim_config = recipes.pretrain_config("r18x0.25").optim
    schedule = optim.make_schedule(optim_config, 10, 2, 16)
    tx = optim.make_optimizer(optim_config, schedule)
    state, shardings, _ = train_state.create_state(model, tx, mesh, 16, 0, 1000)
    step = jax.jit(
        contrastive_step.make_train_step(model, tx, schedule, 0.1, probe=True),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
    )
    rng = np.random.default_rng(0)
    batch = {
        "view1": rng.random((16, 16, 16, 3), dtype=np.float32),
        "view2": rng.random((16, 16, 16, 3), dtype=np.float32),
        "label": rng.integers(-1, 3, 16).astype(np.int32),
        "multi_instance": rng.random(16) < 0.5,
    }
    state, measurements = step(state, sharding.host_to_global(batch, mesh))
    return jax.device_get(state), jax.device_get(measurements)


def test_eight_devices_match_one_device():
    single, m1 = one_step(1)
    # 4-way data parallel x 2-way parameter sharding covers both mesh axes.
    for n, model_axis in ((8, 2),):
        multi, m8 = one_step(n, model_axis)
        np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
        np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
        # Global BatchNorm: the running statistics are those of the whole batch.
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
            single.batch_stats,
            multi.batch_stats,
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
            single.params,
            multi.params,
        )
