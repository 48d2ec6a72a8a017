"""Flags of `python -m launch.tpu`, their checks, and the actions on a slice."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence

from launch import trainer_flags
from launch.tpu import accelerators, gcloud, lifecycle, remote

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACTIONS = ("run", "stop", "delete", "status", "logs")
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Set by the launcher (--num_processes on a pod slice), or found by JAX from the TPU metadata.


@dataclasses.dataclass
class Options:
    """Everything the command line sets; the defaults here are the flags' defaults."""

    name: str = ""
    zone: str = ""
    tpu: str = ""
    project: str = ""
    runtime_version: str = ""  # '' = the generation's (launch/tpu/accelerators.py)
    spot: bool = False
    queued: bool = False
    config: str = ""
    workdir: str = ""
    env: Sequence[str] = ()
    source: str = "."
    git_ref: str = ""
    max_restarts: int = 5
    poll_s: float = 30.0
    wait_timeout_h: float = 24.0
    delete_after: bool = True
    action: str = "run"
    dry_run: bool = False
    extra: Sequence[str] = ()  # trainer flags after `--`


def _check_slice(o: Options) -> accelerators.TpuType:
    if not o.name or not o.zone or not o.tpu:
        missing = [f"--{k}" for k in ("name", "zone", "tpu") if not getattr(o, k)]
        raise ValueError(
            f"{', '.join(missing)} required: e.g. --name=micle-v4 --zone=us-central2-b --tpu=v4-32"
        )
    if not _NAME_RE.match(o.name):
        raise ValueError(
            f"--name={o.name!r}: a TPU name is lowercase letters, digits and '-', starts with "
            "a letter and has at most 63 characters, e.g. --name=micle-v4-32"
        )
    if not _ZONE_RE.match(o.zone):
        raise ValueError(f"--zone={o.zone!r} is not a zone; e.g. --zone=us-central2-b")
    return accelerators.parse(o.tpu)


def _check_job(o: Options, tpu: accelerators.TpuType) -> None:
    if not o.config or not o.workdir:
        raise ValueError(
            "--config=configs/FILE.py[:ARGS] and --workdir=gs://BUCKET/PATH are required"
        )
    if not o.workdir.startswith("gs://"):
        if tpu.multi_host:
            raise ValueError(
                f"--workdir={o.workdir}: {tpu.name} has {tpu.hosts} hosts, which must all write "
                "the same checkpoints: use a Cloud Storage workdir, --workdir=gs://BUCKET/PATH "
                "(a bucket in the TPU's region)"
            )
        why = [n for n, on in (("--spot", o.spot), ("--queued", o.queued)) if on]
        if o.delete_after:
            why.append("--delete_after (the default)")
        if why:
            raise ValueError(
                f"--workdir={o.workdir} is on the TPU VM's own disk, which is lost when the VM "
                f"is preempted or deleted ({', '.join(why)}): use --workdir=gs://BUCKET/PATH, "
                "or keep an on-demand VM with --delete_after=false"
            )
    if o.source == ".":
        config_file = o.config.split(":", 1)[0]
        if not os.path.isfile(os.path.join(REPO_ROOT, config_file)):
            raise ValueError(
                f"--config={o.config}: {config_file} is not a file of this checkout "
                f"({REPO_ROOT}); give a path relative to the repository root, e.g. "
                "--config=configs/micle_medical.py:arch=r50x1"
            )
    for item in o.env:
        if not _ENV_RE.match(item):
            raise ValueError(
                f"--env={item!r}: write NAME=VALUE, e.g. --env=TFDS_DATA_DIR=gs://b/tfds"
            )
    trainer_flags.check_trainer_flags(o.extra, "JAX finds its peers on a TPU slice by itself")


def build(o: Options, runner: gcloud.Runner | None = None) -> tuple[gcloud.Cloud, lifecycle.Job]:
    """The slice and the job the options describe.

    Raises:
      ValueError: a bad flag, with the message to show.
    """
    if o.action not in ACTIONS:
        raise ValueError(f"--action={o.action}: accepted: {', '.join(ACTIONS)}")
    tpu = _check_slice(o)
    if o.max_restarts < 0:
        raise ValueError(f"--max_restarts={o.max_restarts}: must be 0 or more")
    if o.action in ("run", "stop", "status", "logs"):
        _check_job(o, tpu)
    cloud = gcloud.Cloud(
        name=o.name,
        zone=o.zone,
        tpu=tpu,
        runtime_version=o.runtime_version or tpu.runtime_version,
        project=o.project or None,
        spot=o.spot,
        queued=o.queued,
        runner=runner or gcloud.SubprocessRunner(),
    )
    is_git = o.source != "."
    # micle_jax.main calls jax.distributed.initialize() when --num_processes > 1; JAX
    # then reads the coordinator and this host's index from the TPU VM's metadata.
    # (main.py's own check looks at environment variables, which a TPU VM lacks.)
    hosts = [f"--num_processes={tpu.hosts}"] if tpu.multi_host else []
    job = lifecycle.Job(
        workdir=o.workdir,
        trainer_args=[f"--config={o.config}", f"--workdir={o.workdir}", *hosts, *o.extra],
        env=dict(item.split("=", 1) for item in o.env),
        archive=None if is_git else os.path.join(tempfile.gettempdir(), remote.ARCHIVE),
        git_url=o.source if is_git else None,
        git_ref=o.git_ref or None,
    )
    return cloud, job


def execute(o: Options, out=sys.stdout) -> int:
    """Runs the action; returns the exit code (0 ok, 1 failed, 2 bad flags)."""
    answers = [remote.RunState("absent"), remote.RunState("exited", 0, {"status": "finished"})]
    runner = None
    if o.dry_run:
        runner = gcloud.DryRunRunner([remote.probe_answer(a) for a in answers], out)
    try:
        cloud, job = build(o, runner)
    except ValueError as e:
        print(f"launch.tpu: error: {e}", file=sys.stderr)
        return 2
    run = lifecycle.TpuRun(
        cloud,
        job,
        max_restarts=o.max_restarts,
        poll_s=o.poll_s,
        wait_timeout_s=o.wait_timeout_h * 3600,
        sleep=(lambda s: None) if o.dry_run else time.sleep,
        out=out,
    )
    try:
        if o.action == "run" and job.archive:
            if o.dry_run:
                out.write(f"# pack this checkout (git ls-files) into {job.archive}\n")
            else:
                n = remote.pack_checkout(REPO_ROOT, job.archive)
                run.log(f"packed {n} files of {REPO_ROOT} into {job.archive}")
        if o.action == "run":
            run.run(delete_after=o.delete_after)
        elif o.action == "stop":
            run.stop()
        elif o.action == "delete":
            cloud.delete()
        elif o.action == "logs":
            run.follow()
        else:
            state = cloud.state()
            run.log(f"{o.name}: {state or 'absent'}")
            if state in (gcloud.NODE_READY, gcloud.QUEUED_READY):
                run.log(f"worker 0: {run.probe()}")
    except (gcloud.LaunchError, ValueError) as e:
        print(f"launch.tpu: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "launch.tpu: interrupted; the trainer keeps running on the slice (detached). "
            f"Reattach: rerun the same command. Stop it: --action=stop. Delete the slice: "
            f"--action=delete.\n  {shlex.join(sys.argv)}",
            file=sys.stderr,
        )
        return 130
    return 0
