r"""Memory and cost planner: compiles the real training step for one device of a slice.

  python -m micle_jax.plan --config=configs/simclr_imagenet.py:arch=r152x2 \
      --devices=256 --device_kind=tpu-v4 [--utilisation=0.4] [--json] \
      [--num_classes=N] [--compile_for=tpu] [--config.batch_size=4096 ...]

Builds the model, optimizer, state and update step exactly as the trainer
does (pre-training: trainers/pretrain.py and contrastive_step.py;
fine-tuning: trainers/finetune.py and supervised_step.py), jits the step as
the train loop does (trainers/loop.py: donated state, explicit shardings),
and lowers and compiles it on this machine's CPU with abstract inputs
(`jax.ShapeDtypeStruct`, nothing is allocated) for ONE device's share of the
global batch. Prints, per device: parameters, optimizer state, XLA's
argument / output / temporary sizes and the total against the chip's memory;
per step: the bytes of the gradient all-reduce and of NT-Xent's all-gather,
and the step time the FLOP count implies at a stated share of the chip's
peak FLOP/s (plan_devices.DEVICES).

Assumptions, printed with the plan:
- Data parallelism over config.mesh's "data" axis: global batch / (devices /
  config.mesh.model) pairs per device. Parameters and optimizer state are
  replicated (config.mesh.model = 1, every config's default); with
  config.mesh.model = M > 1 the step is compiled on M CPU devices, sharded as
  sharding.param_sharding shards it (parameters of >= shard_min_size
  elements split over the "model" axis), and the numbers are one device's.
- One device's program at the per-device batch has the memory of one device
  of the slice, except the cross-device terms: NT-Xent's logits are [2b, 2B]
  on the slice (b per device, B global) but [2b, 2b] here, and the
  collectives' buffers are missing.
- XLA:CPU is not XLA:TPU or XLA:GPU: layouts (TPU pads to 8 x 128 tiles),
  fusion and rematerialisation differ, so the temporaries are an estimate
  (2.3x XLA:TPU's for R50 1x at 128 pairs; larger in bfloat16 than in
  float32). With --compile_for=tpu and libtpu installed (no TPU needed) the
  step is compiled ahead of time by XLA:TPU for a TPU --device_kind, and the
  memory is that compiler's own analysis. The convolutions are XLA's own, as
  an accelerator runs them (a run on the CPU computes most of them as patch
  matmuls, micle_jax/models/conv.py).
- FLOPs come from the lowered (backend-independent) program, as
  benchmarks/step_throughput.py counts them (the compiled count when the
  lowered one is empty, as for TPU); the step time is those FLOPs at
  --utilisation of the chip's peak, compute only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from micle_jax import models, plan_devices, plan_report, plan_step, sharding  # noqa: E402
from micle_jax.models import conv  # noqa: E402
from micle_jax.trainers import train_state  # noqa: E402


def mesh_axes(mesh_config: ml_collections.ConfigDict, devices: int) -> tuple[int, int]:
    """(data, model) axis sizes of config.mesh on `devices` devices, as sharding.make_mesh."""
    model, data = int(mesh_config.model), int(mesh_config.data)
    if model < 1 or devices % model:
        raise ValueError(f"config.mesh.model={model} must be >= 1 and divide the {devices} devices")
    if data == -1:
        data = devices // model
    if data * model != devices:
        raise ValueError(
            f"config.mesh.data={data} x config.mesh.model={model} != {devices} devices; "
            "set config.mesh.data=-1 to use all of them"
        )
    return data, model


def per_device_bytes(tree, shardings) -> int:
    """Bytes of one device's shards of the (abstract) arrays of `tree`."""
    sizes = jax.tree.map(
        lambda x, s: int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * x.dtype.itemsize,
        tree,
        shardings,
    )
    return int(sum(jax.tree.leaves(sizes)))


def _cost(analysis) -> float:
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float((analysis or {}).get("flops", 0.0))


@dataclasses.dataclass(frozen=True)
class AbstractStep:
    """The jitted training step of a config and its abstract arguments, for one device.

    Attributes:
      step: the step jitted as loop.train jits it (donated state, shardings).
      state: the TrainState as ShapeDtypeStructs with their shardings.
      batch: the per-device batch as ShapeDtypeStructs.
      shardings: the TrainState's shardings (on the [1, model] compile mesh).
      head_classes: classes of the label head (0 = none).
      data_devices, model_devices: the slice's mesh axes.
      model, tx, mesh: the model, optimizer and [1, model] mesh the step was built
        with (train_state.create_state(model, tx, mesh, ...) makes a real state).
    """

    step: object
    state: object
    batch: dict
    shardings: object
    head_classes: int
    data_devices: int
    model_devices: int
    model: object
    tx: object
    mesh: object


