"""Importing official SimCLR TF2 models: both formats, outputs matched, every error named.

The fixtures (../shared/simclr-tf2-fixtures, README there) were written by the
official google-research/simclr tf2 code: a ResNet-50 with selective kernels
(ImageNet stem, 64 px) and a ResNet-18 with the CIFAR stem (32 px), each as a
SavedModel and as a tf2/run.py training checkpoint, with the official
model's outputs on 4 images.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from micle_jax import checkpoint, config_lib, import_weights, models, recipes, simclr_tf2
from micle_jax.trainers import feature_eval, finetune, pretrain

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "simclr-tf2-fixtures"
# Trainable parameters of each fixture (its README, counted by TF).
TRAINABLE = {"r50x0.25_sk1": 2_876_029, "r18x0.25_sk0": 750_901}


@pytest.fixture(scope="session")
def fixtures():
    """../shared/simclr-tf2-fixtures; missing is a broken checkout (fail, not skip)."""
    if not FIXTURES.is_dir():
        pytest.fail(
            f"SimCLR TF2 fixtures not found at {FIXTURES}: put ../shared next to the "
            "repository (see its README)",
            pytrace=False,
        )
    return FIXTURES


@pytest.mark.parametrize("name", sorted(TRAINABLE))
@pytest.mark.parametrize("fmt", ["saved_model", "checkpoint"])
def test_import_infers_the_architecture_and_matches_the_official_outputs(fixtures, name, fmt):
    flags = json.loads((fixtures / name / "flags.json").read_text())
    imported = import_weights.load(str(fixtures / name / fmt))
    assert imported.format == fmt
    a = imported.arch
    assert (a.depth, a.width, a.sk_ratio) == (
        flags["resnet_depth"],
        flags["width_multiplier"],
        flags["sk_ratio"],
    )
    assert a.cifar_stem == (flags["image_size"] <= 32)
    assert (a.proj_layers, a.proj_dim, a.num_classes) == (
        flags["num_proj_layers"],
        flags["proj_out_dim"],
        flags["num_classes"],
    )
    assert models.count_params(imported.variables["params"]) == TRAINABLE[name]
    errors = import_weights.check_outputs(imported, str(fixtures / name / "outputs.npz"))
    assert set(errors) == set(import_weights.CHECKED_OUTPUTS)
    assert max(errors.values()) < import_weights.CHECK_TOLERANCE, errors


def test_saved_model_and_training_checkpoint_give_the_same_variables(fixtures):
    # A tf2/run.py model_dir means its latest ckpt-N; the prefix itself is accepted too.
    model_dir = fixtures / "r50x0.25_sk1" / "checkpoint"
    prefix = str(model_dir / "ckpt-1")
    assert simclr_tf2.find_checkpoint(str(model_dir)) == (prefix, "checkpoint")
    assert simclr_tf2.find_checkpoint(prefix) == (prefix, "checkpoint")
    a = import_weights.load(str(fixtures / "r50x0.25_sk1" / "saved_model"))
    b = import_weights.load(str(fixtures / "r50x0.25_sk1" / "checkpoint"))
    flat_a, tree_a = jax.tree.flatten(a.variables)
    flat_b, tree_b = jax.tree.flatten(b.variables)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x, y)
    # Every array the model has is filled: BatchNorm statistics included.
    assert len(flat_a) == a.num_tf_variables == 387


def test_wrong_head_input_fails_the_check(fixtures):
    """The supervised head read from projection layer 1 instead of 0: logits differ."""
    src = fixtures / "r18x0.25_sk0"
    imported = import_weights.load(str(src / "saved_model"), head_input=1)
    errors = import_weights.check_outputs(imported, str(src / "outputs.npz"))
    assert errors["final_avg_pool"] < 1e-5 and errors["logits_sup"] > 0.01


def test_arch_flag_is_checked(fixtures):
    src = str(fixtures / "r50x0.25_sk1" / "checkpoint")
    assert import_weights.load(src, arch="r50x0.25_sk").arch.name == "r50_0.25x_sk1"
    assert import_weights.load(src, arch="r50_0.25x_sk1").arch.arch == "r50x0.25_sk"
    with pytest.raises(ValueError, match=r"--arch=r50x1 is ResNet-50 width 1 sk_ratio 0, but"):
        import_weights.load(src, arch="r50x1")
    with pytest.raises(ValueError, match="unknown arch 'resnet50'"):
        import_weights.load(src, arch="resnet50")


def test_a_missing_or_reshaped_variable_is_named(fixtures):
    prefix, fmt = simclr_tf2.find_checkpoint(str(fixtures / "r18x0.25_sk0" / "checkpoint"))
    tf_vars = simclr_tf2.read_variables(prefix)
    conv = "model/resnet_model/block_groups/1/layers/1/conv2d_bn_layers/0/conv2d/kernel"
    assert tf_vars[conv].shape == (3, 3, 32, 32)
    missing = {k: v for k, v in tf_vars.items() if k != conv}
    with pytest.raises(ValueError) as e:
        import_weights.from_tf_variables(missing, "ckpt", fmt)
    assert "params/backbone/block_group2/block2/conv1/kernel: (3, 3, 32, 32) expected" in str(e)
    reshaped = {**tf_vars, conv: np.zeros((3, 3, 32, 16), np.float32)}
    with pytest.raises(ValueError) as e:
        import_weights.from_tf_variables(reshaped, "ckpt", fmt)
    assert (
        f"{conv} -> params/backbone/block_group2/block2/conv1/kernel: shape (3, 3, 32, 16), "
        "expected (3, 3, 32, 32)"
    ) in str(e.value)
    extra = {**tf_vars, "model/resnet_model/se_layer/kernel": np.zeros((1, 1, 8, 2), np.float32)}
    with pytest.raises(ValueError, match="not part of SimCLR's TF2 model") as e:
        import_weights.from_tf_variables(extra, "ckpt", fmt)
    assert "model/resnet_model/se_layer/kernel (1, 1, 8, 2), where the model expects none" in (
        str(e.value)
    )
    # SimCLR v1 releases have no projection head: an empty one (proj_head_mode='none').
    headless = {k: v for k, v in tf_vars.items() if "_projection_head" not in k}
    assert import_weights.from_tf_variables(headless, "ckpt", fmt).arch.proj_layers == 0
    # The optimizer and counters of a training checkpoint are ignored, not errors.
    with_optimizer = {**tf_vars, "optimizer/iter": np.zeros((), np.int64)}
    import_weights.from_tf_variables(with_optimizer, "ckpt", fmt)


def test_bad_sources_are_named(fixtures, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_weights.load(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither saved_model.pb nor a TF checkpoint"):
        import_weights.load(str(tmp_path))
    (tmp_path / "fake.index").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable TF2 object-based checkpoint"):
        import_weights.load(str(tmp_path / "fake"))
    imported = import_weights.load(str(fixtures / "r18x0.25_sk0" / "saved_model"))
    np.savez(tmp_path / "bad.npz", images=np.full((2, 32, 32, 3), 255, np.float32))
    with pytest.raises(ValueError, match=r"'images' must be float32 in \[0, 1\]"):
        import_weights.check_outputs(imported, str(tmp_path / "bad.npz"))


def _perturbed_npz(src, dst, name: str, relative: float):
    """A copy of an outputs.npz whose `name` is off by `relative` x its largest magnitude.

    The offset goes to the smallest-magnitude entry, so max |theirs| is unchanged and
    check_outputs' relative error of `name` becomes `relative` (plus the import's own ~1e-7).
    """
    with np.load(src) as npz:
        data = {k: npz[k].copy() for k in npz.files}
    x = data[name]
    flat = x.reshape(-1)
    flat[np.argmin(np.abs(flat))] += relative * np.max(np.abs(x))
    np.savez(dst, **data)
    return dst


def test_check_error_is_relative_to_the_largest_official_value(fixtures, tmp_path):
    src = fixtures / "r18x0.25_sk0"
    imported = import_weights.load(str(src / "saved_model"))
    npz = _perturbed_npz(src / "outputs.npz", tmp_path / "off.npz", "logits_sup", 2e-4)
    errors = import_weights.check_outputs(imported, str(npz))
    assert abs(errors["logits_sup"] - 2e-4) < 2e-6, errors
    assert max(errors[k] for k in ("final_avg_pool", "proj_head_output")) < 1e-6, errors
    # Another model's outputs (ResNet-50, 512 features) cannot be compared: named, not scored.
    with pytest.raises(ValueError, match=r"final_avg_pool has shape \(4, 512\), the model gives"):
        import_weights.check_outputs(imported, str(fixtures / "r50x0.25_sk1" / "outputs.npz"))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "micle_jax.import_weights", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )


def _printed_errors(stdout: str) -> dict[str, float]:
    """The CLI's 'Check against ...: final_avg_pool 2.0e-07, ...' line as {output: error}."""
    (line,) = [line for line in stdout.splitlines() if line.startswith("Check against ")]
    items = line.split(": ", 1)[1].split(", ")
    return {name: float(value) for name, value in (item.rsplit(" ", 1) for item in items)}


