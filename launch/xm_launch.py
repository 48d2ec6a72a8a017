"""Launches a sweep with XManager (`python -m launch.sweep --executor=xmanager`).

Needs `pip install -e '.[xm]'` (xmanager and its Google Cloud clients, about
600 MB) plus what its executors need: Docker for xm_local.Local, a GCP project
for Vertex AI (see the XManager README). Each run is a Docker image of this
checkout (python:3.11-slim, `pip install -e .` and jax, `jax[cuda12]` when the
requirements ask for GPUs) running `python -m micle_jax.main ARGS`.

Where runs write: with xm_local.Local the sweep root is mounted into the
container at the same path, so workdirs and the report work as with the local
executor; on Vertex AI the root must be a gs:// bucket every job can write.

Dependencies are honoured level by level: all runs whose dependencies have
finished are added, then the launcher waits for them before the next level.
This is simpler than the local executor (no skip of finished runs: a rerun run
resumes from its checkpoint and ends at once).

Tested with a stand-in for xmanager's API (tests/test_xm_launch.py); the calls
were checked against xmanager 0.8.5 (job specs and executors build offline;
building the image needs Docker).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import Sequence

from launch import sweep_spec
from launch.tpu import remote

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_IMAGE = "python:3.11-slim"  # setup.py: python_requires >= 3.11
_HOST_RESOURCES = frozenset({"cpu", "memory", "ram", "ephemeral_storage", "disk"})
_TPU_RESOURCE = re.compile(r"^v\d", re.IGNORECASE)  # xm.ResourceType's TPUs: v2, v3, v4, ...


def _import_xmanager():
    try:
        from xmanager import xm, xm_local
    except ImportError as e:
        raise ImportError(
            "--executor=xmanager needs the xmanager package: pip install xmanager "
            "(or pip install -e '.[xm]'; or use --executor=print and your own scheduler)"
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


def parse_requirements(text: str) -> dict[str, int]:
    """'A100=1,cpu=8' -> {'A100': 1, 'cpu': 8}; '' -> {} (run with xm_local.Local).

    Raises:
      ValueError: an item that is not RESOURCE=COUNT.
    """
    resources = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, count = item.partition("=")
        if not sep or not name or not count.isdigit():
            raise ValueError(
                f"--xm_requirements={text}: {item!r} is not RESOURCE=COUNT; e.g. "
                "--xm_requirements=A100=1 (Vertex AI), or leave it empty for a local run"
            )
        resources[name] = int(count)
    return resources


def jax_package(resources: dict[str, int]) -> str:
    """The jax to install: jax[tpu] for TPU resources, jax[cuda12] for GPUs, else jax."""
    accelerators = [name for name in resources if name.lower() not in _HOST_RESOURCES]
    if any(_TPU_RESOURCE.match(name) for name in accelerators):
        return "jax[tpu]"
    return "jax[cuda12]" if accelerators else "jax"


def docker_instructions(jax: str) -> list[str]:
    """Dockerfile steps: this checkout installed with `jax` (a pip requirement)."""
    folder = os.path.basename(REPO_ROOT)  # the Docker context holds the checkout as <folder>/
    return [
        "ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1",
        f"COPY --chown=1000:root {folder}/ /{folder}",
        f"WORKDIR /{folder}",
        f"RUN python -m pip install --no-cache-dir -e . '{jax}'",
    ]


def sweep_root(runs: Sequence[sweep_spec.Run]) -> str:
    """The folder that holds every run's workdir."""
    return os.path.commonpath([os.path.abspath(run.workdir) for run in runs])


def make_executor(xm, xm_local, resources: dict[str, int], runs: Sequence[sweep_spec.Run]):
    """Vertex AI with `resources`, else a local Docker container with the sweep root mounted.

    Raises:
      ValueError: Vertex AI with a workdir that is not gs://, or an unknown resource.
    """
    if not resources:
        root = sweep_root(runs)
        return xm_local.Local(docker_options=xm_local.DockerOptions(volumes={root: root}))
    local = [run.workdir for run in runs if not run.workdir.startswith("gs://")]
    if local:
        raise ValueError(
            f"--xm_requirements runs on Vertex AI, which cannot write {local[0]}: use "
            "--root=gs://BUCKET/PATH"
        )
    try:
        requirements = xm.JobRequirements(**resources)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(
            f"--xm_requirements: xmanager does not accept {resources} ({e}); resource "
            "names are xm.ResourceType's, e.g. A100, V100, T4, cpu, memory"
        ) from e
    return xm_local.Vertex(requirements=requirements)


def stage_checkout(parent: str) -> str:
    """Copies the checkout's files (git ls-files: no .venv, no workdirs) to parent/<repo>/.

    xmanager would otherwise send the whole folder (gigabytes with a .venv) to Docker.
    """
    staged = os.path.join(parent, os.path.basename(REPO_ROOT))
    for name in remote.checkout_files(REPO_ROOT):
        os.makedirs(os.path.dirname(os.path.join(staged, name)), exist_ok=True)
        shutil.copy2(os.path.join(REPO_ROOT, name), os.path.join(staged, name))
    return staged


def make_packageable(xm, executor, jax: str, path: str):
    """The container of `path` (a staged checkout) running `python -m micle_jax.main`."""
    return xm.python_container(
        executor_spec=executor.Spec(),
        path=path,
        base_image=BASE_IMAGE,
        docker_instructions=docker_instructions(jax),
        entrypoint=xm.ModuleName("micle_jax.main"),
    )


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
      0 once every level has completed; 2 for bad requirements.
    """
    levels = dependency_levels(runs)
    if dry_run:
        for i, level in enumerate(levels):
            for run in level:
                print(f"level {i}: {run.name}: {' '.join(run.args)}")
        return 0
    xm, xm_local = _import_xmanager()
    try:
        resources = parse_requirements(requirements)
        executor = make_executor(xm, xm_local, resources, runs)
    except ValueError as e:
        print(f"error: {e}")
        return 2

    async def add_all():
        async with xm_local.create_experiment(experiment_title=title) as experiment:
            with tempfile.TemporaryDirectory() as staging:
                path = stage_checkout(staging)
                packageable = make_packageable(xm, executor, jax_package(resources), path)
                [executable] = experiment.package([packageable])
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
