"""The run directory: what a run writes into its workdir, and how.

One module owns the protocol that trainers, the sweep launcher, the report
and `predict` share:

  WORKDIR/config.json                the run's full config (CONFIG_FILE)
  WORKDIR/run_status.json            'running' | 'preempted' | 'failed' | 'finished',
                                     step, total_steps, ... (STATUS_FILE)
  WORKDIR/results.json               evaluation rows (RESULTS_FILE, `write_results`)
  WORKDIR/plots/                     reliability diagrams of the evals (PLOTS_DIR,
                                     micle_jax/report_plots.py write_run_plots)
  WORKDIR/task_info.json             a fine-tuned model's classes (TASK_FILE)
  WORKDIR/label_fraction_cases.txt   training cases kept by a label fraction (CASES_FILE)
  WORKDIR/sweep_run.json             the run's identity in a sweep (RUN_FILE, launch/sweep.py)
  WORKDIR/checkpoints/<step>/        Orbax checkpoints (CHECKPOINT_DIR, micle_jax/checkpoint.py)
  WORKDIR/best/checkpoints/<step>/   the best checkpoint by validation (BEST_DIR)

Every file is written whole or not at all (`atomic_open`: a temporary file in
the same folder, then a rename; on Google Cloud Storage one upload, which
creates the object whole), so a reader never sees half a file and a killed run
never leaves one. A workdir may be local or a gs:// URL (micle_jax/fs.py).
Only process 0 writes (`write_status`, `write_results`); everything here is
plain Python and JSON, so the report and the launcher read run directories
without importing JAX. `check_workdir` checks a trainer's --workdir before
anything is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from micle_jax import fs

CONFIG_FILE = "config.json"
STATUS_FILE = "run_status.json"
RESULTS_FILE = "results.json"
TASK_FILE = "task_info.json"
CASES_FILE = "label_fraction_cases.txt"
RUN_FILE = "sweep_run.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
PLOTS_DIR = "plots"
# results.json row fields that say which facet of an evaluation a number is
# (micle_jax/evaluators/clinical.py): 'calibration' ('before_temperature' |
# 'after_temperature'), an operating point's 'target' ('specificity=0.9'), a
# subgroup's column 'subgroup_by' ('sex') and group 'subgroup' ('sex=female').
RESULT_TAGS = ("calibration", "target", "subgroup_by", "subgroup")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[Any]:
    """Opens a temporary file beside `path`; renames it onto `path` when the block succeeds.

    The folder is created if needed. On an exception the temporary file is
    removed and `path` keeps its previous content (or stays absent). A URL
    (gs://...) is written to memory and uploaded when the block succeeds: a
    GCS object is created whole or not at all, so no temporary object is needed.
    """
    if fs.is_url(path):
        buffer = io.BytesIO() if "b" in mode else io.StringIO()
        yield buffer
        data = buffer.getvalue()
        fs.write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Named by the process and thread, created with open() so that the file
    # gets the user's usual permissions (mkstemp's are owner-only).
    tmp = os.path.join(
        folder, f".{os.path.basename(path)}.tmp{os.getpid()}.{threading.get_ident()}"
    )
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, data: Any) -> None:
    """Writes `data` as indented JSON (NaN allowed) through `atomic_open`."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=1, allow_nan=True, default=str)
        f.write("\n")


def check_workdir(workdir: str) -> str:
    """Checks that `workdir` can be created and written; returns its absolute path.

    A URL (gs://bucket/folder) is returned as it is, once its bucket is found
    and the folder is not an object; whether the credentials may write there
    shows at the first write. Creates nothing: a run that fails later config
    checks leaves no trace.
    """
    if not workdir:
        raise ValueError("--workdir is required (where logs and checkpoints go)")
    if fs.is_url(workdir):
        return _check_url_workdir(workdir)
    path = os.path.abspath(os.path.expanduser(workdir))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"--workdir={workdir}: {probe} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(
            f"--workdir={workdir}: {probe} is not writable; choose a folder you can write to"
        )
    return path


def _check_url_workdir(workdir: str) -> str:
    """check_workdir for gs://bucket/folder: the bucket exists, the folder is no object."""
    scheme, _, rest = workdir.partition("://")
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    if not fs.isdir(bucket):
        raise ValueError(
            f"--workdir={workdir}: bucket {bucket} does not exist or these credentials cannot "
            f"see it; create it (`gcloud storage buckets create {bucket}`) or fix the name; "
            + fs.CREDENTIALS_HINT
        )
    if workdir.rstrip("/") != bucket and fs.isfile(workdir.rstrip("/")):
        raise ValueError(f"--workdir={workdir}: {workdir} exists and is not a folder")
    return workdir


