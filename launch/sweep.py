r"""Runs a sweep: every run of a sweep file, in dependency order.

    python -m launch.sweep --sweep=configs/sweeps/label_efficiency.py:task=derm \
      --root=workdirs/label_efficiency --executor=local --parallel=2

Executors:
  local     runs here, `--parallel` at a time, as subprocesses. Skips runs whose
            run_status.json says finished, reruns (so resumes) the others,
            streams each run's output to ROOT/<run>/log.txt, prints progress and
            an ETA, skips the dependants of a failed run and lists the failures
            (with their logs) at the end; exit code 1 if any run failed. With
            one accelerator keep --parallel=1: each JAX process takes most of
            the accelerator's memory.
  print     prints the commands in dependency order, one per line, for any
            scheduler (`... --executor=print | bash` runs them one by one).
  xmanager  launches them with XManager (launch/xm_launch.py).

Before starting a run the local executor writes ROOT/<run>/sweep_run.json
({"name", "stage", "params", "command", "depends_on"}); `python -m
micle_jax.report --root=ROOT` reads it to label the run's results.

ROOT may be a gs:// URL (micle_jax/fs.py): the runs write their workdirs
there. A run's output still streams to a local file (a subprocess writes to a
local file descriptor), URL_LOG_ROOT/<scheme>/<bucket>/<path>/<run>/log.txt,
which is copied to ROOT/<run>/log.txt when the run ends.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from absl import app, flags

from launch import sweep_spec, xm_launch
from micle_jax import fs, rundir

LOG_FILE = "log.txt"
# Where the runs of a sweep on a URL root log while they run (see the docstring).
URL_LOG_ROOT = os.path.join(tempfile.gettempdir(), "micle_jax_sweep_logs")
PRINT_PREFIX = ("python", "-m", "micle_jax.main")
FLAGS = flags.FLAGS


def is_finished(workdir: str) -> bool:
    """Whether the run in `workdir` has finished (its trainer wrote status 'finished')."""
    return (rundir.read_status(workdir) or {}).get("status") == "finished"


def write_run_file(run: sweep_spec.Run, command: Sequence[str]) -> None:
    """Atomically writes ROOT/<run>/sweep_run.json, the run's identity for the report."""
    fs.makedirs(run.workdir)
    data = dict(
        name=run.name,
        stage=run.stage,
        params=run.params,
        command=list(command),
        depends_on=run.depends_on,
    )
    if run.tuned:
        data["tune"] = dict(params=list(run.tuned), select=run.select)
    rundir.write_json_atomic(os.path.join(run.workdir, rundir.RUN_FILE), data)


def print_commands(runs: Sequence[sweep_spec.Run], prefix: Sequence[str], out: TextIO) -> None:
    """Prints every run's command in dependency order, with a comment line before each."""
    ordered = sweep_spec.dependency_order(runs)
    out.write(f"# {len(ordered)} runs in dependency order\n")
    for run in ordered:
        after = f" (after {run.depends_on})" if run.depends_on else ""
        out.write(f"# [{run.stage}] {run.name}{after}\n{shlex.join(run.command(prefix))}\n")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """Counts and the ETA line: ETA = mean run time so far x runs left / parallel."""

    def __init__(self, total: int, parallel: int, out: TextIO):
        self.total, self.parallel, self.out = total, parallel, out
        self.start = time.monotonic()
        self.done = 0
        self.durations: list[float] = []

    def report(self, message: str, left: int) -> None:
        elapsed = time.monotonic() - self.start
        if self.durations and left:
            mean = sum(self.durations) / len(self.durations)
            eta = _clock(mean * left / self.parallel)
        else:
            eta = "0:00:00" if not left else "unknown until a run ends"
        self.out.write(
            f"[{self.done}/{self.total}] {message} | elapsed {_clock(elapsed)}, ETA {eta}\n"
        )
        self.out.flush()


