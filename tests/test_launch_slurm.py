"""Tests for launch/slurm: the sbatch script, JAX's SLURM detection, the task, requeue.

No SLURM here: the sbatch script is built by submitit's own SLURM executor
without submitting, and jobs run through submitit's LocalExecutor, with a
stand-in trainer (a few lines of Python, the real run_status.json protocol)
in place of `python -m micle_jax.main`.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import submitit

from launch.slurm import cli, task
from micle_jax import rundir

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/micle_medical.py:records=/shared/data/cxr,arch=r50x1"

FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from micle_jax import rundir
    args = sys.argv[1:]
    opt = lambda k, d=None: next((a.split("=", 1)[1] for a in args if a.startswith(k + "=")), d)
    workdir, steps = opt("--workdir"), int(opt("--steps", 3))
    os.makedirs(workdir, exist_ok=True)
    ckpt = os.path.join(workdir, "ckpt")
    start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    with open(os.path.join(workdir, "invocations.jsonl"), "a") as f:
        f.write(json.dumps({"args": args, "start": start, "pid": os.getpid()}) + "\\n")
    step = start  # the handler may run before the loop's first step
    def stop(signum, frame):
        rundir.write_status(workdir, "preempted", step=step)
        print(f"SIGTERM at step {step}: checkpoint saved", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    for step in range(start, steps):
        with open(ckpt, "w") as f:
            f.write(str(step))
        time.sleep(0.2 if start == 0 else 0.0)  # a resumed run is quick
    if opt("--fail"):
        sys.exit(3)
    rundir.write_status(workdir, "finished", step=steps)
    """
)


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    """A 'python' that runs FAKE_TRAINER for `-m micle_jax.main`; tasks can import the repo."""
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    shim = tmp_path / "python"
    shim.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = -m ] && [ "$2" = micle_jax.main ]; then shift 2; '
        f'exec {sys.executable} {tmp_path / "fake_trainer.py"} "$@"; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    shim.chmod(0o755)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return str(shim)


def invocations(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "invocations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def options(**overrides) -> cli.Options:
    values = dict(config=CONFIG, workdir="/shared/me/runs/micle")
    return cli.Options(**{**values, **overrides})


# ------------------------------------------------------------------ the sbatch script


def sbatch_lines(script: str) -> dict[str, str]:
    lines = [line.split("#SBATCH --", 1)[1] for line in script.splitlines() if "#SBATCH" in line]
    return dict(line.partition("=")[::2] for line in lines)


def test_sbatch_one_node_eight_gpus_is_one_task_per_gpu():
    script = cli.sbatch_script(options(partition="gpu", time_min=600))
    flags = sbatch_lines(script)
    assert flags["nodes"] == "1"
    assert flags["ntasks-per-node"] == "8" and flags["gpus-per-node"] == "8"
    # --gpus-per-task would hide the other GPUs from each task, and JAX picks the
    # GPU of SLURM_LOCALID among the visible ones.
    assert "gpus-per-task" not in flags
    assert flags["signal"] == "USR2@120"  # time to checkpoint before the limit
    assert "requeue" in flags and flags["time"] == "600" and flags["partition"] == "gpu"
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1
    assert srun[0].endswith(
        f"{sys.executable} -u -m submitit.core._submit /shared/me/runs/micle/slurm"
    )


def test_sbatch_two_nodes_eight_gpus():
    script = cli.sbatch_script(options(nodes=2, account="proj", setup=["module load cuda/12.4"]))
    flags = sbatch_lines(script)
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("2", "8", "8")
    assert flags["account"] == "proj"
    assert script.index("module load cuda/12.4") < script.index("srun ")


def test_cli_dry_run_prints_the_script_and_the_task_command():
    cmd = [
        sys.executable, "-m", "launch.slurm", "--nodes=2", "--gpus_per_node=8",
        f"--config={CONFIG}", "--workdir=/shared/me/runs/micle", "--dry_run",
        "--", "--config.batch_size=4096",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=2" in result.stdout
    assert "# each of the 16 task(s) runs" in result.stdout
    assert (
        f"-m micle_jax.main --config={CONFIG} --workdir=/shared/me/runs/micle "
        "--config.batch_size=4096\n"
    ) in result.stdout
    assert not pathlib.Path("/shared/me/runs/micle").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(workdir="runs/micle"), "absolute path on a filesystem every node mounts"),
        (dict(config="configs/nope.py"), "configs/nope.py is not a file of this checkout"),
        (dict(executor="local", nodes=2), "--executor=local runs on this machine only"),
        (dict(nodes=0), "need at least 1 node"),
        (dict(time_min=1), "leaves no time before the requeue signal"),
        (dict(extra=["--process_id=3"]), "JAX finds its peers from the SLURM environment"),
        (dict(extra=["oops"]), "trainer flags go after `--`"),
    ],
)
def test_cli_errors_name_the_problem_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        cli.check(options(**overrides))


def test_submitting_without_slurm_says_what_to_do(capsys, monkeypatch):
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: -1))  # no srun
    assert cli.execute(options()) == 2
    assert "run this on a SLURM login node" in capsys.readouterr().err


# ------------------------------------------------------------------ JAX's SLURM detection


