"""Config helpers and the shipped configs: parsing, durations, locking."""

import importlib.util
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from micle_jax import config_lib, optim

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_parse_arg_types_and_errors():
    arg = config_lib.parse_arg(
        "arch=r50x4,runlocal,steps=3,lr=0.5", arch="r50x1", runlocal=False, steps=1, lr=0.1
    )
    assert (arg.arch, arg.runlocal, arg.steps, arg.lr) == ("r50x4", True, 3, 0.5)
    with pytest.raises(ValueError, match="unknown config argument 'arhc'"):
        config_lib.parse_arg("arhc=r50x4", arch="r50x1")
    with pytest.raises(ValueError, match="expected int"):
        config_lib.parse_arg("steps=many", steps=1)
    with pytest.raises(ValueError, match="runlocal=.maybe.: expected bool"):
        config_lib.parse_arg("runlocal=maybe", runlocal=False)


def test_get_steps_from_steps_or_epochs():
    c = ml_collections.ConfigDict(dict(total_steps=None, total_epochs=100.0))
    # ImageNet: 1,281,167 images, batch 4096, 100 epochs -> 31,278.5 -> 31,278 steps.
    assert config_lib.get_steps("total", c, 1_281_167, 4096) == 31278
    c.total_epochs, c.total_steps = None, 7
    assert config_lib.get_steps("total", c, 10, 2) == 7
    c.total_epochs = 1.0
    with pytest.raises(ValueError, match="both total_steps=7 and total_epochs=1.0"):
        config_lib.get_steps("total", c, 10, 2)
    c2 = ml_collections.ConfigDict(dict(warmup_epochs=0.01))
    assert config_lib.get_steps("warmup", c2, 10, 64) == 1  # never rounded to 0
    assert config_lib.get_steps("absent", c2, 10, 64, default=0) == 0
    with pytest.raises(ValueError, match="needs absent_steps or absent_epochs"):
        config_lib.get_steps("absent", c2, 10, 64)


def test_block_builders_check_their_fields():
    model = config_lib.model_config("r50x4", num_classes=3)
    assert set(model) == set(config_lib.MODEL_DEFAULTS)  # their order: test_config_json.py
    assert (model.depth, model.width, model.num_classes) == (50, 4, 3)
    assert config_lib.data_config(image_size=32).image_size == 32
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['widht'\]"):
        config_lib.model_config("r50x1", widht=2)
    with pytest.raises(ValueError, match=r"unknown data config field\(s\) \['sorce'\]"):
        config_lib.data_config(sorce="synthetic")
    with pytest.raises(ValueError, match=r"needs the field\(s\) \['lr_scaling', 'weight_decay'\]"):
        config_lib.optim_config(name="lars", base_lr=0.1)


def test_config_helpers_and_recipes_import_neither_jax_nor_tensorflow():
    # The launchers load configs (and the data, model and optim code reads the
    # defaults from config_lib): neither may need the accelerator stack.
    code = (
        "import sys; import micle_jax.config_lib, micle_jax.recipes; "
        "print(sorted(m for m in ('jax', 'flax', 'optax', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("arch", ["r50x1", "r50x4", "r152x2"])
def test_simclr_imagenet_is_the_official_recipe(arch):
    c = load_config("simclr_imagenet", f"arch={arch}")
    depth, width, _ = config_lib.ARCHS[arch]
    assert (c.model.depth, c.model.width) == (depth, width)
    assert c.batch_size == 4096 and c.total_epochs == 100 and c.warmup_epochs == 10
    assert c.optim.name == "lars" and c.optim.base_lr == 0.075 and c.optim.lr_scaling == "sqrt"
    assert c.optim.weight_decay == 1e-4 and c.optim.momentum == 0.9 and c.optim.eeta == 1e-3
    assert c.loss.temperature == 0.1 and c.data.image_size == 224
    assert c.model.proj_layers == 3 and c.model.proj_dim == 128
    assert c.data.source == "tfds:imagenet2012"


def test_runlocal_shrinks_and_configs_are_lockable():
    c = load_config("simclr_imagenet", "arch=r50x1,runlocal=True")
    assert c.batch_size <= 32 and c.total_steps <= 10 and c.data.source.startswith("synthetic")
    c.lock()
    with pytest.raises(AttributeError):
        c.batch_sise = 3  # a misspelled key is an error, never silently added
    for name in ("simclr_medical", "micle_medical"):
        m = load_config(name, "runlocal=True")
        assert m.data.mode == name.split("_")[0]
        assert m.data.source.startswith("records:")


def test_nesterov_and_stem_follow_simclr_and_can_be_forced():
    """SimCLR: Keras SGD(nesterov=True) for momentum, classic LARS; CIFAR stem iff <= 32 px."""
    pretrain = load_config("simclr_imagenet", "arch=r50x1")
    assert pretrain.optim.nesterov is None and not optim.uses_nesterov(pretrain.optim)
    linear = load_config("linear_eval", "runlocal=True")
    assert linear.optim.name == "momentum" and linear.optim.nesterov is True
    assert optim.uses_nesterov(linear.optim)
    assert pretrain.model.cifar_stem is None  # resolved from the image size
    pretrain.lock()
    pretrain.optim.nesterov = True  # placeholders take command-line style overrides
    pretrain.model.cifar_stem = False
    assert optim.uses_nesterov(pretrain.optim) and pretrain.model.cifar_stem is False
    with pytest.raises(TypeError):
        pretrain.model.cifar_stem = "yes"


def test_medical_configs_choose_the_augment_policy_by_the_data():
    # 'auto' is resolved by the pipeline from the records (pipeline.Data.augment_policy),
    # never by the config, which reads no files; an explicit policy is kept.
    for name in ("simclr_medical", "micle_medical"):
        assert load_config(name).data.augment == "auto"
        assert load_config(name, "augment=cxr").data.augment == "cxr"
        assert load_config(name, "augment=simclr,runlocal=True").data.augment == "simclr"
