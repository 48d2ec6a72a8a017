"""Tests of the memory and cost planner (micle_jax/plan.py) on tiny configs.

Compiling is the cost here: the module compiles three steps (pre-training at
8 and 16 pairs per device, fine-tuning at 8 images) and every test reads them.
"""

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micle_jax import models, optim, plan, plan_devices, plan_report, plan_step, recipes

REPO = pathlib.Path(__file__).resolve().parents[1]
PROBE_CLASSES = 4
IMAGE = 16


def pretrain_config(batch=16, **model):
    config = recipes.pretrain_config("r18x0.25")
    recipes.runlocal_pretrain(config)
    config.batch_size = batch
    config.data.source = f"synthetic:num_cases=32,num_classes={PROBE_CLASSES},image_size=32"
    config.data.image_size = IMAGE
    config.model.update(model)
    return config


def finetune_config(batch=16):
    config = recipes.finetune_config("r18x0.25")
    recipes.runlocal_finetune(config)
    config.batch_size = batch
    config.data.image_size = IMAGE
    return config


def tree_bytes(tree) -> int:
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def real_params(config, num_classes):
    """The parameters of the model config.model builds (shapes of its own init)."""
    model_config = config.model.copy_and_resolve_references()
    model_config.num_classes = num_classes
    model = models.build_model(model_config)
    images = jnp.zeros((2, IMAGE, IMAGE, 3), jnp.float32)
    return model, jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))[
        "params"
    ]


@pytest.fixture(scope="module")
def plans():
    """Pre-training at 8 and 16 pairs per device (global 16 and 32 on 2 devices)."""
    info = plan_step.label_info(PROBE_CLASSES)
    return {
        batch: plan.make_plan(
            pretrain_config(2 * batch), devices=2, device_kind="tpu-v4", info=info
        )
        for batch in (8, 16)
    }


@pytest.fixture(scope="module")
def finetune_plan():
    info = plan_step.label_info(3)
    return plan.make_plan(finetune_config(), devices=2, device_kind="h100", info=info)


def test_the_plan_lowers_the_accelerators_convolutions(monkeypatch):
    # On the CPU, models/conv.py lowers most convolutions to patch matmuls; a
    # plan for an accelerator must compile XLA's convolutions, as it would run.
    seen = []
    real = plan.abstract_step

    def spying(*args, **kwargs):
        abstract = real(*args, **kwargs)
        step = abstract.step

        class Step:
            def lower(self, *lower_args):
                lowered = step.lower(*lower_args)
                seen.append(lowered.as_text().count("stablehlo.convolution"))
                return lowered

        return dataclasses.replace(abstract, step=Step())

    monkeypatch.setattr(plan, "abstract_step", spying)
    info = plan_step.label_info(PROBE_CLASSES)
    plan.make_plan(pretrain_config(16), devices=2, device_kind="h100", info=info)
    # ResNet-18: 21 convolutions, each with its two gradients but the stem's input one.
    assert seen == [3 * 21 - 1]


def test_parameter_bytes_are_four_per_parameter(plans):
    _, params = real_params(pretrain_config(), PROBE_CLASSES)
    count = sum(x.size for x in jax.tree.leaves(params))
    assert plans[8].param_count == count
    assert plans[8].params_bytes == 4 * count
    assert plans[8].head_classes == PROBE_CLASSES


def test_parameter_count_of_r50x1_is_the_published_one():
    # docs/performance.md: R50 1x with SimCLR's 3-layer projection head, no probe.
    config = recipes.pretrain_config("r50x1")
    step = plan.abstract_step(config, 32, plan_step.label_info(0))
    assert models.count_params(step.state.params) == 32_167_104
    assert plan.per_device_bytes(step.state.params, step.shardings.params) == 4 * 32_167_104


def test_optimizer_state_bytes_match_the_real_optimizer_state(plans):
    config = pretrain_config()
    _, params = real_params(config, PROBE_CLASSES)
    schedule = optim.make_schedule(config.optim, 10, 1, config.batch_size)
    real_state = jax.eval_shape(optim.make_optimizer(config.optim, schedule).init, params)
    assert plans[8].opt_state_bytes == tree_bytes(real_state)
    # LARS keeps one momentum per parameter (and a step count).
    assert 0 <= plans[8].opt_state_bytes - plans[8].params_bytes <= 8


