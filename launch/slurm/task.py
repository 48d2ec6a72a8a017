"""One task of a SLURM job: runs `python -m micle_jax.main ARGS`, checkpoints on a signal.

Every task of the job (one per GPU) runs the same command. On SLURM, JAX finds
its peers from the SLURM environment: micle_jax/main.py sees SLURM_NTASKS > 1
and calls jax.distributed.initialize(), whose SLURM cluster detection takes
the coordinator (first node of SLURM_STEP_NODELIST), the process count and id
(SLURM_NTASKS, SLURM_PROCID) and the one GPU of this process (SLURM_LOCALID),
so nothing is passed. Under submitit's local executor (tests, one machine)
there is no SLURM environment and the task passes --coordinator_address,
--num_processes and --process_id itself.

Requeue: SLURM sends USR2 `signal_delay_s` before the time limit (sbatch
--signal). This task stops its trainer with SIGTERM (the trainer saves a
checkpoint and exits, micle_jax/trainers/preemption.py), then submitit calls
`__submitit_checkpoint__` on task 0, which returns the same command, and
requeues the job; the requeued job reruns it and the trainer resumes from the
workdir's checkpoint. A preemption (SIGTERM from SLURM) reaches the trainer
directly; SLURM requeues preempted jobs when the partition's PreemptMode is
REQUEUE (the sbatch script asks for --requeue).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

import submitit

from micle_jax import rundir

STOP_TIMEOUT_S = 90.0  # time for the trainer to save a checkpoint after SIGTERM


def _ignore_usr2() -> None:
    # SLURM signals every process of the step; USR2 would kill the trainer
    # (Python's default action) before this task could stop it with SIGTERM.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def process_flags(job_env) -> list[str]:
    """The trainer's multi-process flags for this task (none on SLURM: JAX finds them).

    Args:
      job_env: submitit.JobEnvironment() of the running task.
    """
    if job_env.cluster == "slurm" or job_env.num_tasks <= 1:
        return []
    # The same port in every task of the job, from the job id (the local executor's pid).
    port = 20000 + int(str(job_env.job_id).split("_")[0]) % 20000
    return [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={job_env.num_tasks}",
        f"--process_id={job_env.global_rank}",
    ]


class TrainerTask(submitit.helpers.Checkpointable):
    """The callable submitit runs in every task: the trainer as a subprocess.

    Args:
      args: the trainer's arguments (--config=..., --workdir=..., overrides).
      workdir: the trainer's --workdir (its run_status.json says how it ended).
      cwd: where the command runs (the repository root: configs/ paths are relative).
      python: the Python that runs `-m micle_jax.main` (same path on every node).
    """

    def __init__(self, args: Sequence[str], workdir: str, cwd: str, python: str = sys.executable):
        self.args = list(args)
        self.workdir = workdir
        self.cwd = cwd
        self.python = python
        self._proc: subprocess.Popen | None = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._proc = None

    def command(self, job_env) -> list[str]:
        """The command this task runs."""
        return [self.python, "-m", "micle_jax.main", *self.args, *process_flags(job_env)]

    def start(self, job_env) -> subprocess.Popen:
        """Starts the trainer; it inherits this task's output (the task's log) and ignores USR2."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            self.command(job_env), cwd=self.cwd, env=env, preexec_fn=_ignore_usr2
        )
        return self._proc

    def stop_trainer(self) -> int | None:
        """SIGTERM to a running trainer, then waits for its checkpoint; its exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            print("launch.slurm: stopping the trainer (SIGTERM) to checkpoint", flush=True)
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def __call__(self) -> int:
        job_env = submitit.JobEnvironment()
        requeue = []  # the USR2 that asked for a checkpoint, if any
        chained = None
        if threading.current_thread() is threading.main_thread():
            chained = signal.getsignal(signal.SIGUSR2)

            def on_usr2(signum, frame):
                # Only signal here: waiting for the trainer inside the handler would
                # deadlock on the Popen.wait() it interrupted.
                requeue.append((signum, frame))
                if self._proc is not None and self._proc.returncode is None:
                    print("launch.slurm: stopping the trainer (SIGTERM) to checkpoint", flush=True)
                    self._proc.terminate()

            signal.signal(signal.SIGUSR2, on_usr2)
        proc = self.start(job_env)
        code = proc.wait()
        if requeue and callable(chained):
            chained(*requeue[0])  # submitit: __submitit_checkpoint__ and requeue (task 0)
        if code != 0:
            raise RuntimeError(
                f"task {job_env.global_rank}: `python -m micle_jax.main` exited with code "
                f"{code}; its output is in this task's log, above"
            )
        status = rundir.read_status(self.workdir) or {}
        if status.get("status") == "preempted":
            raise RuntimeError(
                f"the trainer stopped early at step {status.get('step')} (SIGTERM: preempted "
                "or cancelled); a requeued job resumes it, or rerun the same launch command"
            )
        return code

    def __submitit_checkpoint__(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:
        """Stops the trainer (it checkpoints) and resubmits the same command.

        None (no requeue) when the run had already finished.
        """
        self.stop_trainer()
        if (rundir.read_status(self.workdir) or {}).get("status") == "finished":
            return None
        return submitit.helpers.DelayedSubmission(
            TrainerTask(self.args, self.workdir, self.cwd, self.python)
        )