def slice_batch(config: ml_collections.ConfigDict, devices: int) -> tuple[int, int, int]:
    """(data axis, model axis, per-device batch) of config on a slice of `devices` chips.

    The batch is split over the data axis only (sharding.batch_sharding), so
    each device gets config.batch_size / data examples (pairs in pre-training).
    """
    if devices < 1:
        raise ValueError(f"devices={devices} must be >= 1")
    n_data, n_model = mesh_axes(config.mesh, devices)
    global_batch = int(config.batch_size)
    if global_batch <= 0 or global_batch % n_data:
        raise ValueError(
            f"global batch config.batch_size={global_batch} does not divide over the {n_data} "
            f"data-parallel devices ({devices} devices / config.mesh.model={n_model}); pick a "
            f"multiple of {n_data}"
        )
    return n_data, n_model, global_batch // n_data


def abstract_step(
    config: ml_collections.ConfigDict,
    devices: int,
    info: plan_step.LabelInfo,
    config_name: str = "",
    compile_devices=None,
) -> AbstractStep:
    """The trainer's jitted step for one device of the slice; nothing is allocated.

    With config.mesh.model = M the step runs on a [1, M] mesh of
    `compile_devices` (default: this process's CPU devices): one data shard
    of the slice, its parameters sharded as on the slice.

    Raises:
      ValueError: a batch that does not divide over the devices, too few
        devices for the model axis, or a config that does not build.
    """
    n_data, n_model, per_device = slice_batch(config, devices)
    local = list(jax.devices("cpu") if compile_devices is None else compile_devices)
    if len(local) < n_model:
        raise ValueError(
            f"config.mesh.model={n_model}: its sharded step compiles on {n_model} devices and "
            f"there are {len(local)}; run `python -m micle_jax.plan` (which makes the CPU ones) "
            f"or set XLA_FLAGS=--xla_force_host_platform_device_count={n_model}"
        )
    image_size = int(config.data.image_size)
    one_shard = ml_collections.ConfigDict(dict(data=1, model=n_model))
    mesh = sharding.make_mesh(one_shard, devices=local[:n_model])
    min_size = config.mesh.shard_min_size
    try:
        model, tx, step_fn, head_classes = plan_step.build_step(config, info)
        # train_state.create_state under eval_shape: the trainer's state, never allocated.
        shapes = jax.eval_shape(
            lambda: train_state.create_state(model, tx, mesh, image_size, config.seed, min_size)[0]
        )
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"config {config_name} does not build: {e}") from e
    shardings = sharding.tree_shardings(shapes, mesh, min_size)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    # As loop.train jits the trainers' step.
    step = jax.jit(
        step_fn,
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    trainer = config.get("trainer", "pretrain")
    batch = plan_step.batch_spec(trainer, per_device, image_size, info)
    return AbstractStep(
        step, state, batch, shardings, head_classes, n_data, n_model, model, tx, mesh
    )


COMPILE_FOR = ("cpu", "tpu", "local")


def compile_target(device: plan_devices.Device, compile_for: str) -> tuple[list, str]:
    """The devices to compile for, and the compiler's name for the output.

    'cpu': this process's CPU devices (XLA:CPU). 'tpu': XLA:TPU ahead of time
    for a compile-only TPU topology of `device` (jax.experimental.topologies:
    needs libtpu installed, not a TPU). 'local': this machine's default
    backend (a benchmark on an accelerator).
    """
    if compile_for == "cpu":
        return jax.devices("cpu"), "XLA:CPU"
    if compile_for == "local":
        return jax.local_devices(), f"XLA:{jax.default_backend().upper()} (this machine)"
    if compile_for != "tpu":
        raise ValueError(f"compile_for={compile_for!r}; accepted: {', '.join(COMPILE_FOR)}")
    if not device.tpu_topology:
        tpus = [d.name for d in plan_devices.DEVICES.values() if d.tpu_topology]
        raise ValueError(
            f"compiling for TPU needs a TPU device kind ({', '.join(tpus)}), not {device.name!r}"
        )
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=device.tpu_topology)
    except Exception as e:  # no libtpu: RuntimeError or a JAX runtime error
        raise ValueError(
            f"compiling for TPU ahead of time needs libtpu (`pip install libtpu`, the version "
            f"that matches jax; no TPU needed): {e}"
        ) from e
    return topology.devices, f"XLA:TPU ahead of time (libtpu, topology {device.tpu_topology})"


