"""The trainer flags a launcher passes through after `--`, checked in one place."""

from __future__ import annotations

from collections.abc import Sequence

# What every launcher sets itself: the run and the process group.
RESERVED = ("--config", "--workdir", "--coordinator_address", "--num_processes", "--process_id")


def check_trainer_flags(extra: Sequence[str], peers: str) -> None:
    """Errors for arguments after `--` that are not flags, or that the launcher sets.

    Args:
      extra: the arguments after `--`, passed on to `python -m micle_jax.main`.
      peers: how JAX finds its peers on this platform, for the message.
    """
    for arg in extra:
        if not arg.startswith("--"):
            raise ValueError(
                f"unexpected argument {arg!r}: trainer flags go after `--` and start with "
                "'--', e.g. -- --config.batch_size=4096"
            )
        if arg.split("=", 1)[0] in RESERVED:
            raise ValueError(
                f"{arg} after `--`: the launcher sets it (use the launcher's --config and "
                f"--workdir; {peers})"
            )
