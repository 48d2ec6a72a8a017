r"""The training step with XLA's convolutions and max-pool against micle_jax's CPU lowerings.

  python benchmarks/cpu_convolutions.py --arch=r50x1 --image_size=64 --batch=32 --rounds=3

micle_jax/models/conv.py lowers the ResNets' 1x1 convolutions and those whose
kernel is larger than their output map to patch matmuls on the CPU and has
XLA compile the others itself rather than hand them to YNNPACK
(`conv.compiler_options()`), and micle_jax/models/pool.py the stem's max-pool
to a maximum over strided windows with its own gradient. This compiles the
trainer's contrastive step (benchmarks/common.build_step) twice in one
process, once as plain JAX would (XLA's convolutions and max-pool,
`conv.xla_convolutions()`, and XLA's default options) and once as the
trainer runs it ('patches'), then times them alternately, one step each per
round, so that load drifts on a shared machine hit both. Prints each
variant's median step time and peak memory (XLA's memory analysis) and last
`ratio xla/patches: X.XX` (above 1: micle_jax's CPU lowerings are faster).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_ARCH = flags.DEFINE_string("arch", "r50x1", "Architecture, e.g. r50x1, r18x0.25.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "View size in pixels.")
_BATCH = flags.DEFINE_integer("batch", 32, "Pairs per step (2 x batch views).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds (one step of each per round).")


def main(argv):
    del argv
    import jax
    from common import build_step, peak_bytes

    from micle_jax.models import conv

    variants = {}
    for name in ("xla", "patches"):
        with conv.xla_convolutions() if name == "xla" else contextlib.nullcontext():
            step, state, batch = build_step(
                _ARCH.value, _IMAGE_SIZE.value, _BATCH.value, "float32", xla_defaults=name == "xla"
            )
            compiled = step.lower(state, batch).compile()
        state, out = compiled(state, batch)  # warm-up
        jax.block_until_ready(out)
        variants[name] = {"step": compiled, "state": state, "batch": batch, "times": []}
    for _ in range(_ROUNDS.value):
        for v in variants.values():
            start = time.perf_counter()
            v["state"], out = v["step"](v["state"], v["batch"])
            jax.block_until_ready(out)
            v["times"].append(time.perf_counter() - start)
    print(
        f"{os.cpu_count()} CPUs; {_ARCH.value}, {_IMAGE_SIZE.value} px, {_BATCH.value} pairs, "
        f"float32, median of {_ROUNDS.value} alternating steps"
    )
    medians = {}
    for name, v in variants.items():
        medians[name] = float(np.median(v["times"]))
        print(
            f"{name}: {medians[name] * 1e3:.0f} ms/step, {2 * _BATCH.value / medians[name]:.1f} "
            f"views/s, peak {peak_bytes(v['step']) / 2**20:.0f} MiB"
        )
    print(f"ratio xla/patches: {medians['xla'] / medians['patches']:.2f}")


if __name__ == "__main__":
    app.run(main)
