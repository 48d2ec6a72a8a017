"""SimCLR / MICLe contrastive pre-training (steps 1 and 2 of the recipe).

One readable `main()` in big_vision's order: set-up, mesh, input pipeline,
model and optimizer, checkpoint restore, train loop. The update step is a
pure jitted function on the GLOBAL batch: NT-Xent sees every negative of every
replica and BatchNorm statistics are global (SimCLR's global_bn), because XLA
inserts the collectives for the sharded batch.
"""

from __future__ import annotations

import json

import jax
import ml_collections
from absl import logging
from clu import metric_writers, parameter_overview

from micle_jax import checkpoint, config_lib, evaluators, fs, optim, rundir, sharding
from micle_jax.data.stream import pipeline
from micle_jax.trainers import contrastive_step, loop, restore, train_state

MODES = ("simclr", "micle")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks what the locked ConfigDict cannot (values, not names)."""
    if config.data.mode not in MODES:
        raise ValueError(f"config.data.mode={config.data.mode!r}; accepted: {', '.join(MODES)}")
    if config.batch_size <= 0:
        raise ValueError(f"config.batch_size={config.batch_size} must be > 0")
    if config.loss.temperature <= 0:
        raise ValueError(f"config.loss.temperature={config.loss.temperature} must be > 0")
    for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[name] <= 0:
            raise ValueError(f"config.{name}={config[name]} must be > 0")
    n_data = jax.device_count() // config.mesh.model
    if config.batch_size % max(n_data, 1) or config.batch_size % jax.process_count():
        raise ValueError(
            f"config.batch_size={config.batch_size} must divide evenly over the "
            f"{n_data} data-parallel devices and {jax.process_count()} processes"
        )


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pre-trains with SimCLR or MICLe; returns the last logged measurements."""
    # --- Set-up: everything is validated before anything is written. ---
    check_config(config)
    workdir = rundir.check_workdir(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)

    # --- Input pipeline (sizes first; the dataset is built at the resumed step). ---
    data = pipeline.open_data(config.data, seed=config.seed)
    info = data.info
    # An epoch is as many pairs as data.epoch_unit says ('images' by default, in
    # both modes), not one pass of the micle stream over its cases.
    num_pairs = data.pairs_per_epoch()
    total_steps = config_lib.get_steps("total", config, num_pairs, config.batch_size)
    warmup_steps = config_lib.get_steps("warmup", config, num_pairs, config.batch_size, 0)

    # --- Model and optimizer. ---
    model, probe = contrastive_step.build_model(config, info)
    schedule = optim.make_schedule(config.optim, total_steps, warmup_steps, config.batch_size)
    tx = optim.make_optimizer(config.optim, schedule)
    state, state_shardings, abstract_state = train_state.create_state(
        model, tx, mesh, config.data.image_size, config.seed, config.mesh.shard_min_size
    )

    # --- Monitoring evals on frozen features (config.evals: 'knn', 'linear_probe'). ---
    evals = evaluators.build_evaluators(config, None, model, mesh) if config.get("evals") else {}

    # --- Checkpoints: resume, else init weights, else scratch. ---
    fs.makedirs(workdir)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    meta = {"global_batch_size": config.batch_size, "seed": config.seed, "trainer": "pretrain"}
    state, _ = restore.restore_or_init(
        state,
        abstract_state,
        state_shardings,
        manager,
        meta,
        config.init.checkpoint,
        restore.weight_prefixes(config.init),
    )
    start_step = int(jax.device_get(state.step))

    # --- Logging (process 0 writes). ---
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    rundir.write_config(workdir, config)
    if start_step == 0:
        parameter_overview.log_parameter_overview(state.params)
        writer.write_hparams(
            {k: v for k, v in _flat(config).items() if isinstance(v, int | float | str | bool)}
        )
    logging.info(
        "%s pre-training: %d pairs/epoch (epoch_unit=%s), global batch %d, steps %d..%d "
        "(warm-up %d), %d devices in %d processes, linear probe %s",
        config.data.mode,
        num_pairs,
        config.data.epoch_unit,
        config.batch_size,
        start_step,
        total_steps,
        warmup_steps,
        jax.device_count(),
        jax.process_count(),
        probe,
    )
    rundir.write_status(workdir, "running", step=start_step, total_steps=total_steps)

    # --- Input pipeline at the resumed step, then the train loop. ---
    dataset = data.dataset(config.data.mode, config.batch_size, start_step=start_step)
    run = loop.Run(config, workdir, mesh, manager, meta, writer, state_shardings, total_steps)
    state, step, last = loop.train(
        run,
        state,
        contrastive_step.make_train_step(model, tx, schedule, config.loss.temperature, probe),
        dataset.as_numpy_iterator(),
        evals=evals,
    )
    status = "finished" if step >= total_steps else "preempted"
    rundir.write_status(workdir, status, step=step, total_steps=total_steps, measurements=last)
    if is_main:
        logging.info("Done: %s at step %d. Checkpoints: %s", status, step, manager.directory)
    manager.close()
    return {k: float(v) for k, v in last.items()}


def _flat(config: ml_collections.ConfigDict) -> dict:
    """Flattens a config into {'a.b': value} for the hparams summary."""
    return _flat_dict(json.loads(config.to_json_best_effort()))


def _flat_dict(d: dict) -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flat_dict(value).items()})
        else:
            out[key] = value
    return out
