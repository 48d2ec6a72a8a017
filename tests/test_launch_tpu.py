"""Tests for launch/tpu: slice types, gcloud commands, the run's life, the CLI's errors.

No gcloud runs: `FakeCloud` stands in for the Cloud TPU API behind the
launcher's runner interface (describe answers READY / PREEMPTED / NOT_FOUND,
queued resources WAITING_FOR_RESOURCES / ACTIVE / SUSPENDED / FAILED, ssh
answers exit codes). The worker scripts themselves run for real in bash,
with a stand-in trainer, in a temporary home folder.
"""

import io
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from launch.tpu import accelerators, cli, gcloud, lifecycle, remote

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/micle_medical.py:records=gs://b/cxr,arch=r50x1"
WORKDIR = "gs://b/runs/micle"


# ------------------------------------------------------------------ slice types


@pytest.mark.parametrize(
    "name, hosts, runtime",
    [
        ("v4-8", 1, "tpu-ubuntu2204-base"),
        ("v4-32", 4, "tpu-ubuntu2204-base"),
        ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
        ("v5litepod-256", 64, "v2-alpha-tpuv5-lite"),
        ("v5p-8", 1, "v2-alpha-tpuv5"),
        ("v5p-32", 4, "v2-alpha-tpuv5"),
        ("v6e-4", 1, "v2-alpha-tpuv6e"),
        ("v6e-16", 4, "v2-alpha-tpuv6e"),
    ],
)
def test_slice_hosts_and_runtime_per_generation(name, hosts, runtime):
    tpu = accelerators.parse(name)
    assert (tpu.name, tpu.hosts, tpu.runtime_version) == (name, hosts, runtime)
    assert tpu.multi_host == (hosts > 1)


