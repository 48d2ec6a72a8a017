r"""Compile and run time of the one-shot model initialisation: -O0 (train_state.run_once) vs -O2.

  python benchmarks/init_compile.py [--archs=r18x0.25,r50x1] [--image_size=48] [--repeats=2]

Every run initialises its TrainState once (train_state.create_state), so
only the compile time of that computation counts. `run_once` compiles it with
XLA's CPU backend at -O0; the reference, timed in the same process on the same
lowered computation, is XLA's default (-O2). Alternating repeats, the best
compile and the best run (the compiled computation called once, blocked
until ready) of each are printed with the ratio of their sums, and the
largest difference between the parameters they give.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from micle_jax import config_lib, models, optim, recipes  # noqa: E402

_ARCHS = flags.DEFINE_list("archs", ["r18x0.25", "r50x1"], "Architectures (config_lib.ARCHS).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 48, "Input size of the initialisation.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Alternating compiles of each; the best is kept.")


def lowered_init(arch: str, image_size: int):
    """create_state's init computation (model and LARS state) for `arch`, lowered."""
    model = models.build_model(config_lib.model_config(arch))
    optim_config = recipes.pretrain_config(arch).optim
    tx = optim.make_optimizer(optim_config, optim.make_schedule(optim_config, 100, 10, 64))

    def init_fn():
        dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
        params = model.init(jax.random.key(0), dummy, train=False)["params"]
        return params, tx.init(params)

    return jax.jit(init_fn).lower()


def main(argv):
    del argv
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__}, {jax.devices()[0].platform}")
    for arch in _ARCHS.value:
        times = {"O0": [], "O2": []}
        runs = {"O0": [], "O2": []}
        outputs = {}
        for _ in range(_REPEATS.value):
            for name, options in (("O2", None), ("O0", {"xla_backend_optimization_level": 0})):
                lowered = lowered_init(arch, _IMAGE_SIZE.value)  # anew: no compiled copy kept
                start = time.perf_counter()
                compiled = lowered.compile(compiler_options=options)
                times[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                out = jax.block_until_ready(compiled())
                runs[name].append(time.perf_counter() - start)
                outputs[name] = jax.device_get(out[0])
        pairs = zip(jax.tree.leaves(outputs["O0"]), jax.tree.leaves(outputs["O2"]), strict=True)
        differ = max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in pairs)
        o0, o2 = min(times["O0"]), min(times["O2"])
        r0, r2 = min(runs["O0"]), min(runs["O2"])
        print(
            f"{arch}, {_IMAGE_SIZE.value} px: init compile -O0 {o0:.1f} s + run {r0:.2f} s, "
            f"-O2 (default) {o2:.1f} s + run {r2:.2f} s, ratio {(o2 + r2) / (o0 + r0):.1f}x; "
            f"largest parameter difference {differ:.1e}"
        )


if __name__ == "__main__":
    app.run(main)
