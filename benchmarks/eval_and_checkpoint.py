r"""Two fixed costs of every run: the evaluation bootstrap and the first checkpoint save.

  python benchmarks/eval_and_checkpoint.py [--samples=100] [--repeats=3]

Evaluation: `metric_set.evaluate` of a fine-tuning test eval's metrics
(classification, calibration before/after temperature, operating points) on a
HAM10000-sized test split (1,603 images of 1,177 lesions, 7 classes) with 28
subgroups (sex, age band, site, dx_type), `--samples` case-bootstrap
resamples. The reference, timed in the same run on the same predictions, is
the same evaluation with the AUC and the adaptive-ECE edges computed from
scratch for every resample (a sort per class per resample and group, and
np.percentile of the repeated scores): what evaluators/ did before
metrics.WeightedAuc and calibration.EqualMassEdges. Both give the same values.

Checkpoint: the first Orbax save of the tiny test network's 196 arrays,
replicated on 8 CPU devices, with Orbax's default replica-parallel saving
(the reference) and as micle_jax.checkpoint saves in one process (without it).
"""

from __future__ import annotations

import contextlib
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
    calibration,
    classification,
    metric_set,
    metrics,
    operating_points,
)
from micle_jax.evaluators.outputs import Predictions  # noqa: E402
from micle_jax.evaluators.subgroups import Group  # noqa: E402

flags.DEFINE_integer("samples", 100, "case-bootstrap resamples per evaluation")
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
    targets = [("specificity", 0.9), ("sensitivity", 0.9)]
    thresholds = operating_points.fit_thresholds(pred, targets, list(range(num_classes)))
    sets = [
        functools.partial(classification.classification_set, class_names=names, topk=()),
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


class _SortEveryCall:
    """The reference: WeightedAuc and EqualMassEdges redone from scratch at every call."""

    def __init__(self, cls, *args):
        self.cls, self.args = cls, args

    def __call__(self, weights=None):
        return self.cls(*self.args)(weights)

    def edges(self, weights):
        return self.cls(*self.args).edges(weights)


@contextlib.contextmanager
def _reference_metrics():
    auc, edges = metrics.WeightedAuc, calibration.EqualMassEdges
    metrics.WeightedAuc = lambda *a: _SortEveryCall(auc, *a)
    calibration.EqualMassEdges = lambda *a: _SortEveryCall(edges, *a)
    try:
        yield
    finally:
        metrics.WeightedAuc, calibration.EqualMassEdges = auc, edges


def _time_eval(samples: int, reference: bool) -> tuple[float, list]:
    pred, groups, make_set = _problem()
    with _reference_metrics() if reference else contextlib.nullcontext():
        start = time.perf_counter()
        out = metric_set.evaluate(pred, make_set, samples, 0, groups, 10)
        return time.perf_counter() - start, out


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
    new_t, ref_t, new_out, ref_out = [], [], None, None
    for _ in range(FLAGS.repeats):  # alternating, so that load drifts hit both
        t, ref_out = _time_eval(FLAGS.samples, reference=True)
        ref_t.append(t)
        t, new_out = _time_eval(FLAGS.samples, reference=False)
        new_t.append(t)
    same = all(
        np.allclose([a.value, a.ci_low, a.ci_high], [b.value, b.ci_low, b.ci_high], equal_nan=True)
        for a, b in zip(new_out, ref_out, strict=True)
    )
    print(
        f"evaluation, {FLAGS.samples} resamples x 29 populations: reference "
        f"{min(ref_t):.2f} s, micle_jax {min(new_t):.2f} s, ratio reference/micle_jax "
        f"{min(ref_t) / min(new_t):.2f} ({len(new_out)} metrics, same values: {same})"
    )
    ref_s = [_time_first_save(True) for _ in range(FLAGS.repeats)]
    new_s = [_time_first_save(False) for _ in range(FLAGS.repeats)]
    print(
        f"first checkpoint save, 196 arrays on 8 devices: replica-parallel {min(ref_s):.2f} s, "
        f"micle_jax {min(new_s):.2f} s, ratio {min(ref_s) / min(new_s):.2f}"
    )


if __name__ == "__main__":
    app.run(main)