@pytest.mark.parametrize(
    "name, message",
    [
        ("v9-8", "unknown TPU generation 'v9'; supported: v4-N, v5p-N, v5litepod-N, v6e-N"),
        ("v4-12", "v4 has no slice of 12 TensorCores"),
        ("v6e-2", "must be 1, 4, 8, 16, 32, 64, 128, 256"),
        ("v5e-8", "gcloud calls this type v5litepod-8; use --tpu=v5litepod-8"),
        ("tpu", "is not a TPU accelerator type"),
    ],
)
def test_unknown_slice_types_are_named(name, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        accelerators.parse(name)


# ------------------------------------------------------------------ a fake cloud


class FakeCloud:
    """Answers gcloud commands as the TPU API would; records every command.

    `creating`: the states a new slice goes through before READY / ACTIVE.
    `outcomes`: what happens to each started trainer while it is followed:
      'finish' (exit 0, status finished), 'preempt' (the slice is PREEMPTED or,
      queued, SUSPENDED), 'sigterm' (status preempted, the slice stays READY),
      'fail' (status failed), 'crash' (exit 139, no status), 'drop' (the ssh
      connection drops, the trainer keeps running).
    """

    def __init__(self, outcomes=("finish",), creating=("CREATING",), queued=False):
        self.outcomes = list(outcomes)
        self.creating = list(creating)
        self.queued = queued
        self.commands = []
        self.pending = []  # states the slice still goes through
        self.state = None  # None: absent
        self.trainer = remote.RunState("absent")
        self.fail_state = None  # a FAILED queued resource's outcome, when set

    def __call__(self, command, capture=False):
        self.commands.append(list(command))
        verb = command[4]
        if verb == "describe":
            if self.pending and "--format=yaml(state)" not in command:
                self.state = self.pending.pop(0)
            if self.state is None:
                return gcloud.Result(1, "", "ERROR: NOT_FOUND: tpu not found")
            if "--format=yaml(state)" in command:
                return gcloud.Result(0, "state: FAILED\nfailedData: {error: quota}")
            return gcloud.Result(0, self.state + "\n")
        if verb == "create":
            ready = "ACTIVE" if self.queued else "READY"
            self.pending = [*self.creating, ready]
            self.state = self.pending[0]
            return gcloud.Result(0)
        if verb == "delete":
            self.state, self.pending = None, []
            self.trainer = remote.RunState("absent")
            return gcloud.Result(0)
        if verb == "scp":
            return gcloud.Result(0)
        script = command[-1]
        kind = ssh_kind(script)
        if kind == "probe":
            return gcloud.Result(0, "Warning: banner\n" + remote.probe_answer(self.trainer))
        if kind == "start":
            self.trainer = remote.RunState("running")
        if kind == "follow":
            return self._follow()
        return gcloud.Result(0)

    def _follow(self):
        outcome = self.outcomes.pop(0)
        if outcome == "finish":
            self.trainer = remote.RunState("exited", 0, {"status": "finished", "step": 10})
        elif outcome == "preempt":
            self.state = "SUSPENDED" if self.queued else "PREEMPTED"
            return gcloud.Result(255)
        elif outcome == "sigterm":
            self.trainer = remote.RunState("exited", 0, {"status": "preempted", "step": 4})
        elif outcome == "fail":
            status = {"status": "failed", "step": 7, "error": "loss is nan at step 7"}
            self.trainer = remote.RunState("exited", 1, status)
        elif outcome == "crash":
            self.trainer = remote.RunState("exited", 139, {"status": "running"})
        elif outcome == "drop":
            return gcloud.Result(255)
        return gcloud.Result(0)


def ssh_kind(script: str) -> str:
    for kind, mark in [
        ("install", "uv"),
        ("start", "nohup setsid"),
        ("follow", "tail -n +1"),
        ("probe", "process=running"),
        ("stop", "pkill -TERM"),
    ]:
        if mark in script:
            return kind
    raise AssertionError(f"unknown script {script}")


def labels(commands) -> list[str]:
    """Each command as a short label: 'create', 'describe', 'ssh:start@all', ..."""
    out = []
    for c in commands:
        if c[4] == "ssh":
            worker = next(a for a in c if a.startswith("--worker="))[len("--worker=") :]
            out.append(f"ssh:{ssh_kind(c[-1])}@{worker}")
        else:
            out.append(c[4])
    return out


def options(**overrides) -> cli.Options:
    values = dict(name="micle", zone="us-central2-b", tpu="v4-32", config=CONFIG, workdir=WORKDIR)
    return cli.Options(**{**values, **overrides})


def launch(fake, max_restarts=3, delete_after=True, **overrides):
    cloud, job = cli.build(options(**overrides), runner=fake)
    out = io.StringIO()
    run = lifecycle.TpuRun(cloud, job, max_restarts=max_restarts, sleep=lambda s: None, out=out)
    try:
        run.run(delete_after=delete_after)
    finally:
        fake.log = out.getvalue()
    return run


# ------------------------------------------------------------------ exact commands


def test_single_host_v4_8_commands():
    fake = FakeCloud()
    launch(fake, tpu="v4-8", name="micle-v4", extra=["--config.batch_size=64"])
    where = ["--zone=us-central2-b"]
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    args = [f"--config={CONFIG}", f"--workdir={WORKDIR}", "--config.batch_size=64"]
    describe = [*vm, "describe", "micle-v4", *where, "--format=value(state)"]

    def ssh(script):  # one host: every script runs on worker 0
        return [*vm, "ssh", "micle-v4", *where, "--worker=0", "--command=" + script]

    probe = ssh(remote.probe_script(WORKDIR))
    archive = os.path.join(tempfile.gettempdir(), "micle_jax_src.tar.gz")
    create = [*vm, "create", "micle-v4", *where, "--accelerator-type=v4-8"]
    assert fake.commands == [
        describe,
        [*create, "--version=tpu-ubuntu2204-base"],
        describe,  # CREATING
        describe,  # READY
        probe,
        [*vm, "scp", archive, "micle-v4:micle_jax_src.tar.gz", *where, "--worker=0"],
        ssh(remote.install_script()),
        ssh(remote.start_script(WORKDIR, args, {})),
        ssh(remote.follow_script(WORKDIR)),
        describe,
        probe,
        [*vm, "delete", "micle-v4", *where, "--quiet"],
    ]


def test_single_host_v5e_uses_its_runtime_and_spot():
    fake = FakeCloud()
    launch(fake, tpu="v5litepod-8", spot=True, project="my-proj", zone="us-west4-a")
    create = fake.commands[1]
    assert create == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "micle", "--zone=us-west4-a",
        "--project=my-proj", "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite",
        "--spot",
    ]  # fmt: skip
    assert all("--project=my-proj" in c for c in fake.commands)
    assert "--worker=all" not in sum(fake.commands, [])
    assert "--num_processes" not in fake.commands[7][-1]  # one host: one process


