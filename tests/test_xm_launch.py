"""Tests for launch/xm_launch.py with a stand-in for xmanager's API.

xmanager itself (about 600 MB with its Google Cloud clients) is an optional
extra ('.[xm]'), not a test dependency: `fake_xmanager` provides the names
xm_launch uses, with xmanager 0.8.5's signatures, and records what the
launcher builds and in which order it adds and awaits the jobs.
"""

import asyncio
import dataclasses
import os
import pathlib
import sys
import types

import pytest

from launch import sweep_spec, xm_launch

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "fixtures" / "tiny_sweep.py")


@dataclasses.dataclass
class ModuleName:
    module_name: str


class JobRequirements:
    KNOWN = {"a100", "v100", "t4", "h100", "cpu", "memory", "v4"}

    def __init__(self, resources=None, **kw_resources):
        for name in {**(resources or {}), **kw_resources}:
            if name.lower() not in self.KNOWN:
                raise KeyError(f"Unknown ResourceType {name!r}")
        self.resources = {**(resources or {}), **kw_resources}


class Executor:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def Spec(self):  # noqa: N802 - xmanager's name
        return ("spec", type(self).__name__)


class Local(Executor):
    pass


class Vertex(Executor):
    pass


@dataclasses.dataclass
class Job:
    executable: object
    executor: object
    name: str = ""
    args: object = None
    env_vars: object = None


class Recorder:
    """What the launcher did, in order."""

    def __init__(self):
        self.events = []  # ('add', args) and ('done', args)
        self.packaged = []  # (packageable kwargs, the staged files at packaging time)
        self.titles = []


def fake_xmanager(recorder: Recorder):
    xm = types.ModuleType("xmanager.xm")
    xm_local = types.ModuleType("xmanager.xm_local")

    def python_container(
        executor_spec,
        entrypoint,
        path=".",
        base_image=None,
        docker_instructions=None,
        use_deep_module=False,
        *,
        args=None,
        env_vars=None,
    ):
        # The real one resolves a relative path against the launch script (launch/).
        assert os.path.isabs(path), path
        files = sorted(
            str(p.relative_to(path)) for p in pathlib.Path(path).rglob("*") if p.is_file()
        )
        recorder.packaged.append(
            (
                dict(
                    executor_spec=executor_spec,
                    entrypoint=entrypoint,
                    path=path,
                    base_image=base_image,
                    docker_instructions=docker_instructions,
                ),
                files,
            )
        )
        return ("packageable", path)

    class Unit:
        def __init__(self, args):
            self.args = args

        async def wait_until_complete(self):
            await asyncio.sleep(0)
            recorder.events.append(("done", self.args))

    class Experiment:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        def package(self, packageables):
            return [("executable", p) for p in packageables]

        async def add(self, job):
            recorder.events.append(("add", job.args))
            return Unit(job.args)

    def create_experiment(experiment_title):
        recorder.titles.append(experiment_title)
        return Experiment()

    xm.ModuleName, xm.JobRequirements, xm.Job = ModuleName, JobRequirements, Job
    xm.python_container = python_container
    xm_local.Local, xm_local.Vertex = Local, Vertex
    xm_local.DockerOptions = lambda volumes=None, **kw: dict(volumes=volumes, **kw)
    xm_local.create_experiment = create_experiment
    package = types.ModuleType("xmanager")
    package.xm, package.xm_local = xm, xm_local
    return {"xmanager": package, "xmanager.xm": xm, "xmanager.xm_local": xm_local}


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    for name, module in fake_xmanager(rec).items():
        monkeypatch.setitem(sys.modules, name, module)
    return rec


def tiny_runs(root):
    return sweep_spec.expand(sweep_spec.load_sweep(TINY), str(root))