def test_fine_tuning_optimizer_state_skips_the_frozen_projection_layers(finetune_plan):
    from micle_jax import task as task_lib
    from micle_jax.trainers import supervised_step

    config = finetune_config()
    task = task_lib.make_task(config, plan_step.label_info(3))
    model = task_lib.build_model(config, task)
    images = jnp.zeros((2, IMAGE, IMAGE, 3), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))["params"]
    schedule = optim.make_schedule(config.optim, 10, 1, config.batch_size)
    tx = supervised_step.make_optimizer(config, model, IMAGE, schedule)
    assert finetune_plan.head_classes == 3
    assert finetune_plan.params_bytes == 4 * sum(x.size for x in jax.tree.leaves(params))
    assert finetune_plan.opt_state_bytes == tree_bytes(jax.eval_shape(tx.init, params))
    assert finetune_plan.opt_state_bytes < finetune_plan.params_bytes
    assert finetune_plan.all_gather_bytes == 0


def test_compiled_arguments_are_the_state_and_one_devices_batch(plans, finetune_plan):
    for b, p in plans.items():
        assert p.per_device_batch == b == p.global_batch // p.devices
        views = 2 * b * IMAGE * IMAGE * 3 * 4
        assert p.inputs_bytes == views + b * 4 + b  # + label int32, multi_instance bool
        step_count = 4
        state = p.params_bytes + p.batch_stats_bytes + p.opt_state_bytes + step_count
        assert p.argument_bytes == state + p.inputs_bytes
        # The donated state is written in place: only the measurements are new.
        assert 0 <= p.output_bytes - p.alias_bytes < 4096
    assert finetune_plan.inputs_bytes == 8 * IMAGE * IMAGE * 3 * 4 + 8 * 4


def test_doubling_the_per_device_batch_grows_temp_memory_and_flops(plans):
    small, big = plans[8], plans[16]
    assert big.temp_bytes > 1.5 * small.temp_bytes
    assert big.total_bytes > small.total_bytes
    assert big.flops == pytest.approx(2 * small.flops, rel=0.05)
    assert big.params_bytes == small.params_bytes


def test_per_device_batch_is_the_global_batch_over_the_data_axis():
    config = pretrain_config(batch=4096)
    assert plan.slice_batch(config, 32) == (32, 1, 128)
    assert plan.slice_batch(config, 256) == (256, 1, 16)
    config.mesh.model = 4
    assert plan.slice_batch(config, 32) == (8, 4, 512)


def test_model_axis_shards_the_large_parameters_and_their_momentum():
    config = pretrain_config()
    config.mesh.model = 2
    config.mesh.shard_min_size = 2**12
    step = plan.abstract_step(config, 4, plan_step.label_info(0))
    _, params = real_params(config, 0)
    expected = 0
    for x in jax.tree.leaves(params):
        split = x.size >= 2**12 and any(d % 2 == 0 for d in x.shape)
        expected += x.size * 2 if split else x.size * 4
    assert expected < tree_bytes(params)
    assert plan.per_device_bytes(step.state.params, step.shardings.params) == expected
    opt_bytes = plan.per_device_bytes(step.state.opt_state, step.shardings.opt_state)
    assert 0 <= opt_bytes - expected <= 8
    assert step.data_devices == 2 and step.batch["view1"].shape[0] == 8


def test_communication_formulas(plans):
    assert plan_devices.nt_xent_all_gather_bytes(4096, 128) == 4096 * 2 * 128 * 4 == 4 * 2**20
    assert plans[8].all_gather_bytes == 16 * 2 * 128 * 4
    assert plans[16].all_gather_bytes == 32 * 2 * 128 * 4
    assert plan_devices.ring_all_reduce_bytes(1000, 1) == 0
    assert plan_devices.ring_all_reduce_bytes(1000, 4) == 1500
    assert plans[8].all_reduce_bytes == plans[8].params_bytes
    assert plans[8].all_reduce_ring_bytes == plans[8].params_bytes  # 2 (2 - 1) / 2


def test_step_time_is_flops_over_peak_at_the_utilisation(plans, finetune_plan):
    p = plans[8]
    assert p.step_seconds == pytest.approx(p.flops / (275e12 * 0.4))
    # H100, float32: TF32 tensor cores, half the bf16 rate.
    assert finetune_plan.step_seconds == pytest.approx(finetune_plan.flops / (494.7e12 * 0.4))
    assert p.flops == pytest.approx(p.compiled_flops, rel=0.1)