def test_pod_slice_v4_32_runs_on_every_worker_and_follows_worker_0():
    fake = FakeCloud()
    launch(fake, tpu="v4-32")
    assert fake.commands[1][5:] == [
        "micle",
        "--zone=us-central2-b",
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
    ]
    assert labels(fake.commands) == [
        "describe", "create", "describe", "describe", "ssh:probe@0", "scp",
        "ssh:install@all", "ssh:start@all", "ssh:follow@0", "describe", "ssh:probe@0", "delete",
    ]  # fmt: skip
    assert fake.commands[5][-1] == "--worker=all"  # the code goes to all 4 hosts
    start = fake.commands[7][-1]
    # --num_processes makes micle_jax.main call jax.distributed.initialize(); JAX finds
    # the coordinator and each host's index in the TPU VM metadata.
    assert f"--workdir={WORKDIR} --num_processes=4 " in start
    assert "installing micle_jax on 4 worker(s)" in fake.log


def test_git_source_clones_instead_of_copying():
    fake = FakeCloud()
    launch(fake, source="https://github.com/me/micle_jax.git", git_ref="v0.1")
    assert "scp" not in labels(fake.commands)
    install = next(c[-1] for c in fake.commands if c[4] == "ssh" and ssh_kind(c[-1]) == "install")
    assert "git clone --quiet https://github.com/me/micle_jax.git $HOME/micle_jax" in install
    assert "checkout --quiet v0.1" in install


# ------------------------------------------------------------------ resume after preemption


def test_preempted_mid_run_is_recreated_and_resumed_with_the_same_workdir():
    fake = FakeCloud(outcomes=["preempt", "finish"])
    run = launch(fake, spot=True)
    assert labels(fake.commands) == [
        "describe", "create", "describe", "describe", "ssh:probe@0", "scp", "ssh:install@all",
        "ssh:start@all", "ssh:follow@0",
        "describe",  # PREEMPTED
        "describe", "delete", "describe", "create", "describe", "describe",  # recreate
        "ssh:probe@0", "scp", "ssh:install@all", "ssh:start@all", "ssh:follow@0",
        "describe", "ssh:probe@0", "delete",
    ]  # fmt: skip
    starts = [c[-1] for c in fake.commands if c[4] == "ssh" and ssh_kind(c[-1]) == "start"]
    assert len(starts) == 2 and starts[0] == starts[1]  # same command, same --workdir
    assert f"--workdir={WORKDIR}" in starts[1]
    assert [c for c in fake.commands if c[4] == "create"][1] == fake.commands[1]
    assert run.restarts == 1
    assert "TPU micle is PREEMPTED (preempted): recovery 1/3" in fake.log


def test_queued_spot_slice_waits_then_resumes_after_suspension():
    fake = FakeCloud(
        outcomes=["preempt", "finish"],
        creating=["ACCEPTED", "WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING"],
        queued=True,
    )
    run = launch(fake, queued=True, spot=True, tpu="v5litepod-16", zone="us-west4-a")
    creates = [c for c in fake.commands if c[4] == "create"]
    assert creates[0] == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "micle", "--zone=us-west4-a",
        "--node-id=micle", "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
    ]  # fmt: skip
    assert len(creates) == 2
    deletes = [c for c in fake.commands if c[4] == "delete"]
    assert deletes[0][3:] == ["queued-resources", "delete", "micle", "--zone=us-west4-a",
                              "--quiet", "--force"]  # fmt: skip
    describes = [c for c in fake.commands if c[4] == "describe"]
    assert all(
        c[3] == "queued-resources" and c[-1] == "--format=value(state.state)" for c in describes
    )
    assert all(c[3] == "tpu-vm" for c in fake.commands if c[4] == "ssh")
    for state in ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "SUSPENDED"]:
        assert f"queued resource micle: {state}" in fake.log
    assert run.restarts == 1


def test_trainer_stopped_by_sigterm_on_a_ready_slice_is_restarted_in_place():
    fake = FakeCloud(outcomes=["sigterm", "finish"])
    launch(fake)
    got = labels(fake.commands)
    assert got.count("create") == 1 and got.count("ssh:install@all") == 1
    assert got.count("ssh:start@all") == 2


