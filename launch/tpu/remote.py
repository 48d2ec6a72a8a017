"""What runs on the TPU workers: the install, start, follow, probe and stop scripts.

Layout on every worker (the home folder of the ssh user):

  ~/micle_jax/                    the code: an unpacked archive of this checkout,
                                  or a git clone (configs/ paths resolve here)
  ~/micle_jax_venv/               Python 3.11 made by uv: TPU VM images are Ubuntu
                                  22.04, whose python3 (3.10) is older than
                                  setup.py's python_requires
  ~/micle_jax_runs/<workdir>/     one folder per run (named after its workdir):
      pid                         the wrapper shell's process id
      log                         the trainer's stdout and stderr
      exit_code                   written when the trainer exits

The trainer runs detached (nohup setsid), so a dropped ssh connection or a
restarted launcher does not stop it; the launcher follows worker 0's log and
asks worker 0's `probe` how the run ended. Whether a run finished is the
trainer's WORKDIR/run_status.json (micle_jax/rundir.py), read on worker 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import tarfile
from collections.abc import Mapping, Sequence

REPO = "$HOME/micle_jax"
VENV = "$HOME/micle_jax_venv"
PYTHON_VERSION = "3.11"
ARCHIVE = "micle_jax_src.tar.gz"  # the packed checkout, in the workers' home folder


def run_dir(workdir: str) -> str:
    """The run's folder on each worker: ~/micle_jax_runs/<workdir as a file name>."""
    return "$HOME/micle_jax_runs/" + re.sub(r"[^A-Za-z0-9._-]+", "_", workdir).strip("_")


