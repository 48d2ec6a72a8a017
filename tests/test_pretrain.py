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
import tensorflow as tf
from conftest import FAST_COMPILE_FLAGS
from flax import traverse_util

from micle_jax import checkpoint, config_lib, models, optim, recipes, rundir, sharding
from micle_jax.data.sources import synthetic
from micle_jax.data.stream import pipeline
from micle_jax.trainers import contrastive_step, loop, pretrain, restore, train_state

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(mode="simclr", steps=6):
    config = recipes.pretrain_config("r18x0.25")
    recipes.runlocal_pretrain(config)
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


def logged_scalars(workdir, tag: str) -> dict[int, float]:
    """{step: value} of the scalar `tag` in a run's TensorBoard event files."""
    values = {}
    for path in pathlib.Path(workdir).glob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                if v.tag == tag:
                    value = v.simple_value if v.HasField("simple_value") else None
                    values[event.step] = value if value is not None else tf.make_ndarray(v.tensor)
    return {step: float(value) for step, value in values.items()}


def numpy_nt_xent(z1, z2, temperature):
    """SimCLR's NT-Xent (hidden_norm, unit weights) and contrast_acc in float64 NumPy.

    Written on the full [2B, 2B] similarity matrix (losses.py uses the [ab | aa]
    blocks): each row's positive is the other view of its example, every other
    row but itself a negative; accuracy is view 1's top-1 among the B view-2 rows.
    """
    h = np.concatenate([z1, z2]).astype(np.float64)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    b = len(z1)
    sim = h @ h.T / temperature
    np.fill_diagonal(sim, -np.inf)
    positive = np.r_[np.arange(b, 2 * b), np.arange(b)]
    top = sim.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(sim - top).sum(axis=1))
    loss = -(sim[np.arange(2 * b), positive] - log_norm).sum() / b
    accuracy = np.mean(np.argmax(sim[:b, b:], axis=1) == np.arange(b))
    return loss, accuracy


def recompute_step(config, workdir, step: int):
    """(contrastive loss, accuracy) of training step `step` + 1, outside the trainer.

    The checkpoint of `step`, the pipeline's batch for step + 1, the model in
    training mode (batch statistics) and numpy_nt_xent: no trainer code.
    """
    model_config = config.model.copy_and_resolve_references()
    with model_config.unlocked():
        model_config.num_classes = 4  # the linear probe on the synthetic classes
    model = models.build_model(model_config)
    variables = checkpoint.load_variables(str(pathlib.Path(workdir) / "checkpoints" / str(step)))
    data = pipeline.open_data(config.data, seed=config.seed)
    dataset = data.dataset(config.data.mode, config.batch_size, start_step=step)
    batch = next(dataset.as_numpy_iterator())
    images = np.concatenate([batch["view1"], batch["view2"]])
    out, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    z1, z2 = np.split(np.asarray(out["projections"], np.float64), 2)
    return numpy_nt_xent(z1, z2, config.loss.temperature)


def test_pretrain_runs_logs_and_checkpoints(tmp_path):
    config = tiny_config()
    config.log_every_steps = 1  # every step's measurements in the event files
    last = pretrain.main(config, str(tmp_path))
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
    status = rundir.read_status(str(tmp_path))
    assert status["status"] == "finished" and status["step"] == 6
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    # The logged loss and accuracy of step 4 are those of its batch and the weights
    # of checkpoint 3, recomputed here (a wrong temperature, misaligned views or a
    # wrong positive would all differ). The tiny run does not learn in 6 steps (its
    # accuracy stays near chance, 1/8), so "above chance" would not be a check.
    loss, accuracy = recompute_step(config, tmp_path, 3)
    assert logged_scalars(tmp_path, "contrastive_loss")[4] == pytest.approx(loss, rel=1e-4)
    assert logged_scalars(tmp_path, "contrastive_acc")[4] == pytest.approx(accuracy, abs=1e-6)
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 8
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_micle_mode_reports_multi_instance_pairs(tmp_path):
    # 4 steps of 8 cases are one epoch of the 32 synthetic cases, each drawn once,
    # logged as one mean: the fraction of pairs from two images is exactly the
    # share of cases with 2 or more images (1..3 images each: some, not all).
    config = tiny_config("micle", steps=4)
    config.log_every_steps = 4
    last = pretrain.main(config, str(tmp_path))
    case_size = synthetic.make_table("train", 32, 4, 32, 3).case_size
    expected = np.mean(case_size >= 2)
    assert 0.0 < expected < 1.0 and len(case_size) == 4 * config.batch_size
    assert last["multi_instance_fraction"] == pytest.approx(expected, abs=1e-6)


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
    status = rundir.read_status(str(tmp_path / "resumed"))
    assert status["status"] == "preempted" and status["step"] == 4
    assert checkpoint.resolve(str(tmp_path / "resumed")).parent.name == "4"

    pretrain.main(tiny_config(), str(tmp_path / "resumed"))  # same command again
    assert rundir.read_status(str(tmp_path / "resumed"))["status"] == "finished"
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
    with pytest.raises(loop.NonFiniteLoss, match=r"step 4.*checkpoints/3"):
        pretrain.main(tiny_config(steps=6), str(tmp_path))
    assert rundir.read_status(str(tmp_path))["status"] == "failed"
    kept = final_params(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, good, kept)


