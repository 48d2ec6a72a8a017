"""Every gcloud call of the TPU launcher, behind one small runner interface.

`Cloud` builds the commands (`gcloud compute tpus tpu-vm ...` and
`gcloud compute tpus queued-resources ...`) and reads their answers; a
`Runner` executes one command. Three runners exist: `SubprocessRunner` (the
real gcloud), `DryRunRunner` (prints each command and answers as a cloud where
everything goes right, for --dry_run) and the tests' fake cloud, which answers
`describe` with READY / PREEMPTED / NOT_FOUND or queued-resource states and
ssh with exit codes.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Protocol, TextIO

from launch.tpu import accelerators

# TPU VM states (google.cloud.tpu.v2 Node.State) and queued-resource states
# (QueuedResourceState.State), grouped by what the launcher does about them.
NODE_READY = "READY"
NODE_WAIT = frozenset({"CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING"})
NODE_LOST = frozenset({"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "DELETING", "HIDDEN"})
QUEUED_READY = "ACTIVE"
QUEUED_WAIT = frozenset({"CREATING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES"})
QUEUED_LOST = frozenset({"SUSPENDING", "SUSPENDED", "DELETING"})
QUEUED_FAILED = "FAILED"


class LaunchError(RuntimeError):
    """A failure the launcher cannot recover from; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Result:
    """What a command returned: its exit code and, when captured, its output."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner(Protocol):
    """Runs one command; `capture=True` returns its output instead of showing it."""

    def __call__(self, command: Sequence[str], capture: bool = False) -> Result: ...


class SubprocessRunner:
    """Runs gcloud for real; uncaptured output goes straight to this terminal."""

    def __call__(self, command: Sequence[str], capture: bool = False) -> Result:
        try:
            proc = subprocess.run(list(command), capture_output=capture, text=True)
        except FileNotFoundError as e:
            raise LaunchError(
                f"{command[0]!r} not found: install the Google Cloud CLI "
                "(cloud.google.com/sdk/docs/install), then `gcloud auth login` "
                "(or use --dry_run to only print the commands)"
            ) from e
        return Result(proc.returncode, proc.stdout or "", proc.stderr or "")


class DryRunRunner:
    """Prints every command instead of running it.

    Answers as a cloud where everything goes right: a TPU is absent until its
    create command, then READY (ACTIVE when queued); captured ssh commands (the
    run-state probe on worker 0) get `probe_answers` in turn, the last one
    repeated (no run yet, then a finished run).
    """

    def __init__(self, probe_answers: Sequence[str], out: TextIO = sys.stdout):
        self.probe_answers = list(probe_answers)
        self.out = out
        self.created = False

    def __call__(self, command: Sequence[str], capture: bool = False) -> Result:
        self.out.write(shlex.join(command) + "\n")
        if "create" in command:
            self.created = True
        if "describe" in command:
            if not self.created:
                return Result(1, "", "NOT_FOUND (dry run: assumed absent)")
            return Result(0, QUEUED_READY if "queued-resources" in command else NODE_READY)
        if not capture:
            return Result(0)
        answer = self.probe_answers[0]
        if len(self.probe_answers) > 1:
            self.probe_answers.pop(0)
        return Result(0, answer)


@dataclasses.dataclass(frozen=True)
class Cloud:
    """The gcloud commands for one TPU slice (a TPU VM, or a queued resource holding one).

    A queued slice is a queued resource and its TPU VM, both called `name`.
    """

    name: str
    zone: str
    tpu: accelerators.TpuType
    runtime_version: str
    project: str | None = None
    spot: bool = False
    queued: bool = False
    runner: Runner = dataclasses.field(default_factory=SubprocessRunner)

    def _where(self) -> list[str]:
        where = [f"--zone={self.zone}"]
        return where + ([f"--project={self.project}"] if self.project else [])

    def _vm(self, verb: str, *args: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.name, *self._where(), *args]

    def _queued(self, verb: str, *args: str) -> list[str]:
        return [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            verb,
            self.name,
            *self._where(),
            *args,
        ]

    def _check(self, result: Result, what: str) -> Result:
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise LaunchError(
                f"gcloud could not {what} (exit code {result.returncode}): "
                f"{detail[-1] if detail else 'no message'}; check `gcloud auth list`, "
                f"the project (--project) and quota in zone {self.zone}"
            )
        return result

    # -- the slice -------------------------------------------------------------

    def create(self) -> None:
        """Creates the TPU VM, or queues the request for it (returns once accepted)."""
        kind = ["--accelerator-type=" + self.tpu.name]
        spot = ["--spot"] if self.spot else []
        if self.queued:
            command = self._queued(
                "create",
                f"--node-id={self.name}",
                *kind,
                f"--runtime-version={self.runtime_version}",
                *spot,
            )
        else:
            command = self._vm("create", *kind, f"--version={self.runtime_version}", *spot)
        self._check(self.runner(command), f"create TPU {self.name} ({self.tpu.name})")

    def state(self) -> str | None:
        """The slice's state: a queued-resource state when queued, else the TPU VM's.

        None when it does not exist (gcloud answers NOT_FOUND).
        """
        if self.queued:
            command = self._queued("describe", "--format=value(state.state)")
        else:
            command = self._vm("describe", "--format=value(state)")
        result = self.runner(command, capture=True)
        if result.returncode != 0 and "NOT_FOUND" in result.stderr + result.stdout:
            return None
        return self._check(result, f"describe TPU {self.name}").stdout.strip().upper()

    def failure_detail(self) -> str:
        """gcloud's full description of a FAILED queued resource (its state data)."""
        result = self.runner(self._queued("describe", "--format=yaml(state)"), capture=True)
        return " ".join((result.stdout or result.stderr).split())

    def delete(self) -> None:
        """Deletes the TPU VM (and its queued resource); nothing to do if absent."""
        if self.queued:
            command = self._queued("delete", "--quiet", "--force")
        else:
            command = self._vm("delete", "--quiet")
        result = self.runner(command)
        if result.returncode != 0 and self.state() is not None:
            self._check(result, f"delete TPU {self.name}")

    # -- the workers -------------------------------------------------------------

    @property
    def every_worker(self) -> str:
        """gcloud's --worker for all hosts: 'all' on a pod slice, '0' on a single host."""
        return "all" if self.tpu.multi_host else "0"

    def ssh(self, script: str, worker: str | None = None, capture: bool = False) -> Result:
        """Runs a bash script on one worker ('0') or on every worker (None) at once."""
        worker = worker or self.every_worker
        return self.runner(self._vm("ssh", f"--worker={worker}", f"--command={script}"), capture)

    def scp(self, local: str, remote: str) -> None:
        """Copies a local file to `remote` (relative to the home folder) on every worker."""
        command = [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            local,
            f"{self.name}:{remote}",
            *self._where(),
            f"--worker={self.every_worker}",
        ]
        self._check(self.runner(command), f"copy {local} to the workers of {self.name}")
