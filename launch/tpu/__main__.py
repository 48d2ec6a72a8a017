r"""Runs micle_jax on a Cloud TPU slice, from creating it to deleting it.

    python -m launch.tpu --name=micle-v4 --zone=us-central2-b --tpu=v4-32 \
      --config=configs/micle_medical.py:records=gs://BUCKET/cxr,arch=r50x1 \
      --workdir=gs://BUCKET/runs/micle_cxr [--spot | --queued [--spot]] [--dry_run] \
      [-- --config.batch_size=4096 ...]

Flags after `--` go to the trainer. Actions (--action): run (default: create,
install, start, follow, resume after preemptions, delete), stop (SIGTERM to
the trainers: they checkpoint), delete, status, logs. See launch/tpu/__init__.py.
"""

import sys

from absl import app, flags

from launch.tpu import cli

_DEFAULTS = cli.Options()


def _define_flags() -> None:
    d = _DEFAULTS
    flags.DEFINE_string("name", d.name, "TPU (and queued resource) name, e.g. micle-v4.")
    flags.DEFINE_string("zone", d.zone, "Zone, e.g. us-central2-b (v4), us-east5-a (v5p).")
    flags.DEFINE_string("tpu", d.tpu, "Accelerator type: v4-8, v4-32, v5litepod-8, v5p-16, v6e-8.")
    flags.DEFINE_string("project", d.project, "GCP project ('' = gcloud's default).")
    flags.DEFINE_string(
        "runtime_version", d.runtime_version, "TPU VM software version ('' = per generation)."
    )
    flags.DEFINE_bool("spot", d.spot, "Spot capacity (preemptible); the run resumes.")
    flags.DEFINE_bool("queued", d.queued, "Ask through a queued resource (waits for capacity).")
    flags.DEFINE_string("config", d.config, "Trainer config, configs/FILE.py[:ARGS].")
    flags.DEFINE_string("workdir", d.workdir, "Trainer workdir, gs://BUCKET/PATH.")
    flags.DEFINE_multi_string("env", list(d.env), "NAME=VALUE for the trainer (repeatable).")
    flags.DEFINE_string(
        "source", d.source, "'.': pack this checkout and scp it; else a git URL to clone."
    )
    flags.DEFINE_string("git_ref", d.git_ref, "With a git --source: branch, tag or commit.")
    flags.DEFINE_integer("max_restarts", d.max_restarts, "Preemption recoveries before giving up.")
    flags.DEFINE_float("poll_s", d.poll_s, "Seconds between state checks while waiting.")
    flags.DEFINE_float("wait_timeout_h", d.wait_timeout_h, "Give up waiting for the slice after.")
    flags.DEFINE_bool("delete_after", d.delete_after, "Delete the slice when the run finishes.")
    flags.DEFINE_enum("action", d.action, list(cli.ACTIONS), "What to do.")
    flags.DEFINE_bool("dry_run", d.dry_run, "Print every command instead of running it.")


def main(argv):
    f = flags.FLAGS
    options = cli.Options(
        **{field: f[field].value for field in cli.Options.__dataclass_fields__ if field != "extra"},
        extra=list(argv[1:]),
    )
    return cli.execute(options)


if __name__ == "__main__":
    _define_flags()
    sys.exit(app.run(main))