def make_plan(
    config: ml_collections.ConfigDict,
    *,
    devices: int,
    device_kind: str,
    info: plan_step.LabelInfo,
    utilisation: float = 0.4,
    config_name: str = "",
    compile_for: str = "cpu",
) -> plan_report.Plan:
    """Compiles the training step of `config` for one device of `devices` and measures it.

    Args:
      config: a pre-training or fine-tuning config (config.trainer).
      devices: chips in the slice (JAX devices).
      device_kind: a name of plan_devices.DEVICES.
      info: the labels the head is built for (plan_step.label_info, plan_step.data_label_info).
      utilisation: the share of the chip's peak FLOP/s the step is assumed to reach.
      config_name: shown in the output.
      compile_for: one of COMPILE_FOR (see compile_target).

    Raises:
      ValueError: unknown device kind, a batch that does not divide over the
        devices, a config that does not build, or no TPU compiler.
    """
    device = plan_devices.get_device(device_kind)
    dtype = str(config.model.dtype)
    peak = device.peak_flops(dtype)
    plan_devices.step_seconds(1.0, 1.0, utilisation)  # validates utilisation
    compile_devices, compiled_by = compile_target(device, compile_for)
    abstract = abstract_step(config, devices, info, config_name, compile_devices)
    # The accelerator's program: XLA's convolutions, not the CPU's patch matmuls.
    with conv.xla_convolutions() if compile_for == "cpu" else contextlib.nullcontext():
        lowered = abstract.step.lower(abstract.state, abstract.batch)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    compiled_flops = _cost(compiled.cost_analysis())
    flops = _cost(lowered.cost_analysis()) or compiled_flops

    state, shardings = abstract.state, abstract.shardings
    params_bytes = per_device_bytes(state.params, shardings.params)
    trainer = config.get("trainer", "pretrain")
    global_batch = int(config.batch_size)
    return plan_report.Plan(
        config=config_name,
        trainer=trainer,
        compiled_by=compiled_by,
        device_kind=device.name,
        devices=devices,
        model_axis=abstract.model_devices,
        global_batch=global_batch,
        per_device_batch=global_batch // abstract.data_devices,
        image_size=int(config.data.image_size),
        dtype=dtype,
        optimizer=str(config.optim.name),
        param_count=models.count_params(state.params),
        head_classes=abstract.head_classes,
        params_bytes=params_bytes,
        batch_stats_bytes=per_device_bytes(state.batch_stats, shardings.batch_stats),
        opt_state_bytes=per_device_bytes(state.opt_state, shardings.opt_state),
        inputs_bytes=int(sum(x.size * x.dtype.itemsize for x in abstract.batch.values())),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        generated_code_bytes=int(memory.generated_code_size_in_bytes),
        device_memory_bytes=device.memory_bytes,
        flops=flops,
        compiled_flops=compiled_flops,
        compile_seconds=compile_seconds,
        all_reduce_bytes=params_bytes,
        all_reduce_ring_bytes=plan_devices.ring_all_reduce_bytes(
            params_bytes, abstract.data_devices
        ),
        all_gather_bytes=(
            plan_devices.nt_xent_all_gather_bytes(global_batch, int(config.model.proj_dim))
            if trainer == "pretrain"
            else 0
        ),
        peak_flops=peak,
        utilisation=utilisation,
        step_seconds=plan_devices.step_seconds(flops, peak, utilisation),
    )


def _define_flags() -> None:
    """The CLI's flags; defined only when run as a program (micle_jax.main has --config too)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file, optionally with ':ARG'.", lock_config=True
    )
    flags.DEFINE_integer("devices", None, "Chips (JAX devices) in the slice.")
    flags.DEFINE_string("device_kind", None, f"The chip: {', '.join(plan_devices.DEVICES)}.")
    flags.DEFINE_float(
        "utilisation", 0.4, "Share of the chip's peak FLOP/s the step reaches, for its time."
    )
    flags.DEFINE_integer(
        "num_classes",
        -1,
        "Classes of the label head (pre-training's online probe when config.linear_probe, "
        "fine-tuning's head); -1 = read them from config.data.source, as the trainer does.",
    )
    flags.DEFINE_enum(
        "label_type",
        "multiclass",
        list(plan_step.LABEL_TYPES),
        "With --num_classes: the labels' type.",
    )
    flags.DEFINE_enum(
        "compile_for",
        "cpu",
        ["cpu", "tpu"],
        "cpu: XLA:CPU (an estimate); tpu: XLA:TPU ahead of time for a TPU --device_kind, its "
        "own memory analysis (needs libtpu installed, not a TPU; minutes to compile).",
    )
    flags.DEFINE_bool("json", False, "Print the plan as JSON (bytes, FLOPs, seconds).")
    flags.mark_flags_as_required(["config", "devices", "device_kind"])


def main(argv) -> None:
    """`python -m micle_jax.plan`: see the module docstring."""
    import json

    from absl import app, flags, logging
    from ml_collections import config_flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    args = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    config = args.config
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    name = " ".join([config_flags.get_config_filename(args["config"]), *overrides])
    # Compile on the CPU (or ahead of time for TPU) whatever this machine has
    # (JAX would also claim a GPU's memory), with as many CPU devices as the
    # model axis needs.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", max(int(config.mesh.model), 1))
    try:
        if args.num_classes >= 0:
            info = plan_step.label_info(args.num_classes, args.label_type)
        else:
            info = plan_step.data_label_info(config)
        plan = make_plan(
            config,
            devices=args.devices,
            device_kind=args.device_kind,
            info=info,
            utilisation=args.utilisation,
            config_name=name,
            compile_for=args.compile_for,
        )
    except ValueError as e:
        print(f"micle_jax.plan: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan_report.format_plan(plan))


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
