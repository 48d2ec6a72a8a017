"""Embeddings: every kind of run gives its backbone's features, row for row with the paths."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from micle_jax import checkpoint, config_lib, embed, models, predict, recipes, rundir
from micle_jax.data.augment import policies
from micle_jax.trainers import finetune, pretrain

# The module's fixtures train two tiny runs (about a minute on 2 CPU cores).
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
SYNTHETIC = "synthetic:num_cases=32,num_classes=3,image_size=24,max_images_per_case=1"
WIDTH = 0.25  # r18x0.25: 512 * 0.25 = 128-dimensional features


def _shrink(config):
    config.data.source = SYNTHETIC
    config.data.image_size = 16
    config.total_steps = 2
    config.batch_size = 8
    config.checkpoint_every_steps = 2
    config.lock()
    return config


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    """A 2-step fine-tuning run from scratch (no evals), its workdir."""
    workdir = str(tmp_path_factory.mktemp("ft"))
    config = recipes.finetune_config("r18x0.25")
    recipes.runlocal_finetune(config)
    finetune.main(_shrink(config), workdir)
    return workdir


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A 2-step SimCLR run: its checkpoint has an online-probe head that config.model lacks."""
    workdir = str(tmp_path_factory.mktemp("pt"))
    config = recipes.pretrain_config("r18x0.25")
    recipes.runlocal_pretrain(config)
    pretrain.main(_shrink(config), workdir)
    return workdir


