r"""Records -> input pipeline -> training step at the demo's settings: views/s, data wait.

  python benchmarks/end_to_end.py [--run=pretrain_ham10000_micle_s0] [--steps=40]

Runs the demo's pre-training command (configs/sweeps/demo.py, expanded as
`make demo` expands it: HAM10000 records, MICLe, ResNet-18 0.25x, 48 px, 128
pairs, the 'simclr_small' policy) for `--steps` steps in a temporary workdir,
logging every `--log_every` steps, and reads from its event files the
trainer's own figures for every interval after the first (which holds the
compilation): CLU's steps_per_sec, as views/s, and the loop's
`data_wait_fraction` (micle_jax/trainers/loop.py: the share of training time
spent waiting for the next batch).

The reference, measured in the same run on the same machine: the same step
(benchmarks/common.build_step: the arch, image size, batch and dtype) on one
batch of random views already on the devices, no input pipeline; the ratio
end-to-end / step alone says what the input pipeline costs the training. The
step's peak memory is XLA's memory analysis of that compiled step.

Both run with glibc's huge-page malloc: the trainer restarts itself with it
(micle_jax/process_env.py) and so does this script, for the reference.

The demo runs two pre-trainings at once (--parallel=2) on a 2-core machine;
this runs one, so its step has both cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
from common import build_step, median_step_seconds, peak_bytes  # noqa: E402

from launch import sweep_spec  # noqa: E402

_SWEEP = flags.DEFINE_string("sweep", "configs/sweeps/demo.py", "The sweep whose run is timed.")
_RUN = flags.DEFINE_string("run", "pretrain_ham10000_micle_s0", "The pre-training run's name.")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps of the end-to-end run.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps per measured interval.")
_REFERENCE_STEPS = flags.DEFINE_integer("reference_steps", 10, "Timed steps of the reference.")

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def demo_run(root: str) -> sweep_spec.Run:
    """The named run of the sweep, with its workdir under `root`."""
    runs = sweep_spec.expand(sweep_spec.load_sweep(_SWEEP.value), root)
    by_name = {r.name: r for r in runs}
    if _RUN.value not in by_name:
        raise SystemExit(
            f"--run={_RUN.value}: not a run of {_SWEEP.value}; runs: {sorted(by_name)}"
        )
    return by_name[_RUN.value]


def config_value(args, key: str) -> str:
    """The last `--config.KEY=value` of a command line."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--config.{key}=")]
    if not values:
        raise SystemExit(f"the run's command sets no --config.{key}")
    return values[-1]


def event_scalars(workdir: str, tag: str) -> dict[int, float]:
    """{step: value} of a scalar in a run's TensorBoard event files."""
    import tensorflow as tf

    found = {}
    for name in os.listdir(workdir):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
                for v in event.summary.value:
                    if v.tag == tag:
                        value = (
                            tf.make_ndarray(v.tensor) if v.HasField("tensor") else v.simple_value
                        )
                        found[event.step] = float(value)
    return found


def reference(arch: str, image_size: int, batch: int) -> tuple[float, float]:
    """(views/s, peak step memory in bytes) of the step alone on random views."""
    step, state, inputs = build_step(arch, image_size, batch, "float32")
    compiled = step.lower(state, inputs).compile()
    seconds, _ = median_step_seconds(compiled, state, inputs, _REFERENCE_STEPS.value)
    return 2 * batch / seconds, peak_bytes(compiled)


def main(argv):
    del argv
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__}, {jax.devices()[0].platform}")
    with tempfile.TemporaryDirectory() as root:
        run = demo_run(root)
        args = [
            *run.args,
            f"--config.total_steps={_STEPS.value}",
            f"--config.log_every_steps={_LOG_EVERY.value}",
            f"--config.checkpoint_every_steps={_STEPS.value}",
        ]
        arch = next(a.split("arch=")[1].split(",")[0] for a in args if "arch=" in a)
        image_size = int(config_value(args, "data.image_size"))
        batch = int(config_value(args, "batch_size"))
        print(f"run: {run.name} ({arch}, {image_size} px, {batch} pairs, {_STEPS.value} steps)")
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        done = subprocess.run(
            [sys.executable, "-m", "micle_jax.main", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"the run failed:\n{done.stderr[-3000:]}")
        rate = event_scalars(run.workdir, "steps_per_sec")
        wait = event_scalars(run.workdir, "data_wait_fraction")
    measured = sorted(s for s in rate if s > _LOG_EVERY.value)
    if not measured:
        raise SystemExit(f"--steps={_STEPS.value} leaves no interval after the first; raise it")
    for s in measured:
        print(
            f"  steps {s - _LOG_EVERY.value + 1}-{s}: {2 * batch * rate[s]:.1f} views/s, "
            f"data_wait_fraction {wait[s]:.3f}"
        )
    views = 2 * batch * float(np.mean([rate[s] for s in measured]))
    waited = float(np.mean([wait[s] for s in measured]))
    step_views, peak = reference(arch, image_size, batch)
    print(f"end to end: {views:.1f} views/s, data_wait_fraction {waited:.3f}")
    print(f"step alone (random views on the devices): {step_views:.1f} views/s")
    print(f"step peak memory (XLA memory analysis): {peak / 2**20:.0f} MiB")
    print(f"ratio end-to-end / step alone: {views / step_views:.2f}")


if __name__ == "__main__":
    from micle_jax import process_env

    process_env.restart_with_tuned_malloc()  # the reference step as the trainer runs it
    app.run(main)
