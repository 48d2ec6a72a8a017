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
    (micle_jax/data/fractions.py); their ids go to WORKDIR/label_fraction_cases.txt.
  - config.select_best='EVAL/METRIC' keeps the checkpoint with the best value
    of that eval (the validation split) in WORKDIR/best; at the end every eval
    runs on the final and the best checkpoint and WORKDIR/results.json gets
    the numbers (evaluators/base.py describes the format).

`evaluate_checkpoint` is `--mode=eval`: the same evaluations on any checkpoint.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, parameter_overview

from micle_jax import checkpoint, config_lib, evaluators, optim, sharding
from micle_jax.data import fractions, pipeline
from micle_jax.evaluators import base
from micle_jax.trainers import harness, loop
from micle_jax.trainers import supervised_step as step_lib

BEST_DIR = "best"
CHECKPOINT_LABELS = ("final", "best")


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
    n_data = jax.device_count() // config.mesh.get("model", 1)
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


def normalize_head_input(variables: dict, head_input: int) -> tuple[dict, float]:
    """Rescales the BatchNorm of projection layer `head_input` to unit RMS scale.

    Why: pre-training leaves the scale of a projection layer arbitrary. Its
    output goes through ReLU (positively homogeneous) into a bias-free Dense
    and the next BatchNorm (or, for the last layer, the L2 normalisation of
    NT-Xent), so multiplying its BatchNorm scale and offset by c > 0 changes
    neither the contrastive loss nor any gradient direction, only the size of
    the layer's output. LARS excludes BatchNorm from its trust ratio (SimCLR),
    so those parameters take raw steps at the peak learning rate and drift
    to large norms (in a 60-step demo run the BatchNorm norm grew 4.5x). The
    fine-tuning head reads this layer (SimCLR's ft_proj_selector), and its
    effective learning rate grows with the squared norm of its input: a
    zero-initialised head on an inflated layer overshoots (training loss
    3.7-3.9 at the first log, 0.69 from scratch). Fixing the free scale at its
    initial value (RMS of the BatchNorm scale = 1, as BatchNorm is
    initialised) makes fine-tuning from any pre-trained run start like one
    from scratch, and leaves the pre-trained function unchanged up to that
    scale: the next layer's running mean and variance are rescaled with it.

    Args:
      variables: {'params', 'batch_stats'} host trees after the init checkpoint
        was merged in.
      head_input: the layer the head reads (0 = backbone features: untouched).

    Returns:
      (variables, c): the rescaled variables and the factor applied (1.0 when
      there is nothing to rescale).
    """
    if head_input < 1:
        return variables, 1.0
    params = variables["params"].get("projection_head", {})
    bn = params.get(f"bn{head_input}")
    if bn is None or "scale" not in bn:
        return variables, 1.0
    rms = float(np.sqrt(np.mean(np.square(np.asarray(bn["scale"], np.float64)))))
    if not np.isfinite(rms) or rms <= 0:
        return variables, 1.0
    c = 1.0 / rms
    new_bn = {k: np.asarray(v) * c for k, v in bn.items()}
    projection = {**params, f"bn{head_input}": new_bn}
    new_params = {**variables["params"], "projection_head": projection}
    stats = variables.get("batch_stats", {})
    head_stats = stats.get("projection_head", {})
    following = head_stats.get(f"bn{head_input + 1}")
    if following is not None:
        # The next BatchNorm sees inputs c times larger: its running moments follow.
        following = {
            "mean": np.asarray(following["mean"]) * c,
            "var": np.asarray(following["var"]) * c * c,
        }
        stats = {**stats, "projection_head": {**head_stats, f"bn{head_input + 1}": following}}
    return {**variables, "params": new_params, "batch_stats": stats}, c


def protocol_of(config: ml_collections.ConfigDict) -> str:
    """The report's protocol of a fine-tuning config: 'linear' (frozen backbone) or 'finetune'."""
    return "linear" if config.model.fine_tune_after_block == 4 else "finetune"


def first_logged_loss_row(first_log: dict, task) -> dict:
    """The results.json row of the training loss at the first logged step.

    One number of one run: it has no ci_low / ci_high (the report's interval
    for it is over seeds).
    """
    return {
        "eval": "train",
        "metric": "first_logged_loss",
        "value": float(first_log["loss"]),
        "split": "train",
        "dataset": task.dataset,
        "step": int(first_log["step"]),
        "checkpoint": "final",
    }


