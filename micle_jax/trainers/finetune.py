"""Supervised fine-tuning, linear evaluation and the supervised baseline (step 3).

One readable `main()` in big_vision's order: set-up, task and data, model and
optimizer, evaluators, checkpoint restore, train loop, final evaluation.

  - Starts from a pre-training run (config.init.checkpoint: backbone plus the
    first `init_proj_layers` projection layers, SimCLR's ft_proj_selector),
    from a supervised run (backbone), or from scratch.
  - Multiclass (softmax, top-1 accuracy) or multilabel (sigmoid, mean AUC),
    from the training data's label type.
  - Full fine-tuning (model.fine_tune_after_block=-1), fine-tuning after block
    k (k = 0..3) or linear evaluation on frozen features (4).
  - config.data.label_fraction keeps a fraction of the training cases
    (micle_jax/data/stream/fractions.py); their ids go to WORKDIR/label_fraction_cases.txt.
  - config.select_best='EVAL/METRIC' keeps the checkpoint with the best value
    of that eval (the validation split) in WORKDIR/best (`BestCheckpoint`); at
    the end every eval runs on the final and the best checkpoint and
    WORKDIR/results.json gets the numbers (rundir.write_results describes the
    format).

evaluate.py is `--mode=eval`: the same evaluations on any checkpoint.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, parameter_overview

from micle_jax import checkpoint, config_lib, evaluators, fs, optim, report_plots, rundir, sharding
from micle_jax import task as task_lib
from micle_jax.data.stream import pipeline
from micle_jax.trainers import evaluate, loop, restore, train_state
from micle_jax.trainers import supervised_step as step_lib


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks what the locked ConfigDict cannot (values, not names)."""
    if config.data.mode != "supervised":
        raise ValueError(
            f"config.data.mode={config.data.mode!r}: fine-tuning reads labelled images; set "
            "config.data.mode='supervised'"
        )
    if config.batch_size <= 0:
        raise ValueError(f"config.batch_size={config.batch_size} must be > 0")
    if config.class_weight not in ("", "balanced"):
        raise ValueError(
            f"config.class_weight={config.class_weight!r}; accepted: '' (unweighted, SimCLR) or "
            "'balanced' (each class weighted by n / (classes * n_class), for imbalanced data)"
        )
    for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[name] <= 0:
            raise ValueError(f"config.{name}={config[name]} must be > 0")
    n_data = jax.device_count() // config.mesh.model
    if config.batch_size % max(n_data, 1) or config.batch_size % jax.process_count():
        raise ValueError(
            f"config.batch_size={config.batch_size} must divide evenly over the "
            f"{n_data} data-parallel devices and {jax.process_count()} processes"
        )
    if config.select_best:
        name, sep, metric = config.select_best.partition("/")
        if not sep or not metric:
            raise ValueError(
                f"config.select_best={config.select_best!r}: expected 'EVAL/METRIC', e.g. "
                "'validation/accuracy' or 'validation/auc_mean' ('' to keep no best checkpoint)"
            )
        evals = config.get("evals") or {}
        if name not in evals:
            raise ValueError(
                f"config.select_best={config.select_best!r} names eval {name!r}, which is not "
                f"in config.evals ({sorted(evals) or 'none'})"
            )
        if not evals[name].get("every_steps"):
            raise ValueError(
                f"config.select_best uses eval {name!r}, so config.evals.{name}.every_steps "
                "must be > 0 (how often to evaluate it during training)"
            )


class BestCheckpoint:
    """The checkpoint with the best value of config.select_best ('EVAL/METRIC'), in WORKDIR/best.

    `offer` is the train loop's on_eval; a checkpoint is kept when its value is
    finite and higher than the kept one's (saved with `meta` and its value, so
    a resumed run knows what to beat). Keeps nothing when select_best is ''.

    Attributes:
      step, value: those of the kept checkpoint; None and -inf before one.
    """

    def __init__(self, workdir: str, select_best: str, meta: dict):
        self._select_best = select_best
        self._eval, _, self._metric = select_best.partition("/")
        self._meta = meta
        self._manager = None
        if select_best:
            self._manager = checkpoint.make_manager(rundir.best_dir(workdir), 1, async_save=False)
        self.step = self._manager.latest_step() if self._manager is not None else None
        self.value = -np.inf
        if self.step is not None:
            saved = self._manager.restore(
                self.step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            ).meta
            self.value = float(saved.get("select_value", -np.inf))

    def offer(self, state: train_state.TrainState, step: int, outputs) -> None:
        """Keeps `state` if its selection value beats the kept one's."""
        if self._manager is None or self._eval not in outputs:
            return
        value = outputs[self._eval].get(self._metric)
        if np.isfinite(value) and value > self.value:
            self.step, self.value = step, value
            meta = {**self._meta, "step": step, "select_value": value}
            checkpoint.save(self._manager, step, state, meta)
            logging.info("New best %s=%.4f at step %d", self._select_best, value, step)

    def restore(self, abstract_state) -> train_state.TrainState:
        """The kept checkpoint's state (shardings of `abstract_state`)."""
        state, _ = checkpoint.restore(self._manager, self.step, abstract_state)
        return state

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