def test_local_launch_adds_every_run_level_by_level(recorder, tmp_path):
    runs = tiny_runs(tmp_path / "sweep")
    assert xm_launch.launch(runs) == 0
    levels = xm_launch.dependency_levels(runs)
    expected = [list(run.args) for level in levels for run in level]
    added = [args for kind, args in recorder.events if kind == "add"]
    assert sorted(map(tuple, added)) == sorted(map(tuple, expected))
    # A level starts only once every unit of the level before has completed.
    first_level = {tuple(run.args) for run in levels[0]}
    last_done = max(
        i for i, (k, a) in enumerate(recorder.events) if k == "done" and tuple(a) in first_level
    )
    first_later_add = min(
        i for i, (k, a) in enumerate(recorder.events) if k == "add" and tuple(a) not in first_level
    )
    assert last_done < first_later_add


def test_local_launch_builds_the_container_of_this_checkout(recorder, tmp_path):
    runs = tiny_runs(tmp_path / "sweep")
    xm_launch.launch(runs)
    [(spec, files)] = recorder.packaged
    assert spec["entrypoint"] == ModuleName("micle_jax.main")
    assert spec["executor_spec"] == ("spec", "Local")
    assert spec["base_image"] == "python:3.11-slim"
    folder = REPO.name
    assert os.path.basename(spec["path"]) == folder  # the Dockerfile COPYs <folder>/
    assert {"setup.py", "micle_jax/main.py", "configs/micle_medical.py"} <= set(files)
    assert not any(f.startswith((".venv/", ".git/")) for f in files)
    assert not os.path.exists(spec["path"])  # the staged copy is removed afterwards
    assert spec["docker_instructions"][1:] == [
        f"COPY --chown=1000:root {folder}/ /{folder}",
        f"WORKDIR /{folder}",
        "RUN python -m pip install --no-cache-dir -e . 'jax'",
    ]


def test_local_executor_mounts_the_sweep_root(recorder, tmp_path):
    runs = tiny_runs(tmp_path / "sweep")
    xm, xm_local = xm_launch._import_xmanager()
    executor = xm_launch.make_executor(xm, xm_local, {}, runs)
    root = str(tmp_path / "sweep")
    assert isinstance(executor, Local)
    assert executor.kwargs["docker_options"]["volumes"] == {root: root}


def test_vertex_launch_with_gpus(recorder):
    runs = tiny_runs("gs://bucket/sweep")
    assert xm_launch.launch(runs, requirements="A100=1") == 0
    [(spec, _)] = recorder.packaged
    assert spec["executor_spec"] == ("spec", "Vertex")
    assert spec["docker_instructions"][-1].endswith("-e . 'jax[cuda12]'")
    xm, xm_local = xm_launch._import_xmanager()
    executor = xm_launch.make_executor(xm, xm_local, {"A100": 1}, runs)
    assert executor.kwargs["requirements"].resources == {"A100": 1}


def test_vertex_needs_a_gs_root(recorder, tmp_path, capsys):
    assert xm_launch.launch(tiny_runs(tmp_path), requirements="A100=1") == 2
    out = capsys.readouterr().out
    assert "Vertex AI, which cannot write" in out and "use --root=gs://BUCKET/PATH" in out
    assert not recorder.packaged


@pytest.mark.parametrize(
    "text, message",
    [("A100", "'A100' is not RESOURCE=COUNT"), ("A100=one", "'A100=one' is not RESOURCE=COUNT")],
)
def test_bad_requirements_name_the_item(text, message):
    with pytest.raises(ValueError, match=message):
        xm_launch.parse_requirements(text)


def test_unknown_resource_is_reported(recorder, capsys):
    assert xm_launch.launch(tiny_runs("gs://b/s"), requirements="B200x=1") == 2
    assert "xmanager does not accept {'B200x': 1}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "resources, jax",
    [
        ({}, "jax"),
        ({"cpu": 4}, "jax"),
        ({"T4": 1, "cpu": 4}, "jax[cuda12]"),
        ({"v4": 8}, "jax[tpu]"),
    ],
)
def test_jax_build_follows_the_accelerator(resources, jax):
    assert xm_launch.jax_package(resources) == jax


def test_missing_xmanager_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "xmanager", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install xmanager \(or pip install -e '\.\[xm\]'"):
        xm_launch.launch(tiny_runs("/r"))
