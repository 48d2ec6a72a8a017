r"""Throughput of the jitted contrastive training step (a measurement, not a test).

  python benchmarks/step_throughput.py --arch=r50x1 --image_size=64 --batch=64

Prints views/s and the achieved FLOP/s of the whole update (forward and
backward of both views, NT-Xent, LARS), and as the reference measured in the
same run the FLOP/s of a large matmul in the compute dtype on the same devices, so that the
ratio means something on a shared, noisy machine. FLOPs per step come from
XLA's cost analysis of the lowered (not yet compiled) step, where a compiled
GPU step hides its convolutions in cuDNN calls that the analysis does not
count. On the CPU some convolutions are patch matmuls (micle_jax/models/
conv.py), which also multiply the padding's zeros. `--count_only` prints the
count of an accelerator's program (XLA's convolutions) without compiling or
running the step. Like `python -m micle_jax.main`, it restarts itself with
glibc's huge-page malloc (micle_jax/process_env.py) and compiles the step
with conv.compiler_options().
"""

from __future__ import annotations

import contextlib
import os
import sys

import jax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_step, matmul_flops_per_s, median_step_seconds  # noqa: E402

from micle_jax import models
from micle_jax.models import conv

_ARCH = flags.DEFINE_string("arch", "r50x1", "Architecture name (config_lib.ARCHS).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "View size in pixels.")
_BATCH = flags.DEFINE_integer("batch", 64, "Global batch (pairs); 2x views per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Reference matmul is N x N x N.")
_COUNT_ONLY = flags.DEFINE_bool("count_only", False, "Print the step's FLOPs and stop.")


def main(argv):
    del argv
    # --count_only counts an accelerator's program: XLA's convolutions, not the
    # CPU's patch matmuls (micle_jax/models/conv.py), which multiply padding too.
    with conv.xla_convolutions() if _COUNT_ONLY.value else contextlib.nullcontext():
        step, state, batch = build_step(_ARCH.value, _IMAGE_SIZE.value, _BATCH.value, _DTYPE.value)
        lowered = step.lower(state, batch)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    if _COUNT_ONLY.value:
        print(
            f"arch {_ARCH.value}  image {_IMAGE_SIZE.value}px  batch {_BATCH.value} pairs  "
            f"step FLOPs (XLA cost analysis, lowered): {flops / 1e9:.2f} GFLOP"
        )
        return
    lowered.compile()

    seconds, state = median_step_seconds(step, state, batch, _STEPS.value)
    reference = matmul_flops_per_s(_MATMUL.value, _DTYPE.value)
    views = 2 * _BATCH.value / seconds
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})")
    print(
        f"arch {_ARCH.value}  image {_IMAGE_SIZE.value}px  batch {_BATCH.value} pairs  "
        f"dtype {_DTYPE.value}  params {models.count_params(state.params):,}"
    )
    print(f"step time (median of {_STEPS.value}): {seconds * 1e3:.1f} ms")
    print(f"views/s: {views:.1f}")
    print(f"step FLOPs (XLA cost analysis, lowered): {flops / 1e9:.2f} GFLOP")
    print(f"achieved: {flops / seconds / 1e9:.2f} GFLOP/s")
    print(f"reference {_MATMUL.value}^3 {_DTYPE.value} matmul: {reference / 1e9:.2f} GFLOP/s")
    print(f"ratio achieved / reference: {flops / seconds / reference:.3f}")


if __name__ == "__main__":
    from micle_jax import process_env

    process_env.restart_with_tuned_malloc()  # as the trainer runs (micle_jax.main)
    app.run(main)