def test_dropped_ssh_reattaches_without_a_second_start():
    fake = FakeCloud(outcomes=["drop", "finish"])
    launch(fake)
    got = labels(fake.commands)
    assert got.count("ssh:start@all") == 1 and got.count("ssh:follow@0") == 2
    assert "reattaching" in fake.log


def test_preemption_retries_are_bounded():
    fake = FakeCloud(outcomes=["preempt"] * 10)
    with pytest.raises(gcloud.LaunchError, match="already recovered 2 times.*--max_restarts=2"):
        launch(fake, max_restarts=2, spot=True)
    assert labels(fake.commands).count("create") == 3


def test_a_failed_trainer_is_not_retried_and_the_error_names_it():
    fake = FakeCloud(outcomes=["fail", "finish"])
    with pytest.raises(gcloud.LaunchError, match="failed at step 7: loss is nan at step 7"):
        launch(fake)
    assert labels(fake.commands).count("ssh:start@all") == 1
    assert "delete" not in labels(fake.commands)  # kept, to look at


def test_a_crashed_trainer_names_its_exit_code_and_log():
    fake = FakeCloud(outcomes=["crash", "finish"])
    with pytest.raises(gcloud.LaunchError, match="exited with code 139 on worker 0.*not retried"):
        launch(fake)
    assert labels(fake.commands).count("ssh:start@all") == 1


def test_a_failed_queued_resource_is_not_retried():
    fake = FakeCloud(creating=["WAITING_FOR_RESOURCES", "FAILED"], queued=True)
    with pytest.raises(gcloud.LaunchError, match="queued resource micle is FAILED.*quota"):
        launch(fake, queued=True)
    assert labels(fake.commands).count("create") == 1


def test_an_already_finished_run_is_not_started_again():
    fake = FakeCloud()
    fake.state = "READY"
    fake.trainer = remote.RunState("exited", 0, {"status": "finished"})
    launch(fake)
    assert labels(fake.commands) == ["describe", "ssh:probe@0", "delete"]


def test_gcloud_errors_are_reported_with_the_fix():
    def broken(command, capture=False):
        return gcloud.Result(1, "", "ERROR: (gcloud) PERMISSION_DENIED: tpu.nodes.get")

    with pytest.raises(gcloud.LaunchError, match="PERMISSION_DENIED.*gcloud auth list"):
        launch(broken)


# ------------------------------------------------------------------ the CLI


def run_cli(*args):
    cmd = [sys.executable, "-m", "launch.tpu", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_dry_run_prints_the_pod_slice_commands_and_runs_nothing():
    result = run_cli(
        "--name=micle-v4", "--zone=us-central2-b", "--tpu=v4-32", f"--config={CONFIG}",
        f"--workdir={WORKDIR}", "--dry_run", "--", "--config.batch_size=4096",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    gcloud_lines = [line for line in lines if line.startswith("gcloud ")]
    assert gcloud_lines[1] == (
        "gcloud compute tpus tpu-vm create micle-v4 --zone=us-central2-b "
        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
    )
    start = next(line for line in gcloud_lines if "micle_jax.main" in line)
    assert "--worker=all" in start and "--config.batch_size=4096" in start
    assert gcloud_lines[-1] == (
        "gcloud compute tpus tpu-vm delete micle-v4 --zone=us-central2-b --quiet"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tpu="v4-7"), "v4 has no slice of 7 TensorCores"),
        (dict(workdir="/tmp/run"), "v4-32 has 4 hosts.*--workdir=gs://BUCKET/PATH"),
        (dict(tpu="v4-8", workdir="/tmp/run", spot=True), "lost when the VM is preempted.*--spot"),
        (dict(zone=""), "--zone required"),
        (dict(name="Micle_1"), "a TPU name is lowercase letters"),
        (dict(zone="us-central2"), "is not a zone"),
        (dict(config="configs/nope.py"), "configs/nope.py is not a file of this checkout"),
        (dict(env=["TFDS_DATA_DIR"]), "write NAME=VALUE"),
        (dict(extra=["--workdir=gs://x"]), "the launcher sets it"),
        (dict(extra=["positional"]), "trainer flags go after `--`"),
    ],
)
def test_cli_errors_name_the_problem_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        cli.build(options(**overrides), runner=FakeCloud())


