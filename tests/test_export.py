"""Export: the SavedModel predicts as predict.py does; the model card tells the truth."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from micle_jax import checkpoint, export, model_card, models, predict, recipes, rundir
from micle_jax.data import records
from micle_jax.task import TaskInfo
from micle_jax.trainers import finetune

# Every test but the unit ones needs the module's fine-tuning run (about 20 s on 2 CPU cores).
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = "synthetic:num_cases=32,num_classes=3,image_size=24,max_images_per_case=1"
ATOL = 1e-5  # float32: the SavedModel and predict.py run the same XLA computation


def _finetune(workdir: str, source: str, select_best: bool = False) -> str:
    """A 2-step fine-tuning run from scratch with a test evaluation; its workdir.

    select_best: evaluate every step and keep the best checkpoint in WORKDIR/best.
    """
    config = recipes.finetune_config("r18x0.25")
    recipes.runlocal_finetune(config)
    config.data.source = source
    config.data.image_size = 16
    config.total_steps = 2
    config.batch_size = 8
    config.checkpoint_every_steps = 2
    config.bootstrap_samples = 20
    kind = "multilabel" if "multilabel=True" in source else "classification"
    config.evals.test = dict(type=kind, data=dict(split="test"), every_steps=int(select_best))
    config.select_best = "test/accuracy" if select_best else ""
    config.lock()
    finetune.main(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _finetune(str(tmp_path_factory.mktemp("ft")), SYNTHETIC, select_best=True)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """(export.Exported, the SavedModel loaded with plain TensorFlow)."""
    result = export.export(run, str(tmp_path_factory.mktemp("exports") / "model"))
    return result, tf.saved_model.load(result.path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Image files of different sizes, channel layouts and formats: {file name: bytes}."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = {
        "gray.png": tf.io.encode_png(rng.integers(0, 256, (30, 20, 1), dtype=np.uint8)),
        "rgb.png": tf.io.encode_png(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)),
        "rgba.png": tf.io.encode_png(rng.integers(0, 256, (25, 25, 4), dtype=np.uint8)),
        "big.png": tf.io.encode_png(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)),
        "photo.jpg": tf.io.encode_jpeg(rng.integers(0, 256, (33, 45, 3), dtype=np.uint8)),
    }
    files = {name: data.numpy() for name, data in files.items()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder, files


def _predict_probs(workdir: str, pattern: str) -> dict[str, np.ndarray]:
    """predict.py's probabilities by file name."""
    _, rows = predict.predict(workdir, images=pattern, batch_size=4)
    return {os.path.basename(r[0]): np.array(r[3:], np.float64) for r in rows}


def _features(workdir: str, paths: list[str]) -> np.ndarray:
    """The model's 'features' on predict.py's preprocessing of `paths`, computed in JAX."""
    model, variables, task, _ = predict.load_run(workdir)
    batch = next(predict.image_batches(paths, task.image_size, len(paths)))
    return np.asarray(model.apply(variables, batch["image"], train=False)["features"])


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_bytes_signature_matches_predict(run, exported, images):
    """PNG (gray, RGB, RGBA) and JPEG files of any size: predict.py's probabilities, the
    model's features, whatever the batch size."""
    _, loaded = exported
    folder, files = images
    names = sorted(files)
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([files[n] for n in names]))
    expected = _predict_probs(run, str(folder / "*"))
    assert _max_diff(out["probabilities"], [expected[n] for n in names]) <= ATOL
    features = _features(run, [str(folder / n) for n in names])
    np.testing.assert_allclose(out["embedding"].numpy(), features, atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(
        tf.nn.softmax(out["logits"]).numpy(), out["probabilities"].numpy(), atol=1e-6
    )
    one = loaded.signatures["serving_default"](image_bytes=tf.constant([files["gray.png"]]))
    assert _max_diff(one["probabilities"][0], expected["gray.png"]) <= ATOL


def test_uint8_signature_matches_predict(run, exported, tmp_path):
    """A uint8 batch gets the same preprocessing as the same images read from PNG files."""
    _, loaded = exported
    arrays = np.random.default_rng(1).integers(0, 256, (3, 30, 22, 3), dtype=np.uint8)
    for i, array in enumerate(arrays):
        (tmp_path / f"{i}.png").write_bytes(tf.io.encode_png(array).numpy())
    out = loaded.signatures["serve_images"](images=tf.constant(arrays))
    expected = _predict_probs(run, str(tmp_path / "*.png"))
    assert _max_diff(out["probabilities"], [expected[f"{i}.png"] for i in range(3)]) <= ATOL
    features = _features(run, [str(tmp_path / f"{i}.png") for i in range(3)])
    np.testing.assert_allclose(out["embedding"].numpy(), features, atol=ATOL, rtol=ATOL)


def test_savedmodel_holds_variables_and_class_names(run, exported):
    """Weights as variables (not graph constants), any batch size, the logit order kept."""
    result, loaded = exported
    task = result.task
    assert [c.decode() for c in loaded.class_names.numpy()] == task.class_names
    assert loaded.label_type.numpy().decode() == "multiclass"
    with open(os.path.join(result.path, "assets", export.CLASS_NAMES_ASSET)) as f:
        assert f.read().splitlines() == task.class_names
    weights = checkpoint.load_variables(run)
    want = sorted(np.shape(x) for x in jax.tree.leaves(weights))
    saved = tf.train.list_variables(os.path.join(result.path, "variables", "variables"))
    have = sorted(tuple(shape) for name, shape in saved if name.startswith("model_variables/"))
    assert have == want
    # Weights baked in as constants would take 4 bytes a parameter in the graph.
    graph_bytes = os.path.getsize(os.path.join(result.path, "saved_model.pb"))
    assert graph_bytes < models.count_params(weights["params"])
    for name, spec in (("serving_default", [None]), ("serve_images", [None, None, None, 3])):
        (inputs,) = loaded.signatures[name].structured_input_signature[1].values()
        assert inputs.shape.as_list() == spec


def test_probabilities_follow_the_label_type():
    logits = np.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], np.float32)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(export.probabilities(logits, "multiclass"), softmax, atol=1e-6)
    sigmoid = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(export.probabilities(logits, "multilabel"), sigmoid, atol=1e-6)
    with pytest.raises(ValueError, match="accepted: multiclass, multilabel"):
        export.probabilities(logits, "none")


