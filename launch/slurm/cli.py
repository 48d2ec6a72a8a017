"""Flags of `python -m launch.slurm`, their checks, the sbatch script, and submission."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from typing import TextIO

import submitit

from launch import trainer_flags
from launch.slurm import task

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXECUTORS = ("slurm", "local")
# Set by the launcher, or found by JAX itself from the SLURM environment.


@dataclasses.dataclass
class Options:
    """Everything the command line sets; the defaults here are the flags' defaults."""

    config: str = ""
    workdir: str = ""
    nodes: int = 1
    gpus_per_node: int = 8
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 24 * 60
    cpus_per_task: int = 8
    mem_gb: float = 0  # 0: the partition's default
    setup: Sequence[str] = ()  # shell lines before srun, e.g. 'module load cuda/12.4'
    job_name: str = "micle_jax"
    folder: str = ""  # '' = WORKDIR/slurm
    max_requeues: int = 3
    signal_delay_s: int = 120
    executor: str = "slurm"
    python: str = sys.executable
    dry_run: bool = False
    wait: bool = False
    extra: Sequence[str] = ()  # trainer flags after `--`


class _ScriptOnlyExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor where no SLURM is installed: builds, never submits."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def check(o: Options) -> None:
    """Raises ValueError naming a bad flag and its fix."""
    if not o.config or not o.workdir:
        raise ValueError("--config=configs/FILE.py[:ARGS] and --workdir=/shared/PATH are required")
    if not os.path.isabs(o.workdir):
        raise ValueError(
            f"--workdir={o.workdir}: give an absolute path on a filesystem every node mounts "
            "(e.g. /shared/$USER/runs/micle): all tasks write the same checkpoints"
        )
    config_file = o.config.split(":", 1)[0]
    if not os.path.isfile(os.path.join(REPO_ROOT, config_file)):
        raise ValueError(
            f"--config={o.config}: {config_file} is not a file of this checkout ({REPO_ROOT}); "
            "give a path relative to the repository root, e.g. --config=configs/micle_medical.py"
        )
    if o.executor not in EXECUTORS:
        raise ValueError(f"--executor={o.executor}: accepted: {', '.join(EXECUTORS)}")
    if o.nodes < 1 or o.gpus_per_node < 0:
        raise ValueError(
            f"--nodes={o.nodes} --gpus_per_node={o.gpus_per_node}: need at least 1 node "
            "and 0 or more GPUs per node (0: one CPU task per node)"
        )
    if o.executor == "local" and o.nodes > 1:
        raise ValueError(
            f"--executor=local runs on this machine only: use --nodes=1, not {o.nodes}"
        )
    if o.time_min <= o.signal_delay_s / 60:
        raise ValueError(
            f"--time_min={o.time_min} leaves no time before the requeue signal, sent "
            f"--signal_delay_s={o.signal_delay_s} s before the limit; give more minutes"
        )
    trainer_flags.check_trainer_flags(o.extra, "JAX finds its peers from the SLURM environment")


def tasks_per_node(o: Options) -> int:
    """One task (one JAX process) per GPU: JAX's SLURM detection gives each process the
    GPU of its SLURM_LOCALID, so one task with 8 GPUs would use only the first."""
    return max(1, o.gpus_per_node)


def make_task(o: Options) -> task.TrainerTask:
    args = [f"--config={o.config}", f"--workdir={o.workdir}", *o.extra]
    return task.TrainerTask(args, o.workdir, REPO_ROOT, o.python)


def make_executor(o: Options, script_only: bool = False):
    """submitit's executor for the options (SLURM, or local for one machine)."""
    folder = o.folder or os.path.join(o.workdir, "slurm")
    if o.executor == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=o.max_requeues, python=o.python)
        executor.update_parameters(
            timeout_min=o.time_min,
            tasks_per_node=tasks_per_node(o),
            gpus_per_node=o.gpus_per_node,
            signal_delay_s=o.signal_delay_s,
            stderr_to_stdout=True,
        )
        return executor
    cls = _ScriptOnlyExecutor if script_only else submitit.SlurmExecutor
    executor = cls(folder, max_num_timeout=o.max_requeues, python=shlex.quote(o.python))
    params = dict(
        job_name=o.job_name,
        time=o.time_min,
        nodes=o.nodes,
        ntasks_per_node=tasks_per_node(o),
        cpus_per_task=o.cpus_per_task,
        signal_delay_s=o.signal_delay_s,
        stderr_to_stdout=True,
        setup=list(o.setup) or None,
        additional_parameters={"requeue": True},
    )
    if o.gpus_per_node:
        params["gpus_per_node"] = o.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(o, key):
            params[key] = getattr(o, key)
    if o.mem_gb:
        params["mem"] = f"{int(o.mem_gb)}GB"
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def sbatch_script(o: Options) -> str:
    """The sbatch script submitit writes for these options (no SLURM needed)."""
    executor = make_executor(o, script_only=True)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry_run")


def print_plan(o: Options, out: TextIO) -> None:
    """--dry_run: the sbatch script and the command every task runs."""
    trainer = make_task(o)
    n = o.nodes * tasks_per_node(o)
    if o.executor == "slurm":
        out.write(sbatch_script(o))
    else:
        out.write(f"# submitit LocalExecutor: {n} task(s) on this machine\n")
    out.write(
        f"\n# each of the {n} task(s) runs, in {trainer.cwd}:\n"
        f"#   {shlex.join(trainer.command(_NoJobEnvironment()))}\n"
        "# (JAX reads its coordinator, process count and id from the SLURM environment)\n"
    )


class _NoJobEnvironment:
    cluster = "slurm"
    num_tasks = 1


def execute(o: Options, out: TextIO = sys.stdout) -> int:
    """Checks the options, then prints (--dry_run) or submits; returns the exit code."""
    try:
        check(o)
    except ValueError as e:
        print(f"launch.slurm: error: {e}", file=sys.stderr)
        return 2
    if o.dry_run:
        print_plan(o, out)
        return 0
    try:
        executor = make_executor(o)
    except RuntimeError as e:  # submitit: 'Could not detect "srun"'
        print(
            f"launch.slurm: error: {e}: run this on a SLURM login node, or use "
            "--dry_run to see the script, or --executor=local on one machine",
            file=sys.stderr,
        )
        return 2
    job = executor.submit(make_task(o))
    n = o.nodes * tasks_per_node(o)
    out.write(
        f"submitted job {job.job_id}: {n} task(s) on {o.nodes} node(s), workdir {o.workdir}\n"
        f"  task 0's log: {job.paths.stdout}\n"
        f"  follow it:    tail -f {shlex.quote(str(job.paths.stdout))}\n"
    )
    if o.executor == "slurm":
        out.write(f"  cancel it:    scancel {job.job_id}  (rerun this command to resume)\n")
    if not o.wait:
        return 0
    try:
        job.result()
    except Exception as e:  # noqa: BLE001 - submitit re-raises the task's error
        print(f"launch.slurm: job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    out.write(f"job {job.job_id} finished: {o.workdir}\n")
    return 0