def test_cli_reports_bad_flags_with_exit_code_2():
    result = run_cli("--name=m", "--zone=us-central2-b", "--tpu=v4-32", f"--config={CONFIG}",
                     "--workdir=/home/me/run", "--dry_run")  # fmt: skip
    assert result.returncode == 2
    assert "launch.tpu: error: --workdir=/home/me/run: v4-32 has 4 hosts" in result.stderr
    assert "gcloud" not in result.stdout


# ------------------------------------------------------------------ the worker scripts, in bash

FAKE_TRAINER = textwrap.dedent(
    """
    import signal, sys, time
    from micle_jax import rundir
    workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
    steps = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--steps=")), 3))
    def stop(signum, frame):
        print("SIGTERM: checkpoint saved", flush=True)
        rundir.write_status(workdir, "preempted", step=1)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    rundir.write_status(workdir, "running", step=0)  # the handler is in place
    for step in range(steps):
        print(f"step {step}", flush=True)
        time.sleep(0.2)
    rundir.write_status(workdir, "finished", step=steps)
    """
)


@pytest.fixture
def worker_home(tmp_path):
    """A fake worker's home folder: ~/micle_jax and a venv python that runs FAKE_TRAINER."""
    home = tmp_path / "home"
    (home / "micle_jax").mkdir(parents=True)
    (home / "micle_jax" / "micle_jax").symlink_to(REPO / "micle_jax")
    (home / "fake_trainer.py").write_text(FAKE_TRAINER)
    python = home / "micle_jax_venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = -m ] && [ "$2" = micle_jax.main ]; then shift 2; '
        f'exec {sys.executable} "$HOME/fake_trainer.py" "$@"; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    return home


def bash(home, script, timeout=30):
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(home / "micle_jax")}
    return subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )


def wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_worker_scripts_start_follow_probe_and_stop_in_bash(worker_home, tmp_path):
    workdir = str(tmp_path / "run")
    probe = lambda: remote.parse_probe(bash(worker_home, remote.probe_script(workdir)).stdout)  # noqa: E731
    assert probe().process == "absent"

    # A long run, stopped: SIGTERM reaches the trainer, which records 'preempted'.
    args = [f"--config={CONFIG}", f"--workdir={workdir}", "--steps=200"]
    assert "started" in bash(worker_home, remote.start_script(workdir, args, {"A": "1 2"})).stdout
    # Stopped once its SIGTERM handler is in place (before, a loaded machine's
    # slow interpreter start would turn the stop into a plain kill, exit 143).
    assert wait_for(lambda: (probe().status or {}).get("status") == "running")
    assert probe().process == "running"
    again = bash(worker_home, remote.start_script(workdir, args, {}))
    assert "already running" in again.stdout  # a rerun does not start a second trainer
    assert "stopping" in bash(worker_home, remote.stop_script(workdir)).stdout
    assert wait_for(lambda: probe().process == "exited")
    assert probe() == remote.RunState("exited", 0, {"status": "preempted", "step": 1})

    # A short run, followed to its end: follow returns when the trainer exits.
    args = [f"--config={CONFIG}", f"--workdir={workdir}", "--steps=3"]
    bash(worker_home, remote.start_script(workdir, args, {}))
    followed = bash(worker_home, remote.follow_script(workdir))
    assert followed.returncode == 0
    assert "SIGTERM: checkpoint saved" in followed.stdout  # the log keeps the first run
    assert followed.stdout.rstrip().endswith("step 2")
    assert probe() == remote.RunState("exited", 0, {"status": "finished", "step": 3})


def test_worker_scripts_are_valid_bash():
    for script in [
        remote.install_script(),
        remote.install_script("https://github.com/me/micle_jax.git", "main"),
        remote.start_script(WORKDIR, ["--config=c.py:a=1,b='x y'"], {"K": "v w"}),
    ]:
        result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_pack_checkout_holds_the_code_and_the_configs(tmp_path):
    import tarfile

    archive = tmp_path / "src.tar.gz"
    count = remote.pack_checkout(str(REPO), str(archive))
    names = tarfile.open(archive).getnames()
    assert count == len(names)
    assert {"setup.py", "micle_jax/main.py", "configs/micle_medical.py"} <= set(names)
    assert not any(n.startswith((".venv/", ".git/")) for n in names)