def test_multilabel_export_matches_predict(images, tmp_path_factory):
    """Independent sigmoids, as predict.py, for a multilabel run."""
    workdir = _finetune(str(tmp_path_factory.mktemp("ml")), SYNTHETIC + ",multilabel=True")
    result = export.export(workdir, str(tmp_path_factory.mktemp("ml_export") / "model"))
    loaded = tf.saved_model.load(result.path)
    folder, files = images
    names = sorted(files)
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([files[n] for n in names]))
    expected = _predict_probs(workdir, str(folder / "*"))
    assert _max_diff(out["probabilities"], [expected[n] for n in names]) <= ATOL
    card = _read_card(result.path)
    assert card["model"]["label_type"] == "multilabel"
    assert "auc_mean" in [r["metric"] for r in card["metrics"]]


def _read_card(path: str) -> dict:
    with open(os.path.join(path, model_card.CARD_JSON)) as f:
        return json.load(f)


def _check_card_metrics(folder: str, workdir: str, which: str) -> None:
    """The card's metrics are exactly results.json's rows of checkpoint `which` (and its step)."""
    card = _read_card(folder)
    with open(os.path.join(workdir, rundir.RESULTS_FILE)) as f:
        rows = [r for r in json.load(f)["results"] if r["checkpoint"] == which and "ci_low" in r]
    assert rows and len(card["metrics"]) == len(rows)
    with open(os.path.join(folder, model_card.CARD_MARKDOWN)) as f:
        markdown = f.read()
    for row, got in zip(rows, card["metrics"], strict=True):
        assert (got["metric"], got["checkpoint"]) == (row["metric"], which)
        assert got["step"] == row["step"] == card["export"]["checkpoint"]["step"]
        assert (got["value"], got["ci_low"], got["ci_high"]) == (
            row["value"],
            row["ci_low"],
            row["ci_high"],
        )
        assert f"| {row['metric']} | {row['value']:.4f} | [{row['ci_low']:.4f}, " in markdown


def test_model_card_holds_the_runs_results(run, exported):
    """Architecture, data, classes and the final checkpoint's metrics with their intervals."""
    result, _ = exported
    card = _read_card(result.path)
    _check_card_metrics(result.path, run, "final")
    params = checkpoint.load_variables(run)["params"]
    assert card["model"]["parameters"] == models.count_params(params)
    assert (card["model"]["depth"], card["model"]["width"]) == (18, 0.25)
    assert card["model"]["class_names"] == result.task.class_names
    assert card["finetuning"]["label_fraction"] == 1.0 and card["finetuning"]["steps"] == 2
    assert card["finetuning"]["data"]["source"] == SYNTHETIC
    assert card["export"]["checkpoint"]["which"] == "final"
    with open(os.path.join(result.path, model_card.CARD_MARKDOWN)) as f:
        markdown = f.read()
    assert card["pretraining"] == [] and "trained from scratch" in markdown
    assert not card["non_commercial"] and "NON-COMMERCIAL" not in markdown
    assert "not a medical device" in markdown