def _best_value(manager) -> tuple[int | None, float]:
    """(step, selection value) of the kept best checkpoint, or (None, -inf)."""
    step = manager.latest_step() if manager is not None else None
    if step is None:
        return None, -np.inf
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return step, float(meta.get("select_value", -np.inf))


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tunes and evaluates; returns {'<eval>/<metric>': value} of the final checkpoint."""
    # --- Set-up: everything is validated before anything is written. ---
    check_config(config)
    workdir = harness.check_workdir(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)

    # --- Task and input pipeline. ---
    info = pipeline.get_info(config.data)
    task = step_lib.make_task(config, info)
    kept_cases = pipeline.label_fraction_cases(config.data, seed=config.seed)
    num_examples = pipeline.num_examples(config.data, "supervised", seed=config.seed)
    if num_examples <= 0:
        raise ValueError(f"{config.data.source} split {config.data.split!r} has no labelled image")
    total_steps = config_lib.get_steps("total", config, num_examples, config.batch_size)
    warmup_steps = config_lib.get_steps("warmup", config, num_examples, config.batch_size, 0)

    class_weights = None
    if config.class_weight == "balanced":
        counts = pipeline.class_counts(config.data, seed=config.seed)
        class_weights = step_lib.balanced_class_weights(counts)
        logging.info(
            "Class-balanced loss: %s",
            ", ".join(
                f"{c}: {n} images x {w:.3g}"
                for c, n, w in zip(task.class_names, counts, class_weights, strict=True)
            ),
        )

    # --- Model, then its evaluators: built (and so checked) before anything is written. ---
    model = step_lib.build_model(config, task)
    evals = evaluators.build_evaluators(config, task, model, mesh)
    select_eval, _, select_metric = config.select_best.partition("/")

    # --- Optimizer and state (frozen stages and unused projection layers masked). ---
    schedule = optim.make_schedule(config.optim, total_steps, warmup_steps, config.batch_size)
    abstract_params = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            np.zeros((1, task.image_size, task.image_size, 3), np.float32),
            train=False,
        )["params"]
    )
    mask = step_lib.trainable_mask(
        abstract_params, config.model.fine_tune_after_block, config.model.head_input
    )
    tx = optim.make_optimizer(config.optim, schedule, trainable_mask=mask)
    state, state_shardings, abstract_state = harness.create_state(
        model, tx, mesh, task.image_size, config.seed, config.mesh.shard_min_size
    )
    if config.zero_init_head:
        state = state.replace(params=step_lib.zero_head(state.params))

    # --- Checkpoints: resume, else init weights, else scratch. ---
    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    best_manager = None
    if config.select_best:
        best_dir = os.path.join(workdir, BEST_DIR)
        best_manager = checkpoint.make_manager(best_dir, 1, async_save=False)
    meta = {"global_batch_size": config.batch_size, "seed": config.seed, "trainer": "finetune"}
    state = harness.restore_or_init(
        state,
        abstract_state,
        state_shardings,
        manager,
        meta,
        config.init.checkpoint,
        harness.weight_prefixes(config.init),
    )
    start_step = int(jax.device_get(state.step))
    if start_step == 0 and config.init.checkpoint and config.init.normalize_head_input:
        host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        host, factor = normalize_head_input(host, config.model.head_input)
        state = jax.device_put(
            state.replace(params=host["params"], batch_stats=host["batch_stats"]),
            state_shardings,
        )
        logging.info(
            "Head input (projection layer %d) rescaled by %.4g to unit BatchNorm scale "
            "(config.init.normalize_head_input)",
            config.model.head_input,
            factor,
        )
    best_step, best_value = _best_value(best_manager)

    # --- Logging (process 0 writes). ---
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
        task.save(workdir)
        if kept_cases is not None:
            fractions.write_cases(workdir, kept_cases)
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
    harness.write_status(workdir, "running", step=start_step, total_steps=total_steps)

    dataset = pipeline.make_dataset(
        config.data,
        mode="supervised",
        global_batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
    )

    def variables_of(s):
        return {"params": s.params, "batch_stats": s.batch_stats}

    def keep_if_best(s, at_step: int, outputs) -> None:
        nonlocal best_step, best_value
        if best_manager is None or select_eval not in outputs:
            return
        value = outputs[select_eval].get(select_metric)
        if np.isfinite(value) and value > best_value:
            best_step, best_value = at_step, value
            checkpoint.save(
                best_manager, at_step, s, {**meta, "step": at_step, "select_value": value}
            )
            logging.info("New best %s=%.4f at step %d", config.select_best, value, at_step)

    first_log: dict[str, float] = {}
    if start_step > 0:
        saved = manager.restore(
            start_step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
        if "first_logged_loss" in saved:
            first_log.update(step=saved["first_logged_step"], loss=saved["first_logged_loss"])
            meta.update(
                first_logged_step=saved["first_logged_step"],
                first_logged_loss=saved["first_logged_loss"],
            )

    def remember_first_log(at_step: int, summary: dict) -> None:
        # The training loss at the first logged step: the number that shows
        # whether fine-tuning from a checkpoint starts worse than from scratch.
        if not first_log and start_step == 0:
            first_log.update(step=at_step, loss=summary["loss"])
            # Kept in every later checkpoint's meta, so a resumed run still reports it.
            meta.update(first_logged_step=at_step, first_logged_loss=summary["loss"])

    # --- Train loop (the last step's evals are the final evaluation below). ---
    state, step, last = loop.train(
        config,
        workdir,
        state,
        state_shardings,
        step_lib.make_train_step(model, tx, schedule, task.label_type, class_weights),
        dataset.as_numpy_iterator(),
        mesh,
        manager,
        meta,
        writer,
        total_steps,
        evals,
        evals_at_last_step=False,
        on_eval=keep_if_best,
        on_log=remember_first_log,
    )
    if step < total_steps:
        harness.write_status(workdir, "preempted", step=step, total_steps=total_steps)
        manager.close()
        return {}

    # --- Final evaluation: the final checkpoint, then the best one. ---
    try:
        outputs, rows, artifacts = evaluators.run_evaluators(
            evals, variables_of(state), step, "final"
        )
        writer.write_scalars(step, evaluators.scalars(outputs, "final/"))
        keep_if_best(state, step, outputs)
        if best_step is not None:
            if best_step == step:  # the final checkpoint is the best: same numbers
                best_rows = [{**r, "checkpoint": "best"} for r in rows]
                best_artifacts = {k[: -len("final")] + "best": v for k, v in artifacts.items()}
            else:
                best_state, _ = checkpoint.restore(best_manager, best_step, abstract_state)
                _, best_rows, best_artifacts = evaluators.run_evaluators(
                    evals, variables_of(best_state), best_step, "best"
                )
            rows += best_rows
            artifacts.update(best_artifacts)
            writer.write_scalars(
                best_step, {f"best/{r['eval']}/{r['metric']}": r["value"] for r in best_rows}
            )
    except Exception as e:
        harness.write_status(workdir, "failed", step=step, error=f"final evaluation: {e}")
        raise
    if first_log:
        rows.append(first_logged_loss_row(first_log, task))
    rows = [{**r, "protocol": protocol_of(config)} for r in rows]
    results_path = base.write_results(workdir, config, rows, artifacts)
    final = evaluators.scalars(outputs)
    harness.write_status(
        workdir,
        "finished",
        step=step,
        total_steps=total_steps,
        measurements=last,
        best_step=best_step,
        results=results_path,
    )
    writer.flush()
    manager.close()
    if best_manager is not None:
        best_manager.close()
    if is_main:
        logging.info("Done at step %d; results in %s", step, results_path)
    return final


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
            f"WORKDIR/{BEST_DIR} or WORKDIR/checkpoints/<step>"
        )
    workdir = harness.check_workdir(workdir)
    results_file = os.path.join(workdir, "results.json")
    if os.path.exists(results_file):
        raise ValueError(
            f"{results_file} already exists; pass a new --workdir for this evaluation so "
            "nothing is overwritten"
        )
    if not config.get("evals"):
        raise ValueError("config.evals is empty: nothing to evaluate")
    mesh = sharding.make_mesh(config.mesh)
    task = step_lib.make_task(config, pipeline.get_info(config.data))
    model = step_lib.build_model(config, task)

    # --- The checkpoint: resolved, checked against the model, placed on the mesh. ---
    state_dir = checkpoint.resolve(checkpoint_path)
    step = int(state_dir.parent.name) if state_dir.parent.name.isdigit() else 0
    label = "best" if state_dir.parent.parent.parent.name == BEST_DIR else "final"
    loaded = checkpoint.load_variables(str(state_dir.parent))
    abstract = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            np.zeros((1, task.image_size, task.image_size, 3), np.float32),
            train=False,
        )
    )
    abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    step_lib.check_variables(abstract, loaded, str(state_dir))
    shardings = sharding.tree_shardings(abstract, mesh, config.mesh.shard_min_size)
    variables = jax.device_put(
        jax.tree.map(lambda x, a: np.asarray(x, a.dtype), loaded, abstract), shardings
    )

    # --- Evaluate and write. ---
    evals = evaluators.build_evaluators(config, task, model, mesh)
    outputs, rows, artifacts = evaluators.run_evaluators(evals, variables, step, label)
    os.makedirs(workdir, exist_ok=True)
    task.save(workdir)
    rows = [{**r, "protocol": protocol_of(config)} for r in rows]
    path = base.write_results(workdir, config, rows, artifacts)
    logging.info("Evaluated %s (step %d, %s); results in %s", state_dir, step, label, path)
    return evaluators.scalars(outputs)