def test_batch_spec_is_what_the_pipeline_delivers():
    from micle_jax.data.stream import pipeline

    config = pretrain_config()
    data = pipeline.open_data(config.data, seed=0)
    info = plan_step.data_label_info(config)
    assert info.num_classes == data.info.num_classes == PROBE_CLASSES
    for mode, trainer in (("simclr", "pretrain"), ("supervised", "finetune")):
        element = data.dataset(mode, 4).element_spec
        spec = plan_step.batch_spec(trainer, 4, IMAGE, info)
        numeric = {k: v for k, v in element.items() if v.dtype.name != "string"}
        assert set(spec) == set(numeric), mode
        for key, value in spec.items():
            assert value.shape == tuple(numeric[key].shape), key
            assert np.dtype(value.dtype) == numeric[key].dtype.as_numpy_dtype, key


def test_unknown_device_kind_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown device kind 'tpu-v9'; known: tpu-v4, tpu-v5e"):
        plan.make_plan(
            pretrain_config(), devices=2, device_kind="tpu-v9", info=plan_step.label_info(0)
        )


def test_a_batch_that_does_not_divide_over_the_devices_is_an_error():
    with pytest.raises(ValueError, match="batch_size=16 does not divide over the 3 data-parallel"):
        plan.make_plan(
            pretrain_config(), devices=3, device_kind="tpu-v4", info=plan_step.label_info(0)
        )
    config = pretrain_config()
    config.mesh.model = 3
    with pytest.raises(ValueError, match="config.mesh.model=3 must be >= 1 and divide the 4"):
        plan.slice_batch(config, 4)


def test_a_config_that_does_not_build_is_an_error():
    config = pretrain_config(depth=19)
    with pytest.raises(ValueError, match=r"does not build: model.depth=19 is not supported"):
        plan.abstract_step(config, 2, plan_step.label_info(0))
    config = pretrain_config()
    config.trainer = "feature_eval"
    with pytest.raises(ValueError, match="config.trainer='feature_eval' cannot be planned"):
        plan.abstract_step(config, 2, plan_step.label_info(0))
    with pytest.raises(ValueError, match="utilisation=1.5 must be in"):
        plan.make_plan(
            pretrain_config(),
            devices=2,
            device_kind="h200",
            info=plan_step.label_info(0),
            utilisation=1.5,
        )


def test_tpu_compilation_needs_a_tpu_kind_and_libtpu():
    tpu = plan_devices.get_device("tpu-v5e")
    with pytest.raises(ValueError, match="needs a TPU device kind .*tpu-v4.*, not 'h100'"):
        plan.compile_target(plan_devices.get_device("h100"), "tpu")
    if importlib.util.find_spec("libtpu") is None:
        with pytest.raises(ValueError, match="needs libtpu"):
            plan.compile_target(tpu, "tpu")
    else:
        devices, name = plan.compile_target(tpu, "tpu")
        assert devices[0].device_kind.startswith("TPU v5") and "v5e:2x2" in name
    assert plan.compile_target(tpu, "cpu") == (jax.devices("cpu"), "XLA:CPU")


def test_report_shows_every_memory_row_and_the_verdict(plans):
    text = plan_report.format_plan(plans[8])
    for row in ("parameters (", "optimizer state (lars)", "XLA temp", "= total", "all-reduce"):
        assert row in text
    assert "8 pairs per device (16 images of 16 px)" in text
    assert "% of 32.0 GiB: fits" in text
    assert "XLA:CPU" in text


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "micle_jax.plan", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_json_is_the_plan(plans):
    config = "configs/simclr_imagenet.py:arch=r18x0.25,runlocal=True"
    result = cli(
        f"--config={config}",
        f"--config.data.image_size={IMAGE}",
        "--devices=2",
        "--device_kind=tpu-v4",
        f"--num_classes={PROBE_CLASSES}",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected = plans[8].to_dict()
    for key in ("params_bytes", "opt_state_bytes", "argument_bytes", "per_device_batch", "flops"):
        assert out[key] == expected[key], key
    assert out["temp_bytes"] == pytest.approx(expected["temp_bytes"], rel=0.05)
    assert out["config"] == f"{config} --config.data.image_size={IMAGE}"


def test_cli_errors_are_one_line():
    result = cli(
        "--config=configs/simclr_imagenet.py:arch=r18x0.25,runlocal=True",
        "--devices=2",
        "--device_kind=v4",
        "--num_classes=0",
    )
    assert result.returncode == 1
    assert "micle_jax.plan: error: unknown device kind 'v4'; known: tpu-v4" in result.stderr
