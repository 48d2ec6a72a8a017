"""Tests for launch/sweep.py (print and local executors) and launch/xm_launch.py.

The local executor runs tests/fixtures/fake_trainer.py in place of micle_jax.main.
"""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from launch import sweep, sweep_spec, xm_launch
from launch.sweep_spec import Stage, product
from micle_jax import rundir

REPO = pathlib.Path(__file__).resolve().parents[1]
FAKE = [sys.executable, str(REPO / "tests" / "fixtures" / "fake_trainer.py")]
TINY = str(REPO / "tests" / "fixtures" / "tiny_sweep.py")


def _invocations(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "invocations.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(runs, parallel=1):
    out = io.StringIO()
    code = sweep.run_local(runs, FAKE, parallel=parallel, poll_s=0.02, out=out)
    return code, out.getvalue()


# ---------------------------------------------------------------- print executor


def test_print_executor_cli_works_without_the_configs(tmp_path):
    # configs/finetune_*.py etc. are not imported: printing needs only the sweep file.
    cmd = [
        sys.executable,
        "-m",
        "launch.sweep",
        "--sweep=configs/sweeps/label_efficiency.py",
        f"--root={tmp_path}",
        "--executor=print",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == 94
    assert all(c.startswith("python -m micle_jax.main --config=configs/") for c in commands)
    seen = set()
    for c in commands:  # every init checkpoint was written by an earlier command
        workdir = c.split("--workdir=")[1].split()[0]
        if "--config.init.checkpoint=" in c:
            assert c.split("--config.init.checkpoint=")[1].split()[0] in seen
        seen.add(workdir)
    assert not list(tmp_path.iterdir())  # printing writes nothing


# ---------------------------------------------------------------- local executor


def test_local_runs_everything_in_order_then_skips_finished(tmp_path):
    runs = sweep_spec.expand(sweep_spec.load_sweep(TINY), str(tmp_path))
    code, out = _run(runs, parallel=2)
    assert code == 0, out
    assert "done: 14/14 runs finished" in out
    for run in runs:
        calls = _invocations(run.workdir)
        # The fake trainer exits 3 ("early") if its init checkpoint had not finished.
        assert [c["outcome"] for c in calls] == ["finished"], run.name
        info = json.loads((pathlib.Path(run.workdir) / rundir.RUN_FILE).read_text())
        assert info["name"] == run.name and info["stage"] == run.stage
        assert info["params"] == run.params
        assert info["command"] == run.command(FAKE)
        assert "fake_trainer: " in (pathlib.Path(run.workdir) / sweep.LOG_FILE).read_text()
    code, out = _run(runs, parallel=2)
    assert code == 0 and "14 finished, 0 to resume, 0 to start" in out
    assert all(len(_invocations(r.workdir)) == 1 for r in runs)
    # The sweep file changed (another fixed override): finished runs are kept, with a warning.
    changed = sweep_spec.expand(sweep_spec.load_sweep(TINY + ":sleep=0.01"), str(tmp_path))
    code, out = _run(changed)
    assert code == 0 and out.count("finished with other arguments") == 14


def test_progress_eta_is_mean_run_time_times_runs_left_over_parallel():
    out = io.StringIO()
    progress = sweep._Progress(total=10, parallel=2, out=out)
    progress.done, progress.durations = 4, [10.0, 20.0]
    progress.report("finished x", left=4)
    assert out.getvalue().startswith("[4/10] finished x | elapsed 0:00:00, ETA 0:00:30")


def test_local_resumes_an_interrupted_run(tmp_path):
    runs = sweep_spec.expand(sweep_spec.load_sweep(TINY + ":crash"), str(tmp_path))
    code, out = _run(runs, parallel=2)
    log = os.path.join(tmp_path, "pre_simclr", sweep.LOG_FILE)
    assert code == 1
    assert (
        f"FAILED pre_simclr: exit code 1; last log line: 'fake_trainer: crashing at step 2'"
        f"\n  log: {log}" in out
    )
    dependants = [r for r in runs if r.depends_on == "pre_simclr"]
    assert len(dependants) == 4
    for r in dependants:
        assert f"NOT RUN {r.name}: needs pre_simclr" in out
        assert _invocations(r.workdir) == []
    code, out = _run(runs, parallel=2)
    assert code == 0, out
    assert "9 finished, 1 to resume, 4 to start" in out
    calls = _invocations(os.path.join(tmp_path, "pre_simclr"))
    # The rerun picked up the crashed run's own checkpoint (step 2), not step 0.
    assert [(c["outcome"], c["resumed_from"]) for c in calls] == [("crashed", 0), ("finished", 2)]
    assert all(len(_invocations(r.workdir)) == 1 for r in runs if r.name != "pre_simclr")


def test_local_failure_stops_only_its_dependants(tmp_path):
    runs = sweep_spec.expand(sweep_spec.load_sweep(TINY + ":fail"), str(tmp_path))
    code, out = _run(runs, parallel=3)
    assert code == 1
    assert "FAILED pre_micle: exit code 2: fake failure" in out
    assert out.count("NOT RUN ft_micle_") == 4
    finished = [r.name for r in runs if sweep.is_finished(r.workdir)]
    assert len(finished) == 9 and not any(n.endswith("micle") or "_micle_" in n for n in finished)


def test_local_runs_n_at_a_time(tmp_path):
    stage = Stage(
        name="s",
        run_name="r{i}",
        config="c.py",
        runs=product(i=[0, 1, 2]),
        # Long enough that a slow process start on a busy machine cannot break the overlap.
        fixed_overrides={"fake.sleep": 1.0, "fake.steps": 1},
    )

    def intervals(root, parallel):
        runs = sweep_spec.expand([stage], str(root))
        code, out = _run(runs, parallel=parallel)
        assert code == 0, out
        return sorted((c["start"], c["end"]) for r in runs for c in _invocations(r.workdir))

    together = intervals(tmp_path / "p3", 3)
    assert max(s for s, _ in together) < min(e for _, e in together)  # all overlapped
    alone = intervals(tmp_path / "p1", 1)
    assert all(alone[i][1] <= alone[i + 1][0] for i in range(2))  # one after another


def test_local_dry_run_starts_nothing(tmp_path):
    runs = sweep_spec.expand(sweep_spec.load_sweep(TINY), str(tmp_path / "root"))
    out = io.StringIO()
    assert sweep.run_local(runs, FAKE, dry_run=True, out=out) == 0
    assert out.getvalue().count("would start") == 14
    assert not (tmp_path / "root").exists()


def test_local_cli_with_command_prefix(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "launch.sweep",
        f"--sweep={TINY}:fail",
        f"--root={tmp_path}",
        "--parallel=4",
        "--command_prefix=" + " ".join(FAKE),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "done: 9/14 runs finished" in result.stdout
    assert "ETA" in result.stdout


def test_sigterm_to_the_launcher_stops_its_runs_and_a_rerun_resumes_them(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "launch.sweep",
        f"--sweep={TINY}:sleep=2",
        f"--root={tmp_path}",
        "--parallel=2",
        "--command_prefix=" + " ".join(FAKE),
    ]
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    pid_files = [tmp_path / "pre_simclr" / "pid", tmp_path / "pre_micle" / "pid"]
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text() for p in pid_files):
        assert time.monotonic() < deadline and launcher.poll() is None, "runs did not start"
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, out
    assert "stopping 2 runs" in out
    for pid_file in pid_files:  # the runs were stopped and reaped, not left orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
    runs = sweep_spec.expand(sweep_spec.load_sweep(TINY), str(tmp_path))
    out = io.StringIO()
    sweep.run_local(runs, FAKE, dry_run=True, out=out)
    assert "0 finished, 2 to resume, 12 to start" in out.getvalue()


# ---------------------------------------------------------------- xmanager


def test_xmanager_levels_and_import_guard():
    runs = sweep_spec.expand(sweep_spec.load_sweep(TINY), "/r")
    levels = xm_launch.dependency_levels(runs)
    assert [len(level) for level in levels] == [6, 8]  # 2 pre + 4 scratch, then 8 fine-tunes
    try:
        import xmanager  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install xmanager"):
            xm_launch.launch(runs)