class FirstLoggedLoss:
    """The training loss at the first logged step, kept in the checkpoint meta.

    The number that shows whether fine-tuning from a checkpoint starts worse
    than from scratch. It lives in `meta` (the dict every later checkpoint
    saves), so a resumed run still reports it; a run resumed from a checkpoint
    that has none records none (its first log is not the run's).
    """

    def __init__(self, meta: dict, resumed_meta: dict, start_step: int):
        self._meta = meta
        self._recording = start_step == 0
        if "first_logged_loss" in resumed_meta:
            meta.update(
                first_logged_step=resumed_meta["first_logged_step"],
                first_logged_loss=resumed_meta["first_logged_loss"],
            )

    def record(self, step: int, summary: dict) -> None:
        """The train loop's on_log: keeps the loss of the first summary."""
        if self._recording and "first_logged_loss" not in self._meta:
            self._meta.update(first_logged_step=step, first_logged_loss=summary["loss"])

    def rows(self, dataset: str) -> list[dict]:
        """Its results.json row ([] without one): one number of one run, so no
        ci_low / ci_high (the report's interval for it is over seeds)."""
        if "first_logged_loss" not in self._meta:
            return []
        return [
            {
                "eval": "train",
                "metric": "first_logged_loss",
                "value": float(self._meta["first_logged_loss"]),
                "split": "train",
                "dataset": dataset,
                "step": int(self._meta["first_logged_step"]),
                "checkpoint": "final",
            }
        ]


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tunes and evaluates; returns {'<eval>/<metric>': value} of the final checkpoint."""
    # --- Set-up: everything is validated before anything is written. ---
    check_config(config)
    workdir = rundir.check_workdir(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)

    # --- Task and input pipeline. ---
    data = pipeline.open_data(config.data, seed=config.seed)
    task = task_lib.make_task(config, data.info)
    kept_cases = data.label_fraction_cases()
    num_examples = data.num_examples("supervised")
    if num_examples <= 0:
        raise ValueError(f"{config.data.source} split {config.data.split!r} has no labelled image")
    total_steps = config_lib.get_steps("total", config, num_examples, config.batch_size)
    warmup_steps = config_lib.get_steps("warmup", config, num_examples, config.batch_size, 0)
    class_weights = _class_weights(config, data, task)

    # --- Model, then its evaluators: built (and so checked) before anything is written. ---
    model = task_lib.build_model(config, task)
    evals = evaluators.build_evaluators(config, task, model, mesh)

    # --- Optimizer and state (frozen stages and unused projection layers masked). ---
    schedule = optim.make_schedule(config.optim, total_steps, warmup_steps, config.batch_size)
    tx = step_lib.make_optimizer(config, model, task.image_size, schedule)
    state, state_shardings, abstract_state = train_state.create_state(
        model, tx, mesh, task.image_size, config.seed, config.mesh.shard_min_size
    )
    if config.zero_init_head:
        state = state.replace(params=step_lib.zero_head(state.params))

    # --- Checkpoints: resume, else init weights, else scratch. ---
    fs.makedirs(workdir)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    meta = {"global_batch_size": config.batch_size, "seed": config.seed, "trainer": "finetune"}
    best = BestCheckpoint(workdir, config.select_best, meta)
    state, resumed_meta = restore.restore_or_init(
        state,
        abstract_state,
        state_shardings,
        manager,
        meta,
        config.init.checkpoint,
        restore.weight_prefixes(config.init),
    )
    start_step = int(jax.device_get(state.step))
    normalize = config.init.normalize_head_input and not config.init.get("init_head", False)
    if start_step == 0 and config.init.checkpoint and normalize:
        state = _rescale_head_input(state, state_shardings, config.model.head_input)
    first_loss = FirstLoggedLoss(meta, resumed_meta, start_step)

    # --- Logging (process 0 writes). ---
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    rundir.write_config(workdir, config)
    if is_main:
        task.save(workdir)
        if kept_cases is not None:
            rundir.write_cases(workdir, kept_cases)
    if start_step == 0:
        parameter_overview.log_parameter_overview(state.params)
    logging.info(
        "Fine-tuning (%s, %d classes): %d images/epoch%s, global batch %d, steps %d..%d "
        "(warm-up %d), fine_tune_after_block %d, head on hiddens[%d]",
        task.label_type,
        task.num_classes,
        num_examples,
        "" if kept_cases is None else f" ({len(kept_cases)} cases kept)",
        config.batch_size,
        start_step,
        total_steps,
        warmup_steps,
        config.model.fine_tune_after_block,
        config.model.head_input,
    )
    rundir.write_status(workdir, "running", step=start_step, total_steps=total_steps)

    # --- Train loop (the last step's evals are the final evaluation below). ---
    run = loop.Run(config, workdir, mesh, manager, meta, writer, state_shardings, total_steps)
    state, step, last = loop.train(
        run,
        state,
        step_lib.make_train_step(model, tx, schedule, task.label_type, class_weights),
        data.dataset("supervised", config.batch_size, start_step=start_step).as_numpy_iterator(),
        evals=evals,
        final_evaluation_follows=True,
        on_log=first_loss.record,
        on_eval=best.offer,
    )
    if step < total_steps:
        rundir.write_status(workdir, "preempted", step=step, total_steps=total_steps)
        manager.close()
        return {}

    # --- Final evaluation: the final checkpoint, then the best one. ---
    try:
        outputs, rows, artifacts = _final_evaluation(
            evals, state, step, best, abstract_state, writer
        )
    except Exception as e:
        rundir.write_status(workdir, "failed", step=step, error=f"final evaluation: {e}")
        raise
    rows += first_loss.rows(task.dataset)
    rows = evaluate.with_protocol(rows, config)
    results_path = rundir.write_results(workdir, config, rows, artifacts)
    if is_main:
        report_plots.write_run_plots(workdir, artifacts)
    rundir.write_status(
        workdir,
        "finished",
        step=step,
        total_steps=total_steps,
        measurements=last,
        best_step=best.step,
        results=results_path,
    )
    writer.flush()
    manager.close()
    best.close()
    if is_main:
        logging.info("Done at step %d; results in %s", step, results_path)
    return evaluators.scalars(outputs)


def _class_weights(config, data: pipeline.Data, task) -> np.ndarray | None:
    """config.class_weight='balanced': weights from the kept training images per class."""
    if config.class_weight != "balanced":
        return None
    counts = data.class_counts()
    class_weights = step_lib.balanced_class_weights(counts)
    logging.info(
        "Class-balanced loss: %s",
        ", ".join(
            f"{c}: {n} images x {w:.3g}"
            for c, n, w in zip(task.class_names, counts, class_weights, strict=True)
        ),
    )
    return class_weights


def _rescale_head_input(state, state_shardings, head_input: int):
    """The init checkpoint's head input at unit BatchNorm scale (restore.normalize_head_input)."""
    host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    host, factor = restore.normalize_head_input(host, head_input)
    state = jax.device_put(
        state.replace(params=host["params"], batch_stats=host["batch_stats"]),
        state_shardings,
    )
    logging.info(
        "Head input (projection layer %d) rescaled by %.4g to unit BatchNorm scale "
        "(config.init.normalize_head_input)",
        head_input,
        factor,
    )
    return state


def _final_evaluation(evals, state, step: int, best: BestCheckpoint, abstract_state, writer):
    """Every eval on the final checkpoint, offered to `best`, then on the best checkpoint.

    Returns:
      (the final checkpoint's outputs, results rows of both, their artifacts).
    """
    outputs, rows, artifacts = evaluators.run_evaluators(evals, _variables(state), step, "final")
    writer.write_scalars(step, evaluators.scalars(outputs, "final/"))
    best.offer(state, step, outputs)
    if best.step is None:
        return outputs, rows, artifacts
    if best.step == step:  # the final checkpoint is the best: same numbers
        best_rows = [{**r, "checkpoint": "best"} for r in rows]
        best_artifacts = {k[: -len("final")] + "best": v for k, v in artifacts.items()}
    else:
        best_variables = _variables(best.restore(abstract_state))
        _, best_rows, best_artifacts = evaluators.run_evaluators(
            evals, best_variables, best.step, "best"
        )
    writer.write_scalars(best.step, evaluators.row_scalars(best_rows, "best/"))
    return outputs, rows + best_rows, {**artifacts, **best_artifacts}


def _variables(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}