def test_model_card_of_the_best_checkpoint(run, tmp_path):
    """--checkpoint=best: the best checkpoint's rows, not the final one's."""
    result = export.export(run, str(tmp_path / "best"), which="best")
    assert _read_card(result.path)["export"]["checkpoint"]["which"] == "best"
    _check_card_metrics(result.path, run, "best")


def _write_json(path, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def _non_commercial_records(path: str) -> None:
    info = records.DatasetInfo(
        name="derm_nc",
        label_type="none",
        class_names=[],
        splits={},
        license="CC BY-NC 4.0 (non-commercial)",
        citation="Someone et al. 2020",
    )
    records.write_info(path, info)


def test_cli_card_follows_init_chain_and_warns_non_commercial(run, exported, tmp_path):
    """MICLe on non-commercial data, from imported weights: the chain, and the warning first."""
    imported = str(tmp_path / "imported")
    _write_json(
        os.path.join(imported, rundir.CONFIG_FILE),
        {"imported_from": {"source": "gs://simclr/r50_1x", "format": "checkpoint"}},
    )
    data = str(tmp_path / "derm_nc")
    _non_commercial_records(data)
    pretrained = str(tmp_path / "micle")
    pretrain_config = {
        "trainer": "pretrain",
        "batch_size": 64,
        "total_steps": None,
        "total_epochs": 100.0,
        "data": {"source": f"records:{data}", "mode": "micle"},
        "init": {"checkpoint": os.path.join(imported, "checkpoints", "0")},
    }
    _write_json(os.path.join(pretrained, rundir.CONFIG_FILE), pretrain_config)
    _write_json(os.path.join(pretrained, rundir.STATUS_FILE), {"status": "finished", "step": 400})
    workdir = str(tmp_path / "ft")
    shutil.copytree(run, workdir)
    config = rundir.read_config(workdir)
    config["init"]["checkpoint"] = os.path.join(pretrained, "checkpoints", "400")
    config["data"]["label_fraction"] = 0.25  # the card reports the run's, not a default
    _write_json(os.path.join(workdir, rundir.CONFIG_FILE), config)
    out = str(tmp_path / "exports" / "model")
    proc = subprocess.run(
        [sys.executable, "-m", "micle_jax.export", f"--workdir={workdir}", f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = dataclasses.replace(exported[0], path=out).summary()
    assert proc.stdout == summary + "\n"
    card = _read_card(out)
    micle, weights = card["pretraining"]
    assert (micle["method"], micle["steps"], micle["batch_size"]) == ("MICLe", 400, 64)
    assert micle["workdir"] == pretrained and micle["data"]["name"] == "derm_nc"
    assert weights["method"] == "imported" and weights["workdir"] == imported
    assert weights["imported_from"]["source"] == "gs://simclr/r50_1x"
    assert card["non_commercial"] and card["non_commercial_datasets"] == ["derm_nc"]
    assert card["finetuning"]["label_fraction"] == 0.25
    with open(os.path.join(out, model_card.CARD_MARKDOWN)) as f:
        head = f.read().splitlines()
    assert "- Label fraction: 0.25 of the training cases" in head
    assert "NON-COMMERCIAL USE ONLY" in head[2] and "derm_nc" in head[2]
    assert any("MICLe on derm_nc" in line and "400 steps of batch 64" in line for line in head)
    assert any("released weights imported from `gs://simclr/r50_1x`" in line for line in head)


def test_pretraining_chain_records_unknown_stages(tmp_path):
    missing = str(tmp_path / "gone" / "checkpoints" / "100")
    (stage,) = model_card.pretraining_chain({"init": {"checkpoint": missing}})
    assert stage["method"] == "unknown" and stage["workdir"] is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / rundir.CONFIG_FILE).write_text("{not json")
    (stage,) = model_card.pretraining_chain({"init": {"checkpoint": str(broken)}})
    assert stage["method"] == "unknown"
    loop = str(tmp_path / "loop")
    _write_json(os.path.join(loop, rundir.CONFIG_FILE), {"init": {"checkpoint": loop}})
    chain = model_card.pretraining_chain({"init": {"checkpoint": loop}})
    assert [s["method"] for s in chain][-1] == "unknown" and len(chain) == 2
    assert model_card.pretraining_chain({"init": {"checkpoint": ""}}) == []


def test_licences_of_the_demo_data():
    ham = model_card.describe_data(f"records:{REPO}/data/demo/ham10000")
    assert ham["non_commercial"] and "CC BY-NC 4.0" in ham["license"] and ham["citation"]
    kermany = model_card.describe_data(f"records:{REPO}/data/demo/kermany_cxr")
    assert not kermany["non_commercial"] and kermany["license"].startswith("CC BY 4.0")
    elsewhere = model_card.describe_data("records:/not/here/ham10000")
    assert elsewhere["non_commercial"] and elsewhere["note"]
    assert model_card.describe_data("tfds:imagenet2012")["license"] == "unknown"


def _demo_card(workdir, finetune_on: str, evaluate_on: str) -> dict:
    """The card of a classifier fine-tuned on one embedded demo dataset, evaluated on another."""
    config = {
        "batch_size": 8,
        "total_steps": 3,
        "model": {"depth": 18, "width": 0.25, "sk_ratio": 0.0, "proj_layers": 3},
        "data": {"source": f"records:{REPO}/data/demo/{finetune_on}", "label_fraction": 0.1},
        "evals": {"shift": {"data": {"source": f"records:{REPO}/data/demo/{evaluate_on}"}}},
        "init": {"checkpoint": ""},
    }
    task = TaskInfo("multiclass", ["a", "b"], 32, finetune_on)
    state = os.path.join(workdir, rundir.CHECKPOINT_DIR, "3", "state")
    serving = {"signatures": export.SIGNATURES, "outputs": export.OUTPUTS, "platforms": ["cpu"]}
    params = {"w": np.zeros((4, 2), np.float32)}
    return model_card.build_card(
        str(workdir), config, task, params, {"which": "final", "path": state, "step": 3}, serving
    )


def test_card_of_a_ham10000_classifier_says_non_commercial(tmp_path):
    """Fine-tuned on HAM10000 (CC BY-NC 4.0): the card's first statement is the restriction."""
    card = _demo_card(tmp_path, "ham10000", "kermany_cxr")
    assert card["non_commercial"] and card["non_commercial_datasets"] == ["ham10000"]
    licences = {d["used_for"]: d for d in card["licenses"]}
    assert licences["fine-tuning"]["license"].startswith("CC BY-NC 4.0")
    assert licences["evaluation"]["name"] == "kermany_cxr"
    head = model_card.render_markdown(card).splitlines()
    assert head[2].startswith("> **NON-COMMERCIAL USE ONLY") and "(ham10000)" in head[2]
    # Evaluated on HAM10000 but trained on CC BY data: the weights carry no restriction,
    # and the card still lists HAM10000's licence.
    card = _demo_card(tmp_path, "kermany_cxr", "ham10000")
    assert not card["non_commercial"]
    assert "NON-COMMERCIAL USE ONLY" not in model_card.render_markdown(card)
    evaluation = [d for d in card["licenses"] if d["used_for"] == "evaluation"]
    assert [d["name"] for d in evaluation] == ["ham10000"] and evaluation[0]["non_commercial"]


def _leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_export_errors_write_nothing(run, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    notarun = tmp_path / "pretrain"
    _write_json(str(notarun / rundir.CONFIG_FILE), {"trainer": "pretrain"})
    with pytest.raises(FileNotFoundError, match="task_info.json not found.*not a fine-tuning"):
        export.export(str(notarun), str(out / "a"))
    nobest = tmp_path / "nobest"
    shutil.copytree(run, nobest, ignore=shutil.ignore_patterns(rundir.BEST_DIR))
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        export.export(str(nobest), str(out / "a"), which="best")
    nockpt = tmp_path / "nockpt"
    shutil.copytree(run, nockpt, ignore=shutil.ignore_patterns(rundir.CHECKPOINT_DIR))
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        export.export(str(nockpt), str(out / "a"))
    assert _leftovers(out) == []
    taken = out / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="already exists.*give a new folder"):
        export.export(run, str(taken))
    assert _leftovers(taken) == ["mine.txt"] and (taken / "mine.txt").read_text() == "keep"


def test_failed_export_leaves_no_folder(run, tmp_path, monkeypatch):
    """A failure after the SavedModel is written leaves neither DIR nor its temporary folder."""
    real = model_card.write_card

    def write_then_fail(folder, card):
        real(folder, card)
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_card, "write_card", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export(run, str(tmp_path / "model"))
    assert _leftovers(tmp_path) == []


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "micle_jax.export",
            f"--workdir={tmp_path}",
            f"--out={tmp_path / 'model'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("micle_jax.export")]
    assert errors == [proc.stderr.splitlines()[-1]]
    assert errors[0].startswith("micle_jax.export: error: ")
    assert "not a fine-tuning workdir" in errors[0]
    assert _leftovers(tmp_path) == []
