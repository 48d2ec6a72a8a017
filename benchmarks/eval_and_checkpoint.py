r"""Two fixed costs of every run: the evaluation bootstrap and the first checkpoint save.

  python benchmarks/eval_and_checkpoint.py [--samples=1000] [--repeats=3]

Evaluation: `metric_set.evaluate` of a fine-tuning test eval's metrics
(classification, calibration before/after temperature, operating points for
the 4 default targets) on a HAM10000-sized test split (1,603 images of 1,177
lesions, 7 classes), `--samples` case-bootstrap resamples, for the whole
population alone and with 28 subgroups (sex, age band, site, dx_type). Every
metric set computes a batch of resamples at once ([S, n] weights -> [S, k]).
The reference, timed in the same run on the same predictions, is the same
evaluation with every metric set called on one resample ([1, n]) at a time:
the Python loop over resamples that evaluators/ ran before the batching. Both
give the same values (checked to rtol 1e-9).

Checkpoint: the first Orbax save of the tiny test network's 196 arrays,
replicated on 8 CPU devices, with Orbax's default replica-parallel saving
(the reference) and as micle_jax.checkpoint saves in one process (without it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from micle_jax.evaluators import (  # noqa: E402
    bootstrap,
    calibration,
    classification,
    metric_set,
    operating_points,
)
from micle_jax.evaluators.outputs import Predictions  # noqa: E402
from micle_jax.evaluators.subgroups import Group  # noqa: E402

flags.DEFINE_integer("samples", bootstrap.DEFAULT_SAMPLES, "case-bootstrap resamples per eval")
flags.DEFINE_integer("repeats", 3, "alternating timings of each; the best is reported")
FLAGS = flags.FLAGS


def _problem(seed: int = 0):
    """HAM10000-test-sized predictions, subgroups and the clinical metric sets."""
    rng = np.random.default_rng(seed)
    n, num_classes = 1603, 7
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)).astype(np.float32) + 2 * np.eye(num_classes)[labels]
    cases = np.array([f"lesion{int(i / 1.362)}" for i in range(n)], dtype=object)
    ids = np.array([str(i) for i in range(n)], dtype=object)
    pred = Predictions(logits, labels, np.ones(n), cases, ids, "multiclass")
    groups = []
    for column, values in (("sex", 3), ("age", 6), ("localization", 15), ("dx_type", 4)):
        value = rng.integers(0, values, n)
        for v in range(values):
            index = np.flatnonzero(value == v)
            groups.append(Group(column, str(v), index, len(set(cases[index])), len(index)))
    names = [f"class{c}" for c in range(num_classes)]
    temperature = calibration.fit_temperatures(pred)
    targets = [(kind, t) for kind, ts in operating_points.DEFAULT_TARGETS.items() for t in ts]
    thresholds = operating_points.fit_thresholds(pred, targets, list(range(num_classes)))
    sets = [
        functools.partial(classification.classification_set, class_names=names),
        functools.partial(
            calibration.metric_set, class_names=names, bins=15, temperature=temperature
        ),
        functools.partial(
            operating_points.metric_set,
            class_names=names,
            thresholds=thresholds,
            fit_on="validation",
        ),
    ]
    return pred, groups, lambda p: metric_set.join([s(p) for s in sets])


def _one_resample_at_a_time(make_set):
    """The reference: make_set's metrics with compute called on one row [1, n] per call."""

    def make(pred: Predictions) -> metric_set.MetricSet:
        batched = make_set(pred)

        def rows(w: np.ndarray) -> np.ndarray:
            return np.concatenate([batched.compute(w[i : i + 1]) for i in range(len(w))])

        return dataclasses.replace(batched, compute=rows)

    return make


def _time_eval(samples: int, with_groups: bool, reference: bool) -> tuple[float, list]:
    pred, groups, make_set = _problem()
    if reference:
        make_set = _one_resample_at_a_time(make_set)
    groups = groups if with_groups else []
    start = time.perf_counter()
    out = metric_set.evaluate(pred, make_set, samples, 0, groups, 10)
    return time.perf_counter() - start, out


def _same(a: list, b: list) -> bool:
    """Whether two evaluations give the same rows, values and intervals (rtol 1e-9)."""
    return len(a) == len(b) and all(
        (x.name, x.tags) == (y.name, y.tags)
        and np.allclose(
            [x.value, x.ci_low, x.ci_high],
            [y.value, y.ci_low, y.ci_high],
            rtol=1e-9,
            atol=0,
            equal_nan=True,
        )
        for x, y in zip(a, b, strict=True)
    )


def _time_first_save(replica_parallel: bool) -> float:
    """A fresh process's first save: run in a subprocess so that nothing is compiled yet."""
    code = f"""
import os, time, tempfile
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from micle_jax import checkpoint
mesh = Mesh(np.array(jax.devices()), ('data',))
replicated = NamedSharding(mesh, PartitionSpec())
shapes = [(3, 3, 16 * (i % 8 + 1), 16) if i % 3 == 0 else (16 * (i % 8 + 1),) for i in range(196)]
tree = {{f'a{{i}}': jax.device_put(jnp.full(s, float(i)), replicated)
        for i, s in enumerate(shapes)}}
jax.block_until_ready(tree)
manager = checkpoint.make_manager(tempfile.mkdtemp(), keep=2, async_save=False)
if {replica_parallel}:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(), override=True)
start = time.perf_counter()
checkpoint.save(manager, 1, tree, {{}})
manager.wait_until_finished()
print('SECONDS', time.perf_counter() - start)
"""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    return float(out.split("SECONDS")[-1])


def main(argv):
    del argv
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__}, {jax.devices()[0].platform}")
    for with_groups, label in ((False, "population only"), (True, "population + 28 subgroups")):
        new_t, ref_t, new_out, ref_out = [], [], None, None
        for _ in range(FLAGS.repeats):  # alternating, so that load drifts hit both
            t, ref_out = _time_eval(FLAGS.samples, with_groups, reference=True)
            ref_t.append(t)
            t, new_out = _time_eval(FLAGS.samples, with_groups, reference=False)
            new_t.append(t)
        print(
            f"evaluation, {FLAGS.samples} resamples, {label}: one resample at a time "
            f"{min(ref_t):.2f} s, batched {min(new_t):.2f} s, ratio {min(ref_t) / min(new_t):.1f} "
            f"({len(new_out)} metrics, same values: {_same(new_out, ref_out)})"
        )
    ref_s = [_time_first_save(True) for _ in range(FLAGS.repeats)]
    new_s = [_time_first_save(False) for _ in range(FLAGS.repeats)]
    print(
        f"first checkpoint save, 196 arrays on 8 devices: replica-parallel {min(ref_s):.2f} s, "
        f"micle_jax {min(new_s):.2f} s, ratio {min(ref_s) / min(new_s):.2f}"
    )


if __name__ == "__main__":
    app.run(main)
