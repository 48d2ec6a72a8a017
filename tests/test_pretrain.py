"""End-to-end tests of the contrastive pre-training trainer on tiny configs."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from micle_jax import checkpoint, config_lib, models, sharding
from micle_jax.trainers import contrastive_step, harness, pretrain

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(mode="simclr", steps=6):
    config = config_lib.pretrain_config("r18x0.25")
    config_lib.runlocal_pretrain(config)
    config.total_steps = steps
    config.batch_size = 8
    config.data.source = "synthetic:num_cases=32,num_classes=4,image_size=32"
    config.data.mode = mode
    config.data.image_size = 16
    config.optim.base_lr = 0.1
    config.lock()
    return config


def final_params(workdir):
    return checkpoint.load_variables(str(workdir))["params"]


def test_pretrain_runs_logs_and_checkpoints(tmp_path):
    last = pretrain.main(tiny_config(), str(tmp_path))
    for key in (
        "loss",
        "contrastive_loss",
        "contrastive_acc",
        "learning_rate",
        "grad_norm",
        "param_norm",
        "probe_loss",
        "multi_instance_fraction",
    ):
        assert key in last and np.isfinite(last[key]), key
    assert 0.0 <= last["contrastive_acc"] <= 1.0
    status = harness.read_status(str(tmp_path))
    assert status["status"] == "finished" and status["step"] == 6
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 8
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_micle_mode_reports_multi_instance_pairs(tmp_path):
    last = pretrain.main(tiny_config("micle", steps=2), str(tmp_path))
    # Synthetic cases have 1..3 images: some, not all, pairs come from two images.
    assert 0.0 < last["multi_instance_fraction"] <= 1.0


def test_interrupt_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    pretrain.main(tiny_config(), str(tmp_path / "straight"))

    # A real SIGTERM in the middle of the run: the trainer saves and stops.
    original = sharding.host_to_global
    calls = {"n": 0}

    def host_to_global_then_sigterm(batch, mesh):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(batch, mesh)

    monkeypatch.setattr(sharding, "host_to_global", host_to_global_then_sigterm)
    pretrain.main(tiny_config(), str(tmp_path / "resumed"))
    monkeypatch.setattr(sharding, "host_to_global", original)
    status = harness.read_status(str(tmp_path / "resumed"))
    assert status["status"] == "preempted" and status["step"] == 4
    assert checkpoint.resolve(str(tmp_path / "resumed")).parent.name == "4"

    pretrain.main(tiny_config(), str(tmp_path / "resumed"))  # same command again
    assert harness.read_status(str(tmp_path / "resumed"))["status"] == "finished"
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    pretrain.main(tiny_config(steps=3), str(tmp_path))  # checkpoint at step 3
    good = final_params(tmp_path)

    real = contrastive_step.losses.nt_xent_with_accuracy
    monkeypatch.setattr(
        contrastive_step.losses,
        "nt_xent_with_accuracy",
        lambda z1, z2, t: (real(z1, z2, t)[0] * jnp.nan, real(z1, z2, t)[1]),
    )
    with pytest.raises(harness.NonFiniteLoss, match=r"step 4.*checkpoints/3"):
        pretrain.main(tiny_config(steps=6), str(tmp_path))
    assert harness.read_status(str(tmp_path))["status"] == "failed"
    kept = final_params(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, good, kept)


def test_init_checkpoint_copies_backbone_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative init path, as sweeps pass it
    pretrain.main(tiny_config(steps=3), "stage1")
    config = tiny_config()
    model = models.build_model(config_lib.model_config("r18x0.25", num_classes=4))
    tx = optax.sgd(0.1)
    mesh = sharding.make_mesh(config.mesh)
    fresh, shardings, abstract = harness.create_state(
        model, tx, mesh, 16, seed=1, shard_min_size=2**22
    )
    manager = checkpoint.make_manager(str(tmp_path / "stage2"), keep=1)
    state = harness.restore_or_init(
        fresh,
        abstract,
        shardings,
        manager,
        {},
        "stage1",
        harness.weight_prefixes(ml_collections.ConfigDict(dict(init_proj_layers=1))),
    )
    s1 = final_params(tmp_path / "stage1")
    s2 = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, s1["backbone"], s2["backbone"])
    for name in ("dense1", "bn1"):  # SimCLR's ft_proj_selector=1
        jax.tree.map(
            np.testing.assert_array_equal, s1["projection_head"][name], s2["projection_head"][name]
        )
    # The rest of the head keeps its fresh initialisation.
    np.testing.assert_array_equal(
        s2["projection_head"]["dense2"]["kernel"],
        jax.device_get(fresh.params)["projection_head"]["dense2"]["kernel"],
    )
    assert not np.array_equal(
        s1["projection_head"]["dense2"]["kernel"], s2["projection_head"]["dense2"]["kernel"]
    )


def run_main(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "micle_jax.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_cli_rejects_bad_config_before_writing(tmp_path):
    workdir = tmp_path / "run"
    cfg = "--config=configs/simclr_imagenet.py:arch=r18x0.25,runlocal=True"
    r = run_main(cfg, f"--workdir={workdir}", "--config.batch_sise=3")
    assert r.returncode != 0 and "batch_sise" in r.stderr
    r = run_main(cfg, f"--workdir={workdir}", "--config.data.mode=byol")
    assert r.returncode != 0 and "config.data.mode='byol'" in r.stderr
    r = run_main("--config=configs/simclr_imagenet.py:arch=r51", f"--workdir={workdir}")
    assert r.returncode != 0 and "unknown arch 'r51'" in r.stderr
    assert not workdir.exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    r = run_main(cfg, f"--workdir={afile}/run")
    assert r.returncode != 0 and "is not a folder" in r.stderr


@pytest.mark.slow
def test_cli_smoke_run_simclr_imagenet_r50x1(tmp_path):
    r = run_main(
        "--config=configs/simclr_imagenet.py:arch=r50x1,runlocal=True", f"--workdir={tmp_path}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert harness.read_status(str(tmp_path))["status"] == "finished"
    assert "contrastive_acc" in r.stderr
