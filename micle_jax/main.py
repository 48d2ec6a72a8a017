r"""Entry point: flags, config, multi-host initialisation, dispatch to a trainer.

  python -m micle_jax.main --config=configs/simclr_imagenet.py:arch=r50x1,runlocal=True \
      --workdir=/tmp/simclr [--config.batch_size=32 ...]

Several processes (GPU clusters, several local processes): pass
--coordinator_address, --num_processes and --process_id to every process, or
run under a launcher JAX detects (Cloud TPU pods, SLURM, Open MPI).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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
_XLA_CACHE = flags.DEFINE_string(
    "xla_cache_dir",
    os.path.join(os.path.expanduser("~"), ".cache", "micle_jax", "xla"),
    "Persistent XLA compilation cache ('' = off); $JAX_COMPILATION_CACHE_DIR wins.",
)

# Environment variables by which cluster launchers announce several processes;
# JAX's own cluster detection then fills in the addresses.
_CLUSTER_ENV = ("MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _wants_distributed() -> bool:
    if _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1:
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    for name in _CLUSTER_ENV:
        value = os.environ.get(name, "")
        if value and (not value.isdigit() or int(value) > 1):
            return True
    return False


def initialize_distributed() -> None:
    """Calls jax.distributed.initialize() when the run has more than one process."""
    import jax

    if not _wants_distributed():
        return
    # CPU collectives across processes need gloo (the default does none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    logging.info("Process %d of %d", jax.process_index(), jax.process_count())


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
    initialize_distributed()
    from micle_jax.trainers import loop

    try:
        run(_CONFIG.value, _WORKDIR.value, _MODE.value, _CHECKPOINT.value)
    except (ValueError, FileNotFoundError, PermissionError, loop.NonFiniteLoss) as e:
        logging.error("%s", e)
        print(f"micle_jax: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
