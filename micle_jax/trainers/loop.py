"""The train loop both trainers run: steps, logging, checkpoints, evals, preemption."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import jax
import ml_collections
from absl import logging
from clu import metric_writers, periodic_actions

from micle_jax import checkpoint, evaluators, sharding
from micle_jax.evaluators import base
from micle_jax.trainers import harness


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    state: harness.TrainState,
    state_shardings,
    step_fn: Callable,
    batches: Iterator,
    mesh,
    manager,
    meta: dict,
    writer: metric_writers.MetricWriter,
    total_steps: int,
    evals: Mapping[str, base.Evaluator],
    evals_at_last_step: bool = True,
    on_eval: Callable | None = None,
    on_log: Callable | None = None,
) -> tuple[harness.TrainState, int, dict[str, float]]:
    """Trains from state.step to total_steps, or until a preemption.

    Every step runs `step_fn` jitted with donated state and explicit
    shardings. Measurements are averaged and checked finite before each log
    line (every config.log_every_steps) and each checkpoint (every
    config.checkpoint_every_steps, the last step, and on SIGTERM), so only
    finite states are saved. Evaluators with `every_steps` run at their steps
    (the last step too unless `evals_at_last_step` is False) and
    `on_eval(state, step, outputs)` sees their outputs; `on_log(step, summary)`
    sees every logged summary of measurements. A non-finite loss writes
    status 'failed' and raises harness.NonFiniteLoss.

    Returns:
      (state, the step reached, the last logged measurements).
    """
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
    )
    preemption = harness.Preemption(manager)
    pending, last = [], {}
    step = int(jax.device_get(state.step))
    try:
        while step < total_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = sharding.host_to_global(next(batches), mesh)
                state, measurements = train_step(state, batch)
            step += 1
            pending.append((step, measurements))
            progress(step)
            stop = preemption.should_stop(step)
            log_now = harness.run_periodically(config.log_every_steps, step, total_steps)
            save_now = stop or harness.run_periodically(
                config.checkpoint_every_steps, step, total_steps
            )
            if log_now or save_now:
                summary = harness.drain_measurements(pending, manager)
                pending = []
                if log_now:
                    writer.write_scalars(step, summary)
                    last = summary
                    if on_log is not None:
                        on_log(step, summary)
            if save_now:
                checkpoint.save(manager, step, state, {**meta, "step": step})
            due = [
                n
                for n, e in evals.items()
                if e.every_steps
                and step % e.every_steps == 0
                and (evals_at_last_step or step < total_steps)
            ]
            if due:
                variables = {"params": state.params, "batch_stats": state.batch_stats}
                outputs, _, _ = evaluators.run_evaluators(evals, variables, step, names=due)
                writer.write_scalars(step, evaluators.scalars(outputs))
                if on_eval is not None:
                    on_eval(state, step, outputs)
            if stop:
                logging.warning("Stopped at step %d by preemption; rerun to resume", step)
                break
        manager.wait_until_finished()
    except harness.NonFiniteLoss as e:
        manager.wait_until_finished()
        harness.write_status(workdir, "failed", step=step, error=str(e))
        raise
    finally:
        preemption.close()
        writer.flush()
    return state, step, last