def test_jax_finds_its_peers_from_the_slurm_environment(monkeypatch):
    from jax._src import clusters

    slurm = dict(
        SLURM_JOB_ID="4242",
        SLURM_STEP_NODELIST="gpu[017-018]",
        SLURM_NTASKS="16",
        SLURM_PROCID="13",
        SLURM_LOCALID="5",
    )
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, None
    )
    address, count, index, devices = detected
    assert address.startswith("gpu017:") and (count, index, list(devices)) == (16, 13, [5])

    class Slurm:  # what submitit.JobEnvironment() says in that task
        cluster, num_tasks, global_rank, job_id = "slurm", 16, 13, "4242"

    command = task.TrainerTask(["--config=c.py"], "/w", "/repo", "py").command(Slurm())
    assert command == ["py", "-m", "micle_jax.main", "--config=c.py"]  # JAX detects the rest


# ------------------------------------------------------------------ jobs on the LocalExecutor


def local_executor(o: cli.Options, timeout_s: float, signal_delay_s: int):
    executor = cli.make_executor(o)
    executor.update_parameters(timeout_min=timeout_s / 60, signal_delay_s=signal_delay_s)
    return executor


def test_two_local_tasks_run_the_same_command_as_two_processes(tmp_path, fake_python):
    workdir = tmp_path / "run"
    o = cli.Options(
        config=CONFIG, workdir=str(workdir), executor="local", gpus_per_node=2,
        python=fake_python, extra=["--steps=2"],
    )  # fmt: skip
    job = local_executor(o, timeout_s=60, signal_delay_s=5).submit(cli.make_task(o))
    assert job.results() == [0, 0]
    calls = sorted(invocations(workdir), key=lambda c: c["args"][-1])
    assert len(calls) == 2
    base = [f"--config={CONFIG}", f"--workdir={workdir}", "--steps=2"]
    coordinator = calls[0]["args"][len(base)]
    assert coordinator.startswith("--coordinator_address=127.0.0.1:")
    for i, call in enumerate(calls):
        assert call["args"] == [*base, coordinator, "--num_processes=2", f"--process_id={i}"]


def test_requeue_on_time_limit_resumes_from_the_checkpoint(tmp_path, fake_python):
    workdir = tmp_path / "run"
    o = cli.Options(
        config=CONFIG, workdir=str(workdir), executor="local", gpus_per_node=0,
        python=fake_python, extra=["--steps=60"], max_requeues=2,
    )  # fmt: skip
    # USR2 after 3 s (the time limit minus the signal delay), as SLURM's --signal.
    job = local_executor(o, timeout_s=9, signal_delay_s=6).submit(cli.make_task(o))
    assert job.result() == 0, job.stdout()
    first, second = invocations(workdir)
    assert first["args"] == second["args"]  # the same command ...
    assert first["start"] == 0 and second["start"] > 0  # ... resumed from its checkpoint
    assert rundir.read_status(str(workdir))["status"] == "finished"
    log = job.stdout()
    assert "stopping the trainer (SIGTERM) to checkpoint" in log
    assert "checkpoint saved" in log


def test_a_failing_trainer_fails_the_job_with_its_exit_code(tmp_path, fake_python):
    o = cli.Options(
        config=CONFIG, workdir=str(tmp_path / "run"), executor="local", gpus_per_node=0,
        python=fake_python, extra=["--steps=1", "--fail=1"],
    )  # fmt: skip
    job = local_executor(o, timeout_s=60, signal_delay_s=5).submit(cli.make_task(o))
    with pytest.raises(submitit.core.utils.FailedJobError, match="exited with code 3"):
        job.result()
    assert len(invocations(tmp_path / "run")) == 1  # not requeued


# ------------------------------------------------------------------ the task's signals


def test_the_trainer_survives_usr2_and_checkpoints_on_sigterm(tmp_path, fake_python):
    workdir = tmp_path / "run"
    trainer = task.TrainerTask([f"--workdir={workdir}", "--steps=200"], str(workdir), str(REPO),
                               fake_python)  # fmt: skip

    class Alone:
        cluster, num_tasks = "local", 1

    proc = trainer.start(Alone())
    deadline = time.monotonic() + 20
    while not invocations(workdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    # SLURM's USR2 reaches every process of the step: the trainer must not die of it.
    os.kill(proc.pid, signal.SIGUSR2)
    time.sleep(0.3)
    assert proc.poll() is None
    resubmission = trainer.__submitit_checkpoint__()
    assert proc.returncode == 0  # stopped by SIGTERM after saving
    assert rundir.read_status(str(workdir))["status"] == "preempted"
    again = resubmission.function
    assert isinstance(again, task.TrainerTask) and again.args == trainer.args
    assert again.cwd == str(REPO) and again.python == fake_python


@pytest.mark.slow
def test_a_real_training_runs_through_the_local_executor(tmp_path, monkeypatch):
    # The real `python -m micle_jax.main` (a 2-step tiny config), through submitit.
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    workdir = tmp_path / "run"
    o = cli.Options(
        config="tests/fixtures/tiny_pretrain.py:steps=2",
        workdir=str(workdir),
        executor="local",
        gpus_per_node=0,
    )
    job = local_executor(o, timeout_s=600, signal_delay_s=30).submit(cli.make_task(o))
    assert job.result() == 0, job.stdout()
    assert rundir.read_status(str(workdir))["status"] == "finished"