def test_init_checkpoint_copies_backbone_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative init path, as sweeps pass it
    pretrain.main(tiny_config(steps=3), "stage1")
    config = tiny_config()
    model = models.build_model(config_lib.model_config("r18x0.25", num_classes=4))
    tx = optax.sgd(0.1)
    mesh = sharding.make_mesh(config.mesh)
    fresh, shardings, abstract = train_state.create_state(
        model, tx, mesh, 16, seed=1, shard_min_size=2**22
    )
    manager = checkpoint.make_manager(str(tmp_path / "stage2"), keep=1)
    state, _ = restore.restore_or_init(
        fresh,
        abstract,
        shardings,
        manager,
        {},
        "stage1",
        restore.weight_prefixes(ml_collections.ConfigDict(dict(init_proj_layers=1))),
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


class StopBeforeTraining(Exception):
    pass


# data/demo/hannover_cxr (the medical configs' default records): 71 cases, 243 images.
@pytest.mark.parametrize("epoch_unit, pairs", [(None, 243), ("cases", 71)])
def test_simclr_and_micle_get_the_same_steps_for_the_same_epochs(
    tmp_path, monkeypatch, epoch_unit, pairs
):
    """Equal compute: the same total_epochs / warmup_epochs give MICLe as many steps (and
    2 x batch views per step) as SimCLR on records whose cases have several images."""
    schedules = []

    def record_schedule(optim_config, total_steps, warmup_steps, batch_size):
        schedules.append((total_steps, warmup_steps))
        raise StopBeforeTraining

    monkeypatch.setattr(optim, "make_schedule", record_schedule)
    for mode in ("simclr", "micle"):
        config = recipes.medical_pretrain_config("runlocal=True", mode)
        config.total_steps, config.total_epochs = None, 2.0
        config.warmup_steps, config.warmup_epochs = None, 1.0
        if epoch_unit:  # None: the default, one pair per image
            config.data.epoch_unit = epoch_unit
        with pytest.raises(StopBeforeTraining):
            pretrain.main(config, str(tmp_path / mode))
    batch = config.batch_size
    assert schedules[0] == schedules[1] == (round(2 * pairs / batch), round(pairs / batch))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A finished tiny pre-training run (3 steps): the init of the next stage."""
    workdir = str(tmp_path_factory.mktemp("stage1"))
    pretrain.main(tiny_config(steps=3), workdir)
    return workdir


def test_pretraining_from_a_pretraining_run_starts_with_its_whole_projection_head(
    stage1, tmp_path, monkeypatch
):
    """As SimCLR's --checkpoint: backbone and every projection layer, weights and
    BatchNorm statistics, start where stage 1 ended; the linear probe's head starts fresh."""
    started = {}

    def record_start(run, state, *args, **kwargs):
        started["state"] = jax.device_get(state)
        return state, int(started["state"].step), {}

    monkeypatch.setattr(loop, "train", record_start)
    config = tiny_config()
    config.init.checkpoint = stage1
    pretrain.main(config, str(tmp_path / "stage2"))
    source, state = checkpoint.load_variables(stage1), started["state"]
    assert state.step == 0
    assert set(state.params["projection_head"]) == {
        "dense1",
        "dense2",
        "dense3",
        "bn1",
        "bn2",
        "bn3",
    }
    # Stage 1 moved the head's BatchNorm statistics away from their fresh values.
    assert not np.allclose(source["batch_stats"]["projection_head"]["bn3"]["mean"], 0.0)
    for module in ("backbone", "projection_head"):
        jax.tree.map(np.testing.assert_array_equal, source["params"][module], state.params[module])
        jax.tree.map(
            np.testing.assert_array_equal,
            source["batch_stats"][module],
            state.batch_stats[module],
        )
    assert not np.array_equal(
        source["params"]["head"]["dense"]["kernel"], state.params["head"]["dense"]["kernel"]
    )


def fresh_variables(**model_overrides):
    """Zero {'params', 'batch_stats'} of an r18x0.25 model at 16 px."""
    model = models.build_model(
        config_lib.model_config("r18x0.25", num_classes=4, **model_overrides)
    )
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(1), np.zeros((1, 16, 16, 3), np.float32), train=False)
    )
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))