def checkout_files(repo_root: str) -> list[str]:
    """The checkout's files, tracked and untracked but not ignored (no .venv, no workdirs).

    Uncommitted edits count: a remote machine runs exactly what is here.
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo_root,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as e:
        raise ValueError(
            f"cannot list the files of {repo_root} with git ({e}); run from a git checkout "
            "(or, on TPUs, pass --source=<git URL> for the workers to clone)"
        ) from e
    return [f for f in listed.split("\0") if f and os.path.isfile(os.path.join(repo_root, f))]


def pack_checkout(repo_root: str, archive: str) -> int:
    """Writes `checkout_files` to a .tar.gz; returns the number of files."""
    files = checkout_files(repo_root)
    # Level 1: the bulk is images, which do not compress further.
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for name in files:
            tar.add(os.path.join(repo_root, name), arcname=name)
    return len(files)


def install_script(git_url: str | None = None, git_ref: str | None = None) -> str:
    """Puts the code in ~/micle_jax and installs it with jax[tpu] into ~/micle_jax_venv.

    Without `git_url` the code is ~/micle_jax_src.tar.gz (scp'd before).
    """
    if git_url:
        fetch = f"git clone --quiet {shlex.quote(git_url)} {REPO}"
        if git_ref:
            fetch += f" && git -C {REPO} checkout --quiet {shlex.quote(git_ref)}"
    else:
        fetch = f"mkdir -p {REPO} && tar -xzf $HOME/{ARCHIVE} -C {REPO}"
    return "; ".join(
        [
            "set -euo pipefail",
            f"rm -rf {REPO}",
            fetch,
            "command -v uv >/dev/null || test -x $HOME/.local/bin/uv "
            "|| python3 -m pip install --quiet --user uv",
            'UV="$(command -v uv || echo $HOME/.local/bin/uv)"',
            f'"$UV" venv --quiet --allow-existing --python {PYTHON_VERSION} {VENV}',
            f"\"$UV\" pip install --quiet --python {VENV}/bin/python -e {REPO} 'jax[tpu]'",
            'echo "micle_jax installed on $(hostname)"',
        ]
    )


def _at_run_dir(workdir: str) -> str:
    return f"D={run_dir(workdir)}"


_RUNNING = '[ -f "$D/pid" ] && kill -0 "$(cat "$D/pid")" 2>/dev/null'


def start_script(workdir: str, trainer_args: Sequence[str], env: Mapping[str, str]) -> str:
    """Starts `python -m micle_jax.main ARGS` detached, unless this run is already going."""
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
    # The inner shell inherits D (exported) and records its own pid, then the exit code.
    inner = (
        f'echo $$ > "$D/pid"; {exports}export PYTHONUNBUFFERED=1; cd {REPO}; '
        f'{VENV}/bin/python -m micle_jax.main {shlex.join(trainer_args)} >> "$D/log" 2>&1; '
        'echo $? > "$D/exit_code"'
    )
    return "; ".join(
        [
            f"export {_at_run_dir(workdir)}",
            'mkdir -p "$D"',
            f'if {_RUNNING}; then echo "micle_jax: already running on $(hostname)"; exit 0; fi',
            'rm -f "$D/exit_code" "$D/pid"',
            f"(nohup setsid bash -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null &)",
            'echo "micle_jax: started on $(hostname)"',
        ]
    )


def follow_script(workdir: str) -> str:
    """Prints the run's log from the start and follows it until the trainer exits."""
    return "; ".join(
        [
            _at_run_dir(workdir),
            'for i in $(seq 30); do [ -f "$D/pid" ] && break; sleep 1; done',
            'touch "$D/log"',
            'tail -n +1 -F "$D/log" --pid="$(cat "$D/pid")" 2>/dev/null',
            "true",
        ]
    )


def stop_script(workdir: str) -> str:
    """Sends SIGTERM to the trainer: it saves a checkpoint and exits (status 'preempted')."""
    return "; ".join(
        [
            _at_run_dir(workdir),
            f'if {_RUNNING}; then pkill -TERM -P "$(cat "$D/pid")"; '
            'echo "micle_jax: stopping on $(hostname)"; '
            'else echo "micle_jax: not running on $(hostname)"; fi',
        ]
    )


def probe_script(workdir: str) -> str:
    """Prints `process=running|exited|absent`, `exit_code=N` and `status=<run_status.json>`."""
    read_status = (
        "import json, sys; from micle_jax import rundir; "
        'print("status=" + json.dumps(rundir.read_status(sys.argv[1])))'
    )
    return "; ".join(
        [
            _at_run_dir(workdir),
            f"if {_RUNNING}; then echo process=running",
            'elif [ -f "$D/exit_code" ]; then echo process=exited; '
            'echo "exit_code=$(cat "$D/exit_code")"',
            "else echo process=absent; fi",
            f"if [ -x {VENV}/bin/python ]; then cd {REPO} && {VENV}/bin/python -c "
            f"{shlex.quote(read_status)} {shlex.quote(workdir)} 2>/dev/null "
            "|| echo status=null; fi",
        ]
    )


@dataclasses.dataclass(frozen=True)
class RunState:
    """Worker 0's answer to the probe."""

    process: str  # 'running', 'exited' or 'absent'
    exit_code: int | None = None
    status: dict | None = None  # WORKDIR/run_status.json, None if unreadable


def parse_probe(text: str) -> RunState:
    """The RunState printed by `probe_script` (other lines, e.g. ssh banners, are ignored)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key in ("process", "exit_code", "status"):
            fields[key] = value
    try:
        status = json.loads(fields.get("status", "null"))
    except json.JSONDecodeError:
        status = None
    code = fields.get("exit_code", "")
    return RunState(
        process=fields.get("process", "absent"),
        exit_code=int(code) if code.lstrip("-").isdigit() else None,
        status=status if isinstance(status, dict) else None,
    )


def probe_answer(state: RunState) -> str:
    """The text `probe_script` prints for `state` (the dry run's and the tests' answer)."""
    lines = [f"process={state.process}"]
    if state.exit_code is not None:
        lines.append(f"exit_code={state.exit_code}")
    lines.append("status=" + json.dumps(state.status))
    return "\n".join(lines) + "\n"