def make_imported_run(workdir, image_size: int, seed: int = 0) -> dict:
    """A workdir as import_weights writes it; returns the saved {'params', 'batch_stats'}."""
    model_config = config_lib.model_config("r18x0.25")
    model = models.build_model(model_config)
    image = np.zeros((1, image_size, image_size, 3), np.float32)
    init = jax.jit(lambda key: model.init(key, image, train=False))
    variables = jax.device_get(init(jax.random.key(seed)))
    # Non-trivial running statistics, so that BatchNorm on running averages matters.
    rng = np.random.default_rng(seed)
    variables["batch_stats"] = jax.tree.map(
        lambda x: np.asarray(x + rng.uniform(0.1, 0.5, x.shape), np.float32),
        variables["batch_stats"],
    )
    config = {
        "model": model_config.to_dict(),
        "data": {"image_size": image_size},
        "imported_from": {"source": "test", "arch": "r18x0.25"},
    }
    os.makedirs(workdir, exist_ok=True)
    rundir.write_json_atomic(os.path.join(workdir, rundir.CONFIG_FILE), config)
    manager = checkpoint.make_manager(workdir, keep=1, async_save=False)
    checkpoint.save(manager, 0, dict(variables), {"imported": True})
    manager.wait_until_finished()
    manager.close()
    return dict(variables)


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    """Imported-weights workdir trained at 40 px (the ImageNet stem): (workdir, variables)."""
    workdir = str(tmp_path_factory.mktemp("imported"))
    return workdir, make_imported_run(workdir, image_size=40)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """5 PNG files of different sizes and channel layouts, and a text file beside them."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    shapes = {
        "d_gray.png": (30, 20, 1),
        "a_rgb.png": (24, 40, 3),
        "c_rgba.png": (25, 25, 4),
        "b_big.png": (70, 50, 3),
        "e_small.png": (12, 14, 3),
    }
    for name, shape in shapes.items():
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        (folder / name).write_bytes(tf.io.encode_png(array).numpy())
    (folder / "notes.txt").write_text("not an image")
    return folder


def reference_embeddings(paths, backbone, variables, image_size):
    """[N, D]: the backbone applied to each file alone, unsharded, in the given order."""
    rows = []
    for path in paths:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = policies.eval_transform(image, image_size).numpy()[None]
        rows.append(np.asarray(backbone.apply(variables, image, train=False))[0])
    return np.stack(rows)


def backbone_of(variables):
    """The backbone's variables in a whole model's {'params', 'batch_stats'}."""
    return {key: variables[key]["backbone"] for key in ("params", "batch_stats")}


def run_model(workdir, cifar_stem=None):
    model_config = ml_collections.ConfigDict(rundir.read_config(workdir)["model"])
    if cifar_stem is not None:
        model_config.cifar_stem = cifar_stem
    return models.build_model(model_config)


def test_finetune_run_embeddings_are_its_features(finetune_run, images):
    out = embed.embed(finetune_run, str(images / "*.png"), batch_size=3)
    paths = sorted(str(p) for p in images.glob("*.png"))
    assert list(out["paths"]) == paths and out["paths"].dtype.kind == "U"
    assert out["embeddings"].dtype == np.float32 and out["embeddings"].shape == (5, 128)
    assert int(out["image_size"]) == 16
    # Against the backbone applied directly on the weights, one image at a time.
    variables = checkpoint.load_variables(finetune_run)
    want = reference_embeddings(paths, run_model(finetune_run).backbone, backbone_of(variables), 16)
    np.testing.assert_allclose(out["embeddings"], want, atol=1e-5)
    # Against predict's model (with its classification head): the 'features' output.
    model, variables, task, _ = predict.load_run(finetune_run)
    batch = next(predict.image_batches(paths, task.image_size, len(paths)))
    features = np.asarray(model.apply(variables, batch["image"], train=False)["features"])
    np.testing.assert_allclose(out["embeddings"], features, atol=1e-5)


def test_pretrain_run_embeddings_ignore_the_probe_head(pretrain_run, images):
    # The online probe's head is in the checkpoint but not in config.model.
    assert rundir.read_config(pretrain_run)["model"]["num_classes"] == 0
    variables = checkpoint.load_variables(pretrain_run)
    assert "head" in variables["params"]
    out = embed.embed(pretrain_run, str(images / "*.png"), batch_size=8)
    want = reference_embeddings(
        list(out["paths"]), run_model(pretrain_run).backbone, backbone_of(variables), 16
    )
    np.testing.assert_allclose(out["embeddings"], want, atol=1e-5)


def test_imported_run_embeddings_at_its_size_and_another(imported_run, images):
    workdir, variables = imported_run
    paths = sorted(str(p) for p in images.glob("*.png"))
    out = embed.embed(workdir, str(images / "*.png"), batch_size=2)
    backbone = run_model(workdir).backbone
    want = reference_embeddings(paths, backbone, backbone_of(variables), 40)
    assert int(out["image_size"]) == 40 and list(out["paths"]) == paths
    np.testing.assert_allclose(out["embeddings"], want, atol=1e-5)
    # At 24 px SimCLR's rule would pick the CIFAR stem; the weights have the ImageNet one.
    out = embed.embed(workdir, str(images / "*.png"), image_size=24)
    backbone = run_model(workdir, cifar_stem=False).backbone
    want = reference_embeddings(paths, backbone, backbone_of(variables), 24)
    assert int(out["image_size"]) == 24
    np.testing.assert_allclose(out["embeddings"], want, atol=1e-5)


def test_embed_input_errors(imported_run, images, tmp_path):
    workdir, _ = imported_run
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        embed.embed(str(images), str(images / "*.png"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        embed.embed(workdir, str(images / "*.jpg"))
    with pytest.raises(ValueError, match="not PNG or JPEG"):
        embed.embed(workdir, str(images / "*"))
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        embed.embed(workdir, str(images / "*.png"), which="best")
    no_size = tmp_path / "no_size"
    no_size.mkdir()
    config = rundir.read_config(workdir)
    del config["data"]
    rundir.write_json_atomic(str(no_size / "config.json"), config)
    with pytest.raises(ValueError, match="no data.image_size; give --image_size"):
        embed.embed(str(no_size), str(images / "*.png"))


def test_backbone_mismatch_names_the_variables(imported_run, images, tmp_path):
    workdir, _ = imported_run
    wider = tmp_path / "wider"
    shutil.copytree(workdir, wider)
    config = rundir.read_config(str(wider))
    config["model"]["width"] = 0.5
    rundir.write_json_atomic(str(wider / "config.json"), config)
    with pytest.raises(ValueError, match="the backbone differs") as e:
        embed.embed(str(wider), str(images / "*.png"))
    assert "params/backbone/block_group1/block1/bn1/bias: checkpoint (16,) vs model (32,)" in (
        str(e.value)
    )


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "micle_jax.embed", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_cli_writes_npz_and_reports_errors(imported_run, images, tmp_path):
    workdir, _ = imported_run
    output = tmp_path / "sub" / "out.npz"
    result = run_cli(f"--workdir={workdir}", f"--images={images}/*.png", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"Wrote 5 embeddings of dimension 128 to {output}"
    assert [p.name for p in output.parent.iterdir()] == ["out.npz"]  # no temporary file left
    with np.load(output) as saved:
        want = embed.embed(workdir, str(images / "*.png"))
        assert sorted(saved.files) == sorted(want)
        np.testing.assert_allclose(saved["embeddings"], want["embeddings"], atol=1e-5)
        np.testing.assert_array_equal(saved["paths"], want["paths"])
        assert int(saved["image_size"]) == 40

    result = run_cli(f"--workdir={images}", f"--images={images}/*.png", f"--output={output}")
    assert result.returncode == 1
    assert "micle_jax.embed: error:" in result.stderr and "config.json not found" in result.stderr