@pytest.mark.slow
def test_cli_writes_a_workdir_and_nothing_on_failure(fixtures, tmp_path):
    src = fixtures / "r18x0.25_sk0"
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    above = _perturbed_npz(src / "outputs.npz", npz_dir / "above.npz", "logits_sup", 2e-4)
    below = _perturbed_npz(src / "outputs.npz", npz_dir / "below.npz", "logits_sup", 5e-5)
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "imported"
    # logits_sup 2e-4 off (relative): above --check's 1e-4, so exit 1 and nothing written.
    bad = _cli(f"--src={src / 'saved_model'}", f"--workdir={out}", f"--check={above}")
    assert bad.returncode == 1
    (error,) = [line for line in bad.stderr.splitlines() if "import_weights: error:" in line]
    assert "differs from the official outputs: {'logits_sup': " in error
    assert abs(_printed_errors(bad.stdout)["logits_sup"] - 2e-4) < 2e-6
    assert os.listdir(runs) == []
    # --arch that the variables contradict: exit 1, nothing written.
    wrong = _cli(f"--src={src / 'saved_model'}", f"--workdir={out}", "--arch=r50x1")
    assert wrong.returncode == 1
    assert "--arch=r50x1 is ResNet-50 width 1 sk_ratio 0, but the checkpoint holds ResNet-18" in (
        wrong.stderr
    )
    assert os.listdir(runs) == []

    # logits_sup 5e-5 off: below the limit; every output's error is printed as measured.
    ok = _cli(
        f"--src={src / 'checkpoint'}",
        f"--workdir={out}",
        f"--check={below}",
        "--arch=r18_0.25x_sk0",
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.splitlines()[1].startswith(
        "ResNet-18 width 0.25, no selective kernels, CIFAR stem"
    )
    errors = _printed_errors(ok.stdout)
    assert set(errors) == set(import_weights.CHECKED_OUTPUTS)
    assert abs(errors.pop("logits_sup") - 5e-5) < 2e-6
    assert max(errors.values()) < 1e-6
    assert sorted(os.listdir(runs)) == ["imported"]  # no temporary folder left

    config = json.loads((out / "config.json").read_text())
    assert config["imported_from"]["simclr_name"] == "r18_0.25x_sk0"
    assert config["model"]["cifar_stem"] is True and config["data"]["image_size"] == 32
    loaded = checkpoint.load_variables(str(out))
    direct = import_weights.load(str(src / "saved_model")).variables
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(x, y)

    # An existing non-empty workdir is never overwritten.
    again = _cli(f"--src={src / 'checkpoint'}", f"--workdir={out}")
    assert again.returncode == 1 and "exists and is not empty" in again.stderr
    np.testing.assert_array_equal(
        checkpoint.load_variables(str(out))["params"]["head"]["dense"]["kernel"],
        direct["params"]["head"]["dense"]["kernel"],
    )


def _frozen_lr(config):
    """One step at learning rate 0: the parameters stay what the init gave."""
    config.total_steps = 1
    config.warmup_steps = 0
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1
    config.optim.base_lr = 0.0
    config.data.source = "synthetic:num_cases=32,num_classes=5,image_size=32,max_images_per_case=2"


@pytest.mark.slow
def test_trainers_start_from_an_imported_workdir(fixtures, tmp_path):
    """Pre-training, fine-tuning (with the supervised head) and frozen-feature evaluation
    take the imported weights."""
    src = fixtures / "r18x0.25_sk0" / "saved_model"
    imported = import_weights.load(str(src))
    with pytest.raises(ValueError, match="--image_size=0 must be a positive"):
        import_weights.write(imported, str(tmp_path / "imported"), image_size=0)
    assert not (tmp_path / "imported").exists()
    out = import_weights.write(imported, str(tmp_path / "imported"), image_size=40)
    assert json.loads((tmp_path / "imported" / "config.json").read_text())["data"] == {
        "image_size": 40
    }
    want = imported.variables["params"]

    # Frozen features (trainers/feature_eval.py) use the backbone as imported, BatchNorm
    # statistics included: nothing trains in between.
    spec = importlib.util.spec_from_file_location(
        "feature_eval_config", REPO_ROOT / "configs" / "feature_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"arch=r18x0.25,init={out},runlocal=True")
    variables, _ = feature_eval.load_backbone(
        models.build_model(config.model), config, config.data.image_size
    )
    for collection in ("params", "batch_stats"):
        got = jax.tree.leaves(variables[collection]["backbone"])
        ref = jax.tree.leaves(imported.variables[collection]["backbone"])
        for x, y in zip(got, ref, strict=True):
            np.testing.assert_array_equal(x, y)

    config = recipes.medical_pretrain_config(f"arch=r18x0.25,init={out},runlocal=True", "micle")
    _frozen_lr(config)
    pretrain.main(config, str(tmp_path / "pretrain"))
    got = checkpoint.load_variables(str(tmp_path / "pretrain"))["params"]
    for part in ("backbone", "projection_head"):
        for x, y in zip(jax.tree.leaves(got[part]), jax.tree.leaves(want[part]), strict=True):
            np.testing.assert_array_equal(x, y)

    config = recipes.finetune_config("r18x0.25")
    recipes.runlocal_finetune(config)
    _frozen_lr(config)
    config.init.checkpoint = out
    config.init.init_proj_layers = 0  # the fixture's head reads the backbone (ft_proj_selector=0)
    config.init.init_head = True
    config.data.mode = "supervised"
    config.evals = {}
    finetune.main(config, str(tmp_path / "finetune"))
    got = checkpoint.load_variables(str(tmp_path / "finetune"))["params"]
    np.testing.assert_array_equal(got["head"]["dense"]["kernel"], want["head"]["dense"]["kernel"])
    for x, y in zip(
        jax.tree.leaves(got["backbone"]), jax.tree.leaves(want["backbone"]), strict=True
    ):
        np.testing.assert_array_equal(x, y)


def test_arch_names_parse():
    assert config_lib.arch_fields("r50_1x_sk0") == dict(depth=50, width=1, sk_ratio=0.0)
    assert config_lib.arch_fields("r152_3x_sk1") == dict(depth=152, width=3, sk_ratio=0.0625)
    assert config_lib.arch_fields("r50x0.25_sk") == dict(depth=50, width=0.25, sk_ratio=0.0625)
    assert config_lib.arch_fields("r50x4") == dict(depth=50, width=4, sk_ratio=0.0)
    with pytest.raises(ValueError, match="unknown arch 'r50_1x_sk2'"):
        config_lib.arch_fields("r50_1x_sk2")


def _zeros_of(model_config, image_size):
    """{'params', 'batch_stats'} of zeros in the shapes of a model config."""
    model = models.build_model(models.get_config(**model_config))
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))


def test_init_mismatches_name_the_stem_or_the_head(fixtures):
    imported = import_weights.load(str(fixtures / "r18x0.25_sk0" / "checkpoint"))
    loaded = imported.variables
    same = _zeros_of({**imported.model_config, "cifar_stem": None}, 32)
    merged, copied = checkpoint.merge_variables(same, loaded, ("backbone", "head"))
    np.testing.assert_array_equal(
        merged["params"]["head"]["dense"]["bias"], loaded["params"]["head"]["dense"]["bias"]
    )
    # At 64 px the model takes the ImageNet stem (conv7x7): the error names the stem.
    imagenet = _zeros_of({**imported.model_config, "cifar_stem": None}, 64)
    with pytest.raises(ValueError, match="the stems differ"):
        checkpoint.merge_variables(imagenet, loaded, ("backbone",))
    other_task = _zeros_of({**imported.model_config, "num_classes": 3}, 32)
    with pytest.raises(ValueError, match="the supervised head differs.*init_head=False"):
        checkpoint.merge_variables(other_task, loaded, ("backbone", "head"))