def run_local(
    runs: Sequence[sweep_spec.Run],
    prefix: Sequence[str],
    parallel: int = 1,
    dry_run: bool = False,
    poll_s: float = 0.5,
    out: TextIO = sys.stdout,
) -> int:
    """Runs the sweep on this machine; returns the exit code (0: every run finished).

    Args:
      runs: the expanded runs (any order; they start in dependency order).
      prefix: the command before each run's arguments (`python -m micle_jax.main`).
      parallel: how many runs at the same time.
      dry_run: only print what would be skipped, resumed and started.
      poll_s: seconds between checks of the running subprocesses.
      out: where progress goes.
    """
    if parallel < 1:
        raise ValueError(f"--parallel={parallel}: must be at least 1")
    ordered = sweep_spec.dependency_order(runs)
    finished = {r.name for r in ordered if is_finished(r.workdir)}
    pending = [r for r in ordered if r.name not in finished]
    resumed = {r.name for r in pending if rundir.read_status(r.workdir) or _has_log(r)}
    out.write(
        f"sweep: {len(ordered)} runs: {len(finished)} finished, {len(resumed)} to resume, "
        f"{len(pending) - len(resumed)} to start; {parallel} at a time\n"
    )
    for run in ordered:
        if run.name in finished:
            _warn_if_changed(run, out)
    if dry_run:
        for run in pending:
            verb = "resume" if run.name in resumed else "start"
            out.write(f"would {verb} {run.name}: {shlex.join(run.command(prefix))}\n")
        return 0

    progress = _Progress(len(ordered), parallel, out)
    progress.done = len(finished)
    previous_handler = _stop_on_sigterm()
    running: dict[str, tuple[sweep_spec.Run, subprocess.Popen, TextIO, float]] = {}
    failed: dict[str, str] = {}  # name -> why, with its log
    blocked: dict[str, str] = {}  # name -> the failed run it needed
    try:
        while pending or running:
            for run in list(pending):
                dep = run.depends_on
                if dep in failed or dep in blocked:
                    pending.remove(run)
                    blocked[run.name] = dep
                    progress.done += 1
                    progress.report(f"skipped {run.name}: {dep} did not finish", len(pending))
                elif len(running) < parallel and (dep is None or dep in finished):
                    pending.remove(run)
                    try:
                        running[run.name] = _start(run, prefix, run.name in resumed)
                    except OSError as e:
                        failed[run.name] = f"could not start {prefix[0]!r} ({e}); check the prefix"
                        progress.done += 1
                        progress.report(f"FAILED {run.name}: {e}", len(pending))
                        continue
                    verb = "resuming" if run.name in resumed else "started"
                    out.write(f"{verb} {run.name} (log: {_log_path(run)})\n")
            for name, (run, proc, log, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                _copy_log(run, out)
                del running[name]
                duration = time.monotonic() - started
                progress.durations.append(duration)
                progress.done += 1
                error = _failure(run, proc.returncode)
                if error is None:
                    finished.add(name)
                    message = f"finished {name} in {_clock(duration)}"
                else:
                    failed[name] = f"{error}\n  log: {_log_path(run)}"
                    message = f"FAILED {name} after {_clock(duration)}: {error}"
                progress.report(message, len(pending) + len(running))
            if pending or running:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        # Trainers save a checkpoint on SIGTERM (micle_jax/trainers/preemption.py), so a
        # rerun resumes them.
        out.write(f"interrupted: stopping {len(running)} runs (SIGTERM) ...\n")
        for _, proc, _, _ in running.values():
            proc.terminate()
        for run, proc, log, _ in running.values():
            proc.wait()
            log.close()
            _copy_log(run, out)
        out.write("stopped; run the same command again to resume.\n")
        return 130
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    out.write(f"done: {len(finished)}/{len(ordered)} runs finished\n")
    for name, error in failed.items():
        out.write(f"FAILED {name}: {error}\n")
    for name, dep in blocked.items():
        out.write(f"NOT RUN {name}: needs {dep}, which did not finish\n")
    if failed or blocked:
        out.write("fix the failures and run the same command again: finished runs are skipped.\n")
    return 1 if failed or blocked else 0


def _stop_on_sigterm():
    """Makes SIGTERM to this launcher (a scheduler, `timeout`) stop the runs like Ctrl-C.

    Returns the previous handler, or None when not in the main thread (no signals).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _log_path(run: sweep_spec.Run) -> str:
    """The local file a run's output streams to: ROOT/<run>/log.txt, or its URL_LOG_ROOT mirror."""
    if not fs.is_url(run.workdir):
        return os.path.join(run.workdir, LOG_FILE)
    scheme, _, rest = run.workdir.partition("://")
    return os.path.join(URL_LOG_ROOT, scheme, rest, LOG_FILE)


def _has_log(run: sweep_spec.Run) -> bool:
    if os.path.exists(_log_path(run)):
        return True
    return fs.is_url(run.workdir) and fs.exists(os.path.join(run.workdir, LOG_FILE))


def _copy_log(run: sweep_spec.Run, out: TextIO) -> None:
    """Copies a URL run's local log to ROOT/<run>/log.txt (a warning if that fails)."""
    if not fs.is_url(run.workdir):
        return
    remote = os.path.join(run.workdir, LOG_FILE)
    try:
        with open(_log_path(run), "rb") as f:
            fs.write_bytes(remote, f.read())
    except OSError as e:
        out.write(f"warning: could not copy {_log_path(run)} to {remote}: {e}\n")


def _start(run: sweep_spec.Run, prefix: Sequence[str], resume: bool):
    command = run.command(prefix)
    write_run_file(run, command)
    os.makedirs(os.path.dirname(_log_path(run)), exist_ok=True)
    log = open(_log_path(run), "a")  # closed when the run ends
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    log.write(f"=== {stamp} {'resume' if resume else 'start'}: {shlex.join(command)}\n")
    log.flush()
    # A new session: Ctrl-C reaches only this launcher, which then stops the runs
    # with SIGTERM, the signal on which trainers checkpoint.
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return run, proc, log, time.monotonic()


def _failure(run: sweep_spec.Run, returncode: int) -> str | None:
    """Why a run that has exited did not finish, or None if it finished."""
    status = rundir.read_status(run.workdir) or {}
    if returncode == 0 and status.get("status") == "finished":
        return None
    if status.get("status") == "failed":
        return f"exit code {returncode}: {status.get('error', 'no error message')}"
    if returncode == 0:
        state = status.get("status", f"no {rundir.STATUS_FILE}")
        return f"exited 0 but {rundir.STATUS_FILE} says {state!r} (interrupted?)"
    return f"exit code {returncode}; last log line: {_last_line(_log_path(run))!r}"


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _warn_if_changed(run: sweep_spec.Run, out: TextIO) -> None:
    """Warns when a finished run was launched with other arguments (the sweep file changed)."""
    try:
        with fs.open(os.path.join(run.workdir, rundir.RUN_FILE)) as f:
            before = list(json.load(f)["command"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return
    # The prefix may differ (another Python); the arguments after it may not.
    if before[len(before) - len(run.args) :] != list(run.args):
        out.write(
            f"warning: {run.name} finished with other arguments (see its {rundir.RUN_FILE}); "
            "it is skipped: delete its folder to rerun it\n"
        )


def _define_flags() -> None:
    # Defined only when run as a program: tests import this module next to
    # micle_jax.report, whose --root would collide with this one.
    flags.DEFINE_string("sweep", None, "Sweep file and argument: configs/sweeps/NAME.py[:ARG]")
    flags.DEFINE_string("root", None, "Sweep folder; each run's workdir is ROOT/<run name>.")
    flags.DEFINE_enum("executor", "local", ["local", "print", "xmanager"], "Where to run.")
    flags.DEFINE_integer("parallel", 1, "local: runs at the same time.")
    flags.DEFINE_bool("dry_run", False, "Show what would run; start nothing.")
    flags.DEFINE_string(
        "xm_requirements",
        "",
        "xmanager: resources per run, 'A100=1' (Vertex AI); empty: local.",
    )
    flags.DEFINE_string(
        "command_prefix",
        None,
        "Command that each run's arguments follow (default: this Python -m micle_jax.main; "
        "'python -m micle_jax.main' for --executor=print).",
    )


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.sweep or not FLAGS.root:
        raise app.UsageError("--sweep=configs/sweeps/NAME.py[:ARG] and --root=DIR are required")
    try:
        runs = sweep_spec.expand(sweep_spec.load_sweep(FLAGS.sweep), FLAGS.root)
        sweep_spec.dependency_order(runs)  # a cycle is an error before anything starts
        if fs.is_url(FLAGS.root) and FLAGS.executor == "local":
            fs.isdir(FLAGS.root)  # a StorageError (a ValueError) if the bucket is out of reach
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if FLAGS.command_prefix:
        prefix = shlex.split(FLAGS.command_prefix)
    elif FLAGS.executor == "local":
        prefix = [sys.executable, "-m", "micle_jax.main"]
    else:
        prefix = list(PRINT_PREFIX)
    if FLAGS.executor == "print":
        print_commands(runs, prefix, sys.stdout)
        return 0
    if FLAGS.executor == "xmanager":
        return xm_launch.launch(runs, FLAGS.dry_run, FLAGS.xm_requirements)
    return run_local(runs, prefix, FLAGS.parallel, FLAGS.dry_run)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
