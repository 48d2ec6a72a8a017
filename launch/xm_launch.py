"""Launches a sweep with XManager (`python -m launch.sweep --executor=xmanager`).

Needs `pip install xmanager` plus what its executors need (Docker for
xm_local.Local; a GCP project for Vertex AI); see the XManager README. ROOT must
be storage every job can write (a gs:// bucket on Vertex AI).

Dependencies are honoured level by level: all runs whose dependencies have
finished are added, then the launcher waits for them before the next level.
This is simpler than the local executor (no skip of finished runs: a rerun run
resumes from its checkpoint and ends at once) and is NOT tested here: the
xmanager package is not installed in CI. Only the import guard is tested.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from launch import sweep_spec


def _import_xmanager():
    try:
        from xmanager import xm, xm_local
    except ImportError as e:
        raise ImportError(
            "--executor=xmanager needs the xmanager package: pip install xmanager "
            "(or use --executor=print and your own scheduler)"
        ) from e
    return xm, xm_local


def dependency_levels(runs: Sequence[sweep_spec.Run]) -> list[list[sweep_spec.Run]]:
    """Runs grouped so that each run's dependency is in an earlier group."""
    ordered = sweep_spec.dependency_order(runs)
    level: dict[str, int] = {}
    for run in ordered:
        level[run.name] = 0 if run.depends_on is None else level[run.depends_on] + 1
    groups: list[list[sweep_spec.Run]] = [[] for _ in range(max(level.values()) + 1)]
    for run in ordered:
        groups[level[run.name]].append(run)
    return groups


def launch(
    runs: Sequence[sweep_spec.Run],
    dry_run: bool = False,
    requirements: str = "",
    title: str = "micle_jax sweep",
) -> int:
    """Adds every run as an XManager job running `python -m micle_jax.main ARGS`.

    Args:
      runs: the expanded sweep.
      dry_run: print the levels and commands only.
      requirements: 'A100=1' style resources; set: Vertex AI, empty: xm_local.Local.
      title: the experiment's title.

    Returns:
      0 once every level has completed.
    """
    levels = dependency_levels(runs)
    if dry_run:
        for i, level in enumerate(levels):
            for run in level:
                print(f"level {i}: {run.name}: {' '.join(run.args)}")
        return 0
    xm, xm_local = _import_xmanager()
    resources = {k: int(v) for k, v in (kv.split("=") for kv in requirements.split(",") if kv)}
    if resources:
        executor = xm_local.Vertex(requirements=xm.JobRequirements(**resources))
    else:
        executor = xm_local.Local()

    async def add_all():
        async with xm_local.create_experiment(experiment_title=title) as experiment:
            [executable] = experiment.package(
                [
                    xm.python_container(
                        executor_spec=executor.Spec(),
                        path=".",
                        entrypoint=xm.ModuleName("micle_jax.main"),
                    )
                ]
            )
            for level in levels:
                units = [
                    await experiment.add(
                        xm.Job(executable=executable, executor=executor, args=list(run.args))
                    )
                    for run in level
                ]
                for unit in units:
                    await unit.wait_until_complete()

    asyncio.run(add_all())
    return 0
