"""The run-directory protocol: atomic writes, status, results, labels of checkpoints."""

import json
import os
import stat

import ml_collections
import pytest

from micle_jax import rundir


def test_atomic_open_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), rundir.atomic_open(str(path)) as f:
        f.write("half a fi")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]  # no temporary file left


def test_atomic_open_creates_the_folder_and_follows_the_umask(tmp_path):
    path = tmp_path / "new" / "file.txt"
    old = os.umask(0o022)
    try:
        with rundir.atomic_open(str(path)) as f:
            f.write("x")
    finally:
        os.umask(old)
    assert path.read_text() == "x"
    # Readable by others, as a plain open() would make it (mkstemp's would be 0600).
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_status_round_trip_and_errors(tmp_path):
    assert rundir.read_status(str(tmp_path)) is None
    rundir.write_status(str(tmp_path), "running", step=3, total_steps=10)
    assert rundir.read_status(str(tmp_path)) == {"status": "running", "step": 3, "total_steps": 10}
    (tmp_path / rundir.STATUS_FILE).write_text('{"status": "runn')
    with pytest.raises(ValueError, match="run_status.json is unreadable"):
        rundir.read_status(str(tmp_path))
    (tmp_path / rundir.STATUS_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a status object"):
        rundir.read_status(str(tmp_path))


def test_results_file_format(tmp_path):
    config = ml_collections.ConfigDict({"seed": 3, "data": {"split": "train"}})
    rows = [{"eval": "test", "metric": "accuracy", "value": float("nan")}]
    path = rundir.write_results(str(tmp_path), config, rows, {"test/final": {"n": 1}})
    assert path == str(tmp_path / rundir.RESULTS_FILE)
    data = json.loads((tmp_path / rundir.RESULTS_FILE).read_text())
    assert data["config"] == {"seed": 3, "data": {"split": "train"}}
    assert data["artifacts"] == {"test/final": {"n": 1}}
    assert data["results"][0]["metric"] == "accuracy"
    assert data["workdir"] == str(tmp_path)


def test_config_file_is_the_configs_json(tmp_path):
    config = ml_collections.ConfigDict({"seed": 3, "optim": {"name": "lars"}})
    rundir.write_config(str(tmp_path), config)
    assert (tmp_path / rundir.CONFIG_FILE).read_text() == config.to_json_best_effort(indent=1)
    assert rundir.read_config(str(tmp_path)) == {"seed": 3, "optim": {"name": "lars"}}
    with pytest.raises(FileNotFoundError, match="is not a training workdir"):
        rundir.read_config(str(tmp_path / "elsewhere"))


def test_cases_round_trip(tmp_path):
    path = rundir.write_cases(str(tmp_path), ["p2", "p10", "a"])
    assert path.endswith(rundir.CASES_FILE)
    assert rundir.read_cases(str(tmp_path)) == ["p2", "p10", "a"]


@pytest.mark.parametrize(
    "state_dir, label",
    [
        ("run/checkpoints/100/state", "final"),
        ("run/best/checkpoints/40/state", "best"),
        ("best/checkpoints/40/state", "best"),
        ("best/run/checkpoints/40/state", "final"),  # a run named under a folder 'best'
        ("elsewhere/state", "final"),
    ],
)
def test_checkpoint_label(tmp_path, state_dir, label):
    assert rundir.checkpoint_label(tmp_path / state_dir) == label