def prefixes(init_proj_layers):
    return restore.weight_prefixes(
        ml_collections.ConfigDict(dict(init_proj_layers=init_proj_layers))
    )


def test_init_projection_layers_copy_what_matches_and_name_what_does_not(stage1):
    loaded = checkpoint.load_variables(stage1)  # 3 layers, 128 wide, 128-d output
    # A 64-d output: -1 copies the two hidden layers and leaves the last one fresh.
    narrow = fresh_variables(proj_dim=64)
    merged, copied = checkpoint.merge_variables(narrow, loaded, prefixes(-1))
    assert {c.split("/")[2] for c in copied if "/projection_head/" in f"/{c}"} == {
        "dense1",
        "bn1",
        "dense2",
        "bn2",
    }
    head = merged["params"]["projection_head"]
    np.testing.assert_array_equal(
        head["dense2"]["kernel"], loaded["params"]["projection_head"]["dense2"]["kernel"]
    )
    assert not np.any(head["dense3"]["kernel"]) and not any("bn3" in c for c in copied)
    # Asked for by number, a layer of another shape is an error that names it.
    with pytest.raises(
        ValueError, match=r"dense3/kernel: checkpoint \(128, 128\) vs model \(128, 64\)"
    ):
        checkpoint.merge_variables(narrow, loaded, prefixes(3))
    # A 2-layer head: its last layer (BatchNorm without bias) is not the checkpoint's hidden
    # layer 2, even where the kernels have the same shape.
    shallow = fresh_variables(proj_layers=2)
    assert checkpoint.shared_projection_layers(shallow, loaded) == 1
    with pytest.raises(ValueError, match="projection_head/bn2/bias: not in the model"):
        checkpoint.merge_variables(shallow, loaded, prefixes(2))
    with pytest.raises(ValueError, match="does not have"):
        checkpoint.merge_variables(shallow, loaded, prefixes(3))
    # The whole head when the architectures match.
    same = fresh_variables()
    assert checkpoint.shared_projection_layers(same, loaded) == 3
    _, copied = checkpoint.merge_variables(same, loaded, prefixes(-1))
    assert not any(c.startswith(("params/head/", "batch_stats/head/")) for c in copied)
    every_layer = {
        f"{collection}/{name}"
        for collection, tree in loaded.items()
        for name in traverse_util.flatten_dict(tree, sep="/")
        if name.startswith("projection_head/")
    }
    assert {c for c in copied if "/projection_head/" in c} == every_layer


def run_main(*args, timeout=600, fast_compile=True):
    """`python -m micle_jax.main ARGS`; fast_compile=False: XLA's default -O2 (real work)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if not fast_compile:
        env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(FAST_COMPILE_FLAGS, "")
    return subprocess.run(
        [sys.executable, "-m", "micle_jax.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
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
    """The stage-1 command for ResNet-50 1x runs (runlocal data, 2 steps): what it writes."""
    r = run_main(
        "--config=configs/simclr_imagenet.py:arch=r50x1,runlocal=True",
        f"--workdir={tmp_path}",
        "--config.total_steps=2",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2",
        # ResNet-50's steps at 32 px (the CIFAR stem) take seconds at -O0.
        fast_compile=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    status = rundir.read_status(str(tmp_path))
    assert (status["status"], status["step"]) == ("finished", 2), status
    # The checkpoint holds a ResNet-50 1x: 53 convolutions (the stem, 3 in each of the
    # 16 bottleneck blocks, 4 projection shortcuts), the widest with 2048 outputs.
    params = traverse_util.flatten_dict(checkpoint.load_variables(str(tmp_path))["params"])
    kernels = [v.shape for k, v in params.items() if k[-1] == "kernel" and v.ndim == 4]
    assert len(kernels) == 53 and max(k[-1] for k in kernels) == 2048, kernels
    losses = {}
    for path in tmp_path.glob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                if v.tag == "contrastive_loss":
                    value = tf.make_ndarray(v.tensor) if v.HasField("tensor") else v.simple_value
                    losses[event.step] = float(value)
    assert sorted(losses) == [1, 2] and np.all(np.isfinite(list(losses.values()))), losses
