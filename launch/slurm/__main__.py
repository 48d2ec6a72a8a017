r"""Runs micle_jax on a SLURM GPU cluster with submitit: one task per GPU, every task
the same command, requeued (and resumed) on time limit or preemption.

    python -m launch.slurm --nodes=2 --gpus_per_node=8 --partition=gpu \
      --config=configs/micle_medical.py:records=/shared/data/cxr,arch=r50x1 \
      --workdir=/shared/$USER/runs/micle_cxr [--dry_run] [-- --config.batch_size=4096]

Flags after `--` go to the trainer. `--executor=local` runs the same tasks on
this machine (submitit's LocalExecutor). See launch/slurm/task.py.
"""

import sys

from absl import app, flags

from launch.slurm import cli

_DEFAULTS = cli.Options()


def _define_flags() -> None:
    d = _DEFAULTS
    flags.DEFINE_string("config", d.config, "Trainer config, configs/FILE.py[:ARGS].")
    flags.DEFINE_string("workdir", d.workdir, "Trainer workdir on a filesystem all nodes mount.")
    flags.DEFINE_integer("nodes", d.nodes, "Nodes.")
    flags.DEFINE_integer("gpus_per_node", d.gpus_per_node, "GPUs (= tasks) per node.")
    flags.DEFINE_string("partition", d.partition, "SLURM partition ('' = default).")
    flags.DEFINE_string("account", d.account, "SLURM account ('' = default).")
    flags.DEFINE_string("qos", d.qos, "SLURM quality of service ('' = default).")
    flags.DEFINE_string("constraint", d.constraint, "SLURM node features, e.g. a100.")
    flags.DEFINE_integer("time_min", d.time_min, "Time limit per allocation (minutes).")
    flags.DEFINE_integer("cpus_per_task", d.cpus_per_task, "CPUs per task (input pipeline).")
    flags.DEFINE_float("mem_gb", d.mem_gb, "Memory per node in GB (0 = partition default).")
    flags.DEFINE_multi_string("setup", list(d.setup), "Shell line run before srun (repeatable).")
    flags.DEFINE_string("job_name", d.job_name, "SLURM job name.")
    flags.DEFINE_string("folder", d.folder, "submitit's logs and pickles ('' = WORKDIR/slurm).")
    flags.DEFINE_integer("max_requeues", d.max_requeues, "Requeues after time limits.")
    flags.DEFINE_integer("signal_delay_s", d.signal_delay_s, "USR2 this long before the limit.")
    flags.DEFINE_enum("executor", d.executor, list(cli.EXECUTORS), "slurm, or local (tests).")
    flags.DEFINE_string("python", d.python, "Python on the nodes (same path everywhere).")
    flags.DEFINE_bool("dry_run", d.dry_run, "Print the sbatch script and task command only.")
    flags.DEFINE_bool("wait", d.wait, "Wait for the job to end; exit code 1 if it failed.")


def main(argv):
    f = flags.FLAGS
    fields = [k for k in cli.Options.__dataclass_fields__ if k != "extra"]
    options = cli.Options(**{k: f[k].value for k in fields}, extra=list(argv[1:]))
    return cli.execute(options)


if __name__ == "__main__":
    _define_flags()
    sys.exit(app.run(main))
