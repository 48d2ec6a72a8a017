"""SLURM launcher (submitit): one task per GPU on one or several nodes, requeue + resume.

task.py   the callable every task runs: the trainer as a subprocess, SIGTERM on
          USR2 (it checkpoints), `__submitit_checkpoint__` to requeue it
cli.py    flags, their checks, the sbatch script; `python -m launch.slurm`
"""

try:
    import submitit  # noqa: F401
except ImportError as e:
    raise ImportError(
        "launch.slurm needs submitit: pip install -e '.[slurm]' (or pip install submitit)"
    ) from e
