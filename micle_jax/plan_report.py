"""The planner's printed table (`python -m micle_jax.plan`; --json prints Plan.to_dict)."""

from __future__ import annotations

import dataclasses

from micle_jax import plan_devices

MIB = plan_devices.MIB
GIB = plan_devices.GIB

CPU_NOTE = (
    "XLA:CPU's layouts (TPU pads to 8x128 tiles), fusion and rematerialisation differ "
    "from TPU/GPU's, so its temp is an estimate: 2.3x XLA:TPU's for R50 1x at 128 pairs, "
    "and larger in bfloat16 than in float32 (README: Planner; --compile_for=tpu compiles "
    "with XLA:TPU itself)"
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One device's memory, communication and compute for a config on a slice.

    Bytes are per device. XLA's sizes (memory_analysis of the compiled step):
    argument = everything passed in (the state and the input batch); output =
    the new state and the measurements; alias = outputs written into donated
    arguments (the state), so counted once; temp = what XLA allocates during
    the step: activations kept for the backward pass, gradients, the
    optimizer's intermediates; generated_code = the program itself.
    """

    config: str
    trainer: str
    compiled_by: str
    device_kind: str
    devices: int
    model_axis: int
    global_batch: int
    per_device_batch: int
    image_size: int
    dtype: str
    optimizer: str
    param_count: int
    head_classes: int
    params_bytes: int
    batch_stats_bytes: int
    opt_state_bytes: int
    inputs_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    device_memory_bytes: int
    flops: float
    compiled_flops: float
    compile_seconds: float
    all_reduce_bytes: int
    all_reduce_ring_bytes: float
    all_gather_bytes: int
    peak_flops: float
    utilisation: float
    step_seconds: float

    @property
    def data_devices(self) -> int:
        return self.devices // self.model_axis

    @property
    def total_bytes(self) -> int:
        """Peak memory of the step: arguments, outputs not aliased to them, temporaries, code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.generated_code_bytes
        )

    def to_dict(self) -> dict:
        """Every field plus the derived ones, for --json."""
        return dict(
            dataclasses.asdict(self),
            data_devices=self.data_devices,
            total_bytes=self.total_bytes,
            fits=self.total_bytes <= self.device_memory_bytes,
        )


def _row(label: str, nbytes: float, extra: str = "") -> str:
    return f"  {label:<46}{nbytes / MIB:>12,.1f}{extra}"


def format_plan(plan: Plan) -> str:
    """A compact, human-readable table of a Plan."""
    device = plan_devices.get_device(plan.device_kind)
    pretrain = plan.trainer == "pretrain"
    unit = "pairs" if pretrain else "images"
    images = 2 * plan.per_device_batch if pretrain else plan.per_device_batch
    if plan.model_axis == 1:
        placement = "parameters and optimizer state replicated (config.mesh.model=1)"
    else:
        placement = (
            f"parameters of >= config.mesh.shard_min_size elements split over "
            f"config.mesh.model={plan.model_axis} devices, the batch over {plan.data_devices}"
        )
    head = f"head {plan.head_classes} classes" if plan.head_classes else "no label head"
    memory, total = plan.device_memory_bytes, plan.total_bytes
    lines = [
        f"plan: {plan.config or '(config)'}",
        f"  {plan.trainer}, {plan.optimizer}, {plan.dtype}, {head}, "
        f"{plan.param_count:,} parameters",
        f"slice: {plan.devices} x {device.name}: {memory / GIB:.1f} GiB, "
        f"{plan.peak_flops / 1e12:,.1f} TFLOP/s peak for {plan.dtype} ({device.source})",
        f"batch: global {plan.global_batch} {unit} / {plan.data_devices} data-parallel devices"
        f" = {plan.per_device_batch} {unit} per device ({images} images of {plan.image_size} px)",
        f"assumes: {placement}",
        f"compiled by: {plan.compiled_by} in {plan.compile_seconds:.1f} s",
        *([f"note: {CPU_NOTE}"] if plan.compiled_by == "XLA:CPU" else []),
        "",
        f"memory per device{'MiB':>43}",
        _row(f"parameters ({plan.param_count:,} x 4 B)", plan.params_bytes),
        _row("batch-norm statistics", plan.batch_stats_bytes),
        _row(f"optimizer state ({plan.optimizer})", plan.opt_state_bytes),
        _row("input batch", plan.inputs_bytes),
        _row("= XLA argument (the above, as compiled)", plan.argument_bytes),
        _row("+ XLA output not aliased to the donated state", plan.output_bytes - plan.alias_bytes),
        _row("+ XLA temp (activations, gradients, ...)", plan.temp_bytes),
        _row("+ XLA generated code", plan.generated_code_bytes),
        _row(
            "= total",
            total,
            f"  {100 * total / memory:.0f}% of {memory / GIB:.1f} GiB: "
            + ("fits" if total <= memory else "DOES NOT FIT"),
        ),
        "",
        "communication per step",
        f"  gradient all-reduce: {plan.all_reduce_bytes / MIB:,.1f} MiB (the parameters); a ring"
        f" moves 2(n-1)/n of it, {plan.all_reduce_ring_bytes / MIB:,.1f} MiB, per device",
    ]
    if pretrain:
        lines.append(
            f"  NT-Xent all-gather: {plan.global_batch} x 2 views x proj_dim x 4 B = "
            f"{plan.all_gather_bytes / MIB:,.2f} MiB; each device receives (n-1)/n of it"
        )
    rate = f", {2 * plan.global_batch / plan.step_seconds:,.0f} views/s" if pretrain else ""
    lines += [
        "compute per step",
        f"  {plan.flops / 1e12:,.3f} TFLOP per device (XLA's cost analysis) at "
        f"{100 * plan.utilisation:.0f}% of peak: {plan.step_seconds * 1e3:,.1f} ms{rate}",
        "  (compute only: communication not overlapped with it and the input pipeline add)",
    ]
    return "\n".join(lines)
