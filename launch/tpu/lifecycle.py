"""The life of one run on a TPU slice: create, install, start, follow, resume, delete.

    slice absent      -> create it (a TPU VM, or a queued resource) and wait until
                         READY (queued: ACTIVE), printing each state change
    run not going     -> install the code on every worker, start the trainer on
                         every worker (same command, same workdir)
    run going         -> attach to it (a rerun of the launcher does not start a
                         second copy)
    follow            -> stream worker 0's log until the trainer exits or ssh drops
    slice lost        -> PREEMPTED / TERMINATED / gone (queued: SUSPENDED): delete
                         it, create it again, reinstall, restart with the same
                         --workdir; the trainer resumes from its latest checkpoint
    trainer stopped   -> run_status.json 'preempted' (a SIGTERM, e.g. maintenance,
                         on a slice that stayed READY): start it again
    finished          -> delete the slice (unless --delete_after=false)
    anything else     -> stop with an error that names it (a failed trainer or a
                         FAILED queued resource is never retried)

Recoveries (recreations and restarts) are bounded by `max_restarts`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

from launch.tpu import gcloud, remote
from launch.tpu.gcloud import LaunchError

_MAX_SSH_DROPS = 3  # consecutive follow disconnections while the trainer keeps running


@dataclasses.dataclass(frozen=True)
class Job:
    """What to run: the trainer's arguments, its workdir, environment and code."""

    workdir: str
    trainer_args: Sequence[str]  # --config=..., --workdir=..., extra flags
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    archive: str | None = None  # a packed checkout to scp, or None with git_url
    git_url: str | None = None
    git_ref: str | None = None