def _is_main_process() -> bool:
    """Whether this is JAX process 0 (True when JAX was never imported: a plain tool)."""
    import sys

    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def write_config(workdir: str, config) -> None:
    """Writes WORKDIR/config.json, the ConfigDict as `to_json_best_effort(indent=1)` (process 0)."""
    if _is_main_process():
        with atomic_open(os.path.join(workdir, CONFIG_FILE)) as f:
            f.write(config.to_json_best_effort(indent=1))


def read_config(workdir: str) -> dict:
    """WORKDIR/config.json as a dict; a clear error if the folder is not a run directory."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir")
    with fs.open(path) as f:
        return json.load(f)


def write_status(workdir: str, status: str, **fields) -> None:
    """Writes WORKDIR/run_status.json = {'status': status, **fields} (process 0 only)."""
    if _is_main_process():
        write_json_atomic(os.path.join(workdir, STATUS_FILE), {"status": status, **fields})


def read_status(workdir: str) -> dict | None:
    """WORKDIR/run_status.json as a dict; None when the run has not written one yet.

    Raises:
      ValueError: the file exists but is not a JSON object (writes are atomic,
        so it was damaged outside the framework).
    """
    path = os.path.join(workdir, STATUS_FILE)
    try:
        with fs.open(path) as f:
            status = json.load(f)
    except FileNotFoundError:
        return None
    except fs.StorageError:
        raise  # the storage, not the file, is at fault
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete it and rerun the run") from e
    if not isinstance(status, dict):
        raise ValueError(f"{path} holds {type(status).__name__}, not a status object")
    return status


def write_results(
    workdir: str,
    config,
    rows: list[dict[str, Any]],
    artifacts: Mapping[str, Any] | None = None,
) -> str:
    """Writes WORKDIR/results.json (process 0 only); returns its path.

    Format: {"workdir", "config": the full config, "results": rows,
    "artifacts": {"<eval>/<checkpoint>": {...}}} (artifacts such as confusion
    matrices, which are not single numbers). Each row: eval, metric, value,
    ci_low, ci_high, split, dataset, step, checkpoint, plus tags such as
    protocol and label_fraction and the RESULT_TAGS facets, and fields that
    describe a number (an operating point's 'threshold', 'fit_on', a small
    subgroup's 'too_small'); micle_jax/report.py reads them.
    """
    path = os.path.join(workdir, RESULTS_FILE)
    if _is_main_process():
        data = {
            "workdir": workdir,
            "config": json.loads(config.to_json_best_effort()),
            "results": rows,
            "artifacts": dict(artifacts or {}),
        }
        write_json_atomic(path, data)
    return path


def write_cases(workdir: str, case_ids: Sequence[str]) -> str:
    """Writes WORKDIR/label_fraction_cases.txt (one case id a line); returns its path."""
    path = os.path.join(workdir, CASES_FILE)
    with atomic_open(path) as f:
        f.writelines(f"{c}\n" for c in case_ids)
    return path


def read_cases(workdir: str) -> list[str]:
    """The case ids written by `write_cases`."""
    with fs.open(os.path.join(workdir, CASES_FILE)) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def best_dir(workdir: str) -> str:
    """WORKDIR/best: where fine-tuning keeps the best checkpoint by validation."""
    return os.path.join(workdir, BEST_DIR)


def checkpoint_label(state_dir: str | os.PathLike) -> str:
    """'best' for a checkpoint under WORKDIR/best/, else 'final' (the results.json label).

    Args:
      state_dir: a checkpoint's state folder, WORKDIR[/best]/checkpoints/<step>/state.
    """
    if fs.is_url(state_dir):
        parts = pathlib.PurePosixPath(os.fspath(state_dir).split("://", 1)[1]).parts
    else:
        parts = pathlib.Path(state_dir).resolve().parts
    if CHECKPOINT_DIR in parts:
        at = len(parts) - 1 - parts[::-1].index(CHECKPOINT_DIR)
        return "best" if at > 0 and parts[at - 1] == BEST_DIR else "final"
    return "final"
