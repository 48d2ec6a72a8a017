"""`--mode=eval`: a fine-tuning config's evals on any checkpoint, into WORKDIR/results.json.

  python -m micle_jax.main --mode=eval \
      --config=configs/finetune_derm.py:records=data/demo/ham10000 \
      --checkpoint=WORKDIR/best --workdir=/tmp/eval_only

The numbers equal those the training run wrote for the same checkpoint (same
data order, same bootstrap seeds); `with_protocol` labels the rows of both.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from micle_jax import checkpoint, evaluators, fs, report_plots, rundir, sharding
from micle_jax import task as task_lib
from micle_jax.data.stream import pipeline


def protocol_of(config: ml_collections.ConfigDict) -> str:
    """The report's protocol of a fine-tuning config: 'linear' (frozen backbone) or 'finetune'."""
    return "linear" if config.model.fine_tune_after_block == 4 else "finetune"


def with_protocol(rows: list[dict], config: ml_collections.ConfigDict) -> list[dict]:
    """results.json rows of a fine-tuning config, each with its `protocol_of`."""
    return [{**r, "protocol": protocol_of(config)} for r in rows]


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str | None
) -> dict:
    """`--mode=eval`: runs config.evals on a checkpoint; writes WORKDIR/results.json.

    The numbers equal those a training run wrote for the same checkpoint (same
    data order, same bootstrap seeds). The checkpoint's label in results.json
    is 'best' for WORKDIR/best/..., else 'final'. Nothing is overwritten: an
    existing WORKDIR/results.json is an error.

    Returns:
      {'<eval>/<metric>': value}.
    """
    if not checkpoint_path:
        raise ValueError(
            "--mode=eval needs --checkpoint: a fine-tuning workdir (its latest checkpoint), "
            f"WORKDIR/{rundir.BEST_DIR} or WORKDIR/{rundir.CHECKPOINT_DIR}/<step>"
        )
    workdir = rundir.check_workdir(workdir)
    results_file = os.path.join(workdir, rundir.RESULTS_FILE)
    if fs.exists(results_file):
        raise ValueError(
            f"{results_file} already exists; pass a new --workdir for this evaluation so "
            "nothing is overwritten"
        )
    if not config.get("evals"):
        raise ValueError("config.evals is empty: nothing to evaluate")
    mesh = sharding.make_mesh(config.mesh)
    data = pipeline.open_data(config.data, seed=config.seed)
    task = task_lib.make_task(config, data.info)
    model = task_lib.build_model(config, task)

    # --- The checkpoint: resolved, checked against the model, placed on the mesh. ---
    state_dir = checkpoint.resolve(checkpoint_path)
    step = int(state_dir.parent.name) if state_dir.parent.name.isdigit() else 0
    label = rundir.checkpoint_label(state_dir)
    loaded = checkpoint.load_variables(str(state_dir.parent))
    abstract = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            np.zeros((1, task.image_size, task.image_size, 3), np.float32),
            train=False,
        )
    )
    abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    checkpoint.check_variables(abstract, loaded, str(state_dir))
    shardings = sharding.tree_shardings(abstract, mesh, config.mesh.shard_min_size)
    variables = jax.device_put(
        jax.tree.map(lambda x, a: np.asarray(x, a.dtype), loaded, abstract), shardings
    )

    # --- Evaluate and write. ---
    evals = evaluators.build_evaluators(config, task, model, mesh)
    outputs, rows, artifacts = evaluators.run_evaluators(evals, variables, step, label)
    fs.makedirs(workdir)
    task.save(workdir)
    path = rundir.write_results(workdir, config, with_protocol(rows, config), artifacts)
    if jax.process_index() == 0:
        report_plots.write_run_plots(workdir, artifacts)
    logging.info("Evaluated %s (step %d, %s); results in %s", state_dir, step, label, path)
    return evaluators.scalars(outputs)
