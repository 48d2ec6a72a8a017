r"""Entry point: flags, config, multi-host initialisation, dispatch to a trainer.

  python -m micle_jax.main --config=configs/simclr_imagenet.py:arch=r50x1,runlocal=True \
      --workdir=/tmp/simclr [--config.batch_size=32 ...]

Several processes (GPU clusters, several local processes): pass
--coordinator_address, --num_processes and --process_id to every process, or
run under a launcher JAX detects (Cloud TPU pods, SLURM, Open MPI), where
jax.distributed.initialize() finds them itself.

When one process of a multi-process run stops (killed, crashed, hung), the
others name it and exit with code 1 within --heartbeat_timeout_seconds
(micle_jax/peers.py); rerunning the same command resumes from the last complete
checkpoint (docs/scaling.md: When a process stops).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

if __name__ == "__main__":
    # Before anything heavy is imported: glibc's malloc tunables are read at start.
    from micle_jax import process_env

    process_env.restart_with_tuned_malloc()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from micle_jax import peers  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':ARG'.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train, or evaluate a checkpoint.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "With --mode=eval: the checkpoint.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, N).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    60,
    "Multi-process runs: a process that gives no sign of life for this long is declared "
    "stopped, and every other process names it and exits with code 1 (rerun the same "
    "command to resume). JAX's own heartbeat timeout, the backstop, is 3 times this.",
    lower_bound=1,
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout_seconds",
    300,
    "Multi-process runs: how long a process that has finished waits at exit for the others.",
    lower_bound=1,
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_seconds",
    300,
    "Multi-process runs: how long a process waits at start for all the others to connect.",
    lower_bound=1,
)
_XLA_CACHE = flags.DEFINE_string(
    "xla_cache_dir",
    os.path.join(os.path.expanduser("~"), ".cache", "micle_jax", "xla"),
    "Persistent XLA compilation cache ('' = off); $JAX_COMPILATION_CACHE_DIR wins.",
)

# Environment variables by which cluster launchers announce several processes;
# JAX's own cluster detection then fills in the addresses.
_CLUSTER_ENV = ("MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def wants_distributed(
    coordinator_address: str | None, num_processes: int | None, env: Mapping[str, str]
) -> bool:
    """Whether this run has several processes: flags, or a cluster launcher's environment."""
    if coordinator_address or (num_processes or 1) > 1:
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    for name in _CLUSTER_ENV:
        value = env.get(name, "")
        if value and (not value.isdigit() or int(value) > 1):
            return True
    return False


def initialize_distributed(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    heartbeat_timeout: int,
    shutdown_timeout: int,
    initialization_timeout: int,
) -> bool:
    """Calls jax.distributed.initialize() when the run has more than one process.

    Addresses left None are JAX's to find: on a Cloud TPU pod, under SLURM or
    Open MPI, jax.distributed.initialize() reads them from the environment.
    The timeouts are always explicit; JAX's heartbeat timeout is
    peers.JAX_HEARTBEAT_FACTOR x `heartbeat_timeout`, so that the peer
    watchdog names a stopped process before JAX aborts. Returns whether it
    initialised.
    """
    import jax

    if not wants_distributed(coordinator_address, num_processes, os.environ):
        return False
    # CPU collectives across processes need gloo (the default does none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=peers.JAX_HEARTBEAT_FACTOR * heartbeat_timeout,
        shutdown_timeout_seconds=shutdown_timeout,
    )
    logging.info("Process %d of %d", jax.process_index(), jax.process_count())
    return True


def enable_compilation_cache() -> None:
    """Reuses compiled steps across runs (a sweep compiles the same step many times)."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not _XLA_CACHE.value:
        return
    jax.config.update("jax_compilation_cache_dir", _XLA_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run(config, workdir: str, mode: str = "train", checkpoint: str | None = None):
    """Dispatches to the trainer named by `config.trainer`."""
    trainer = config.get("trainer", "pretrain")
    if mode == "eval":
        if trainer != "finetune":
            raise ValueError("--mode=eval needs a fine-tuning config (config.trainer='finetune')")
        from micle_jax.trainers import evaluate

        return evaluate.evaluate_checkpoint(config, workdir, checkpoint)
    if trainer == "pretrain":
        from micle_jax.trainers import pretrain

        return pretrain.main(config, workdir)
    if trainer == "finetune":
        from micle_jax.trainers import finetune

        return finetune.main(config, workdir)
    if trainer == "feature_eval":
        from micle_jax.trainers import feature_eval

        return feature_eval.main(config, workdir)
    raise ValueError(f"config.trainer={trainer!r}; accepted: pretrain, finetune, feature_eval")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/FILE.py[:ARGS] is required")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir=DIR is required")
    logging.set_verbosity(logging.INFO)
    # TensorFlow is only tf.data here; it must not grab GPU memory (big_vision).
    from micle_jax.data.stream import tf_host

    tf_host.keep_tf_on_host()
    enable_compilation_cache()
    watchdog = None
    if initialize_distributed(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        _HEARTBEAT_TIMEOUT.value,
        _SHUTDOWN_TIMEOUT.value,
        _INIT_TIMEOUT.value,
    ):
        watchdog = peers.start(_WORKDIR.value, _HEARTBEAT_TIMEOUT.value)
    from micle_jax.trainers import loop

    try:
        run(_CONFIG.value, _WORKDIR.value, _MODE.value, _CHECKPOINT.value)
    except Exception as e:
        if isinstance(e, (ValueError, FileNotFoundError, PermissionError, loop.NonFiniteLoss)):
            logging.error("%s", e)
            print(f"micle_jax: error: {e}", file=sys.stderr)
        elif watchdog is None:
            raise
        else:
            logging.exception("%s", e)
        if watchdog is None:
            sys.exit(1)
        watchdog.fail()
    if watchdog is not None:
        watchdog.stop(peers.FINISHED)


if __name__ == "__main__":
    app.run(main)
