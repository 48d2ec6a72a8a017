"""The train loop both trainers run: steps, logging, checkpoints, evals, preemption.

  run = loop.Run(config, workdir, mesh, manager, meta, writer, state_shardings, total_steps)
  state, step, last = loop.train(run, state, step_fn, batches, evals=evals)

`Run` holds what does not change during a run; `train` takes the state and
what changes with the trainer. Measurements are checked finite before every
log line and every checkpoint (`drain_measurements`), so only finite states
are ever saved; a non-finite loss stops the run with `NonFiniteLoss`.

Every log line also has `data_wait_fraction` (`InputWait`): the share of the
training time since the last line that the loop spent waiting for the input
pipeline's next batch. Near 0 the steps are the bottleneck; near 1 the input
pipeline is, and more input threads, `cache_decoded` or smaller stored
images (convert --resize_longer_side) will speed training up.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.sharding import Mesh

from micle_jax import checkpoint, evaluators, rundir, sharding
from micle_jax.evaluators import base
from micle_jax.models import conv
from micle_jax.trainers.preemption import Preemption
from micle_jax.trainers.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class Run:
    """What does not change during a run, for the loop.

    Attributes:
      config: the run's config (log_every_steps, checkpoint_every_steps).
      workdir: the run directory (its status file on failure).
      mesh: the device mesh of the batches and the state.
      manager: the workdir's CheckpointManager.
      meta: saved with every checkpoint (plus its 'step'); the dict may gain
        entries during the run (fine-tuning's first logged loss).
      writer: where measurements and eval scalars go.
      state_shardings: the TrainState's shardings (the jitted step's in and out).
      total_steps: the step the run ends at.
    """

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    manager: object
    meta: dict
    writer: metric_writers.MetricWriter
    state_shardings: object
    total_steps: int


def train(
    run: Run,
    state: TrainState,
    step_fn: Callable,
    batches: Iterator,
    *,
    evals: Mapping[str, base.Evaluator],
    final_evaluation_follows: bool = False,
    on_log: Callable[[int, dict], None] | None = None,
    on_eval: Callable[[TrainState, int, dict], None] | None = None,
) -> tuple[TrainState, int, dict[str, float]]:
    """Trains from state.step to run.total_steps, or until a preemption.

    Every step runs `step_fn` jitted with donated state and explicit
    shardings. Measurements are averaged and checked finite before each log
    line (every config.log_every_steps) and each checkpoint (every
    config.checkpoint_every_steps, the last step, and on SIGTERM).

    Args:
      run: what does not change during the run.
      state: the (restored) TrainState; training starts at its step.
      step_fn: (state, global batch) -> (state, measurements with 'finite').
      batches: host batches, the first one for step state.step.
      evals: evaluators; those with `every_steps` run at its multiples.
      final_evaluation_follows: the trainer evaluates the final state itself
        (fine-tuning: every eval on the final and best checkpoints), so the
        evals due at the last step are left to it.
      on_log: called with (step, summary) for every logged summary.
      on_eval: called with (state, step, outputs) after every periodic eval.

    Returns:
      (state, the step reached, the last logged measurements).

    Raises:
      NonFiniteLoss: after writing status 'failed'.
    """
    config, total_steps = run.config, run.total_steps
    train_step = jax.jit(
        step_fn,
        in_shardings=(run.state_shardings, sharding.batch_sharding(run.mesh)),
        out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
        donate_argnums=(0,),
        compiler_options=conv.compiler_options(),
    )
    progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=run.writer, every_steps=config.log_every_steps
    )
    preemption = Preemption(run.manager)
    pending, last = [], {}
    input_wait = InputWait()
    step = int(jax.device_get(state.step))
    try:
        while step < total_steps:
            start = time.perf_counter()
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                host_batch = next(batches)
                waited = time.perf_counter() - start
                batch = sharding.host_to_global(host_batch, run.mesh)
                state, measurements = train_step(state, batch)
            step += 1
            pending.append((step, measurements))
            progress(step)
            stop = preemption.should_stop(step)
            log_now = run_periodically(config.log_every_steps, step, total_steps)
            save_now = stop or run_periodically(config.checkpoint_every_steps, step, total_steps)
            if log_now or save_now:
                summary = drain_measurements(pending, run.manager)
                pending = []
            input_wait.add(waited, time.perf_counter() - start)
            if log_now:
                summary["data_wait_fraction"] = input_wait.take()
                run.writer.write_scalars(step, summary)
                last = summary
                if on_log is not None:
                    on_log(step, summary)
            if save_now:
                checkpoint.save(run.manager, step, state, {**run.meta, "step": step})
            due = [
                n
                for n, e in evals.items()
                if e.every_steps
                and step % e.every_steps == 0
                and not (final_evaluation_follows and step == total_steps)
            ]
            if due:
                variables = {"params": state.params, "batch_stats": state.batch_stats}
                outputs, _, _ = evaluators.run_evaluators(evals, variables, step, names=due)
                run.writer.write_scalars(step, evaluators.scalars(outputs))
                if on_eval is not None:
                    on_eval(state, step, outputs)
            if stop:
                logging.warning("Stopped at step %d by preemption; rerun to resume", step)
                break
        run.manager.wait_until_finished()
    except NonFiniteLoss as e:
        run.manager.wait_until_finished()
        rundir.write_status(run.workdir, "failed", step=step, error=str(e))
        raise
    finally:
        preemption.close()
        run.writer.flush()
    return state, step, last


class InputWait:
    """The share of the loop's training time spent waiting for the next batch.

    Training time is the loop's iterations (batch, step dispatch, fetching the
    logged measurements, which waits for the steps to finish), without the
    checkpoint saves and periodic evals. The steps run asynchronously, so
    waiting for a batch is time no step was queued: the input pipeline was
    behind. The first interval includes the step's compilation.
    """

    def __init__(self):
        self.waited = self.total = 0.0

    def add(self, waited: float, total: float) -> None:
        """One iteration: `waited` seconds for its batch, of `total` seconds."""
        self.waited += waited
        self.total += total

    def take(self) -> float:
        """The fraction since the last call (0 when nothing was timed); starts anew."""
        fraction = self.waited / self.total if self.total > 0 else 0.0
        self.waited = self.total = 0.0
        return fraction


def run_periodically(every: int, step: int, total: int) -> bool:
    """True every `every` steps and at the last step."""
    return step == total or (every > 0 and step % every == 0)


class NonFiniteLoss(RuntimeError):
    """Raised when a training step produced a non-finite loss."""


def drain_measurements(pending: list[tuple[int, dict]], manager) -> dict[str, float]:
    """Means of the measurements of `pending` steps, after checking they are finite.

    Called before every log line and every checkpoint, so only finite states
    are ever saved. One device fetch for all the steps since the last call.

    Args:
      pending: [(step, measurements dict with a 'finite' flag)], not empty.
      manager: the CheckpointManager, to name the last good checkpoint.

    Raises:
      NonFiniteLoss: naming the first non-finite step.
    """
    bad = first_bad_step([(step, m["finite"]) for step, m in pending])
    if bad is not None:
        raise NonFiniteLoss(nonfinite_message(bad, manager))
    fetched = jax.device_get([m for _, m in pending])
    keys = [k for k in fetched[0] if k != "finite"]
    return {k: float(np.mean([m[k] for m in fetched])) for k in keys}


def first_bad_step(pending: list[tuple[int, jax.Array]]) -> int | None:
    """The first step whose 'finite' flag is False, fetching the flags in one go.

    Args:
      pending: [(step, finite flag as a device scalar)] since the last check.
    """
    if not pending:
        return None
    flags = jax.device_get([flag for _, flag in pending])
    for (step, _), ok in zip(pending, flags, strict=True):
        if not bool(ok):
            return step
    return None


def nonfinite_message(step: int, manager) -> str:
    """The message of a run stopped by a non-finite loss, naming the last good checkpoint."""
    good = manager.latest_step()
    where = (
        f"the last good checkpoint is {manager.directory}/{good} (kept; rerunning resumes from it)"
        if good is not None
        else "no checkpoint was saved before it"
    )
    return (
        f"non-finite loss at step {step}; {where}. Lower the learning rate, check the data, "
        "or use float32 (config.model.dtype)."
    )