class TpuRun:
    """Drives one Job on one slice (`cloud`) to its end; see the module docstring."""

    def __init__(
        self,
        cloud: gcloud.Cloud,
        job: Job,
        max_restarts: int = 5,
        poll_s: float = 30.0,
        wait_timeout_s: float = 24 * 3600.0,
        sleep: Callable[[float], None] = time.sleep,
        out: TextIO = sys.stdout,
    ):
        self.cloud, self.job = cloud, job
        self.max_restarts = max_restarts
        self.poll_s, self.wait_timeout_s = poll_s, wait_timeout_s
        self.sleep, self.out = sleep, out
        self.restarts = 0

    def log(self, message: str) -> None:
        self.out.write(f"[launch.tpu] {message}\n")
        self.out.flush()

    # -- the slice -----------------------------------------------------------------

    def _count_restart(self, why: str) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise LaunchError(
                f"{why}, and the run was already recovered {self.max_restarts} times "
                f"(--max_restarts={self.max_restarts}); giving up. The checkpoints are in "
                f"{self.job.workdir}: rerun the same command to continue from them"
            )
        self.log(f"{why}: recovery {self.restarts}/{self.max_restarts}")

    def ensure_ready(self) -> None:
        """Returns once the slice is READY (ACTIVE), creating or recreating it as needed."""
        c = self.cloud
        ready = gcloud.QUEUED_READY if c.queued else gcloud.NODE_READY
        waiting = gcloud.QUEUED_WAIT if c.queued else gcloud.NODE_WAIT
        lost = gcloud.QUEUED_LOST if c.queued else gcloud.NODE_LOST
        kind = "queued resource" if c.queued else "TPU"
        waited, created, last = 0.0, False, "?"
        while True:
            state = c.state()
            if state != last:
                self.log(f"{kind} {c.name}: {state or 'absent'}")
                last = state
            if state == ready:
                return
            if state is None and not created:
                self.log(f"creating {c.tpu.name} {kind} {c.name} in {c.zone}")
                c.create()
                created = True
                continue
            if state == gcloud.QUEUED_FAILED and c.queued:
                raise LaunchError(
                    f"queued resource {c.name} is FAILED: {c.failure_detail() or 'no detail'}; "
                    "this is not a preemption and is not retried: delete it (`python -m "
                    "launch.tpu --action=delete ...`), then retry later or in another zone"
                )
            if state in lost:
                self._count_restart(f"{kind} {c.name} is {state} (preempted)")
                c.delete()
                created = False
                continue
            if state is not None and state not in waiting:
                raise LaunchError(
                    f"{kind} {c.name} is in state {state}, which the launcher does not handle; "
                    f"look at it with `gcloud compute tpus ... describe {c.name} "
                    f"--zone={c.zone}`, or delete it and rerun"
                )
            if waited >= self.wait_timeout_s:
                raise LaunchError(
                    f"{kind} {c.name} still {state or 'absent'} after {waited / 3600:.1f} h "
                    "(--wait_timeout_h); delete it or try another zone"
                )
            self.sleep(self.poll_s)
            waited += self.poll_s

    # -- the workers -----------------------------------------------------------------

    def probe(self) -> remote.RunState:
        result = self.cloud.ssh(remote.probe_script(self.job.workdir), worker="0", capture=True)
        if result.returncode != 0:
            return remote.RunState("unreachable")
        return remote.parse_probe(result.stdout)

    def install(self) -> None:
        job = self.job
        self.log(f"installing micle_jax on {self.cloud.tpu.hosts} worker(s)")
        if job.archive:
            self.cloud.scp(job.archive, remote.ARCHIVE)
        result = self.cloud.ssh(remote.install_script(job.git_url, job.git_ref))
        if result.returncode != 0:
            raise LaunchError(
                f"installing micle_jax on {self.cloud.name} failed (exit code "
                f"{result.returncode}, output above); fix it and rerun: the slice is kept"
            )

    def start(self) -> None:
        script = remote.start_script(self.job.workdir, self.job.trainer_args, self.job.env)
        result = self.cloud.ssh(script)
        if result.returncode != 0:
            raise LaunchError(f"starting the trainer on {self.cloud.name} failed (output above)")

    def follow(self) -> None:
        self.cloud.ssh(remote.follow_script(self.job.workdir), worker="0")

    def stop(self) -> None:
        """SIGTERM to the trainers: they checkpoint and exit."""
        self.cloud.ssh(remote.stop_script(self.job.workdir))

    # -- the run -----------------------------------------------------------------------

    def _failure(self, state: remote.RunState) -> str | None:
        """Why a run that exited did not finish; None if it finished or may resume."""
        status = state.status or {}
        log = f"{remote.run_dir(self.job.workdir)}/log on worker 0"
        if status.get("status") == "failed":
            return f"the trainer failed at step {status.get('step', '?')}: {status.get('error')}"
        if state.exit_code not in (0, None):
            return (
                f"the trainer exited with code {state.exit_code} on worker 0 (not a "
                f"preemption, so not retried); its log is {log}"
            )
        if state.exit_code == 0 and status.get("status") not in ("finished", "preempted"):
            return (
                f"the trainer exited 0 but {self.job.workdir}/run_status.json says "
                f"{status.get('status', 'nothing (unreadable from worker 0)')!r}; its log is {log}"
            )
        return None

    def run(self, delete_after: bool = True) -> None:
        """Runs the job to its end (see the module docstring); raises LaunchError if it cannot."""
        self.ensure_ready()
        installed, drops = False, 0
        while True:
            state = self.probe()
            if (state.status or {}).get("status") == "finished" and state.process != "running":
                self.log(f"{self.job.workdir} has already finished: nothing to run")
                break
            if state.process == "running":
                self.log("the run is already going on the slice: following it")
            else:
                if not installed:
                    self.install()
                    installed = True
                hosts = self.cloud.tpu.hosts
                self.log(f"starting on {hosts} worker(s): workdir {self.job.workdir}")
                self.start()
            self.follow()
            slice_state = self.cloud.state()
            if slice_state != (gcloud.QUEUED_READY if self.cloud.queued else gcloud.NODE_READY):
                self.ensure_ready()  # counts the preemption and recreates the slice
                installed, drops = False, 0
                continue
            state = self.probe()
            if state.process in ("running", "unreachable"):
                drops += 1
                if drops > _MAX_SSH_DROPS:
                    raise LaunchError(
                        f"lost the ssh connection to worker 0 {drops} times while the trainer "
                        f"runs; check the network, then rerun the same command to reattach"
                    )
                self.log("the connection to worker 0 dropped; reattaching")
                continue
            drops = 0
            failure = self._failure(state)
            if failure:
                raise LaunchError(failure)
            if (state.status or {}).get("status") == "finished":
                self.log(f"finished: {self.job.workdir}")
                break
            # Stopped early on a slice that stayed READY: a SIGTERM (maintenance) or a
            # reboot (no exit code). The trainer resumes from its checkpoint.
            self._count_restart(f"the trainer stopped before the end ({state.process})")
        if delete_after:
            self.log(f"deleting {self.cloud.name}")
            self.cloud.delete()
