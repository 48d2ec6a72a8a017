r"""The planner's predictions against the step measured on this machine (a measurement, not a test).

  python benchmarks/plan_vs_device.py --arch=r50x1 --batch=256 --dtype=bfloat16 \
      --device_kind=h200 --steps=10

Plans the pre-training step of configs/simclr_imagenet.py (no online probe,
as benchmarks/step_throughput.py) for one device as `python -m
micle_jax.plan` does, on XLA:CPU; compiles the same step for this machine's
own backend and reads its memory analysis; then runs it and prints the
measured step time and peak memory (`memory_stats()['peak_bytes_in_use']`,
absent on the CPU) next to the predictions, with the FLOP/s utilisation the
measured time implies. Run it where docs/performance.md's H200 rows were
measured to calibrate the planner's --utilisation and its memory estimate.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from micle_jax import plan, plan_step, recipes  # noqa: E402
from micle_jax.trainers import train_state  # noqa: E402

_ARCH = flags.DEFINE_string("arch", "r50x1", "Architecture name (config_lib.ARCHS).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "View size in pixels.")
_BATCH = flags.DEFINE_integer("batch", 256, "Pairs per step on this one device.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")
_DEVICE_KIND = flags.DEFINE_string("device_kind", "h200", "The planner's name for this chip.")
_UTILISATION = flags.DEFINE_float("utilisation", 0.4, "The planner's assumed utilisation.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")

GIB = 2**30


def main(argv):
    del argv
    config = recipes.pretrain_config(_ARCH.value)
    config.batch_size = _BATCH.value
    config.data.image_size = _IMAGE_SIZE.value
    config.model.dtype = _DTYPE.value
    info = plan_step.label_info(0)
    backend = jax.default_backend()
    kwargs = dict(devices=1, device_kind=_DEVICE_KIND.value, info=info)
    predicted = plan.make_plan(config, utilisation=_UTILISATION.value, compile_for="cpu", **kwargs)
    compiled = plan.make_plan(config, compile_for="local", **kwargs)

    abstract = plan.abstract_step(config, 1, info, compile_devices=jax.local_devices())
    state, _, _ = train_state.create_state(
        abstract.model,
        abstract.tx,
        abstract.mesh,
        config.data.image_size,
        config.seed,
        config.mesh.shard_min_size,
    )
    rng = np.random.default_rng(0)
    batch = {
        key: jax.device_put(
            rng.random(spec.shape, np.float32).astype(spec.dtype),
            jax.sharding.NamedSharding(abstract.mesh, jax.sharding.PartitionSpec("data")),
        )
        for key, spec in abstract.batch.items()
    }
    state, measurements = abstract.step(state, batch)  # compile and warm up
    jax.block_until_ready(measurements)
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, measurements = abstract.step(state, batch)
        jax.block_until_ready(measurements)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    stats = jax.local_devices(backend=backend)[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")

    device = jax.local_devices(backend=backend)[0]
    print(f"device: {device.device_kind} ({backend}), planner's name {_DEVICE_KIND.value}")
    print(
        f"arch {_ARCH.value}  image {_IMAGE_SIZE.value}px  batch {_BATCH.value} pairs  "
        f"dtype {_DTYPE.value}  params {predicted.param_count:,}"
    )
    print("| quantity | planner (XLA:CPU) | XLA:" + backend + " compile | measured |")
    print("|---|---|---|---|")
    print(f"| temp GiB | {predicted.temp_bytes / GIB:.2f} | {compiled.temp_bytes / GIB:.2f} | - |")
    measured_peak = f"{peak / GIB:.2f} (peak_bytes_in_use)" if peak else "n/a"
    print(
        f"| total GiB | {predicted.total_bytes / GIB:.2f} | {compiled.total_bytes / GIB:.2f} | "
        f"{measured_peak} |"
    )
    print(
        f"| step ms | {predicted.step_seconds * 1e3:.1f} at {100 * _UTILISATION.value:.0f}% | - | "
        f"{seconds * 1e3:.1f} (median of {_STEPS.value}) |"
    )
    print(
        f"| utilisation | {100 * _UTILISATION.value:.0f}% assumed | - | "
        f"{100 * predicted.flops / seconds / predicted.peak_flops:.1f}% implied |"
    )


if __name__ == "__main__":
    app.run(main)
