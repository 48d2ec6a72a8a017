"""Prediction: PNG files of any size and mode, and record sets, give the same probabilities."""

import csv
import os

import numpy as np
import pytest
import tensorflow as tf

from micle_jax import predict, recipes
from micle_jax.data import records, shards
from micle_jax.trainers import finetune

# Every test needs the module's fine-tuning run (about a minute on 2 CPU cores).
pytestmark = pytest.mark.slow

SYNTHETIC = "synthetic:num_cases=32,num_classes=3,image_size=24,max_images_per_case=1"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step fine-tuning run from scratch (no evals), its workdir."""
    workdir = str(tmp_path_factory.mktemp("ft"))
    config = recipes.finetune_config("r18x0.25")
    recipes.runlocal_finetune(config)
    config.data.source = SYNTHETIC
    config.data.image_size = 16
    config.total_steps = 2
    config.batch_size = 8
    config.checkpoint_every_steps = 2
    config.lock()
    finetune.main(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """PNG files of different sizes and channel layouts: {file name: uint8 array}."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    arrays = {
        "gray.png": rng.integers(0, 256, (30, 20, 1), dtype=np.uint8),
        "rgb.png": rng.integers(0, 256, (24, 40, 3), dtype=np.uint8),
        "rgba.png": rng.integers(0, 256, (25, 25, 4), dtype=np.uint8),
        "big.png": rng.integers(0, 256, (70, 50, 3), dtype=np.uint8),
    }
    for name, array in arrays.items():
        (folder / name).write_bytes(tf.io.encode_png(array).numpy())
    (folder / "notes.txt").write_text("not an image")
    return folder, arrays


def test_predict_png_files_writes_probabilities(run, images, tmp_path):
    folder, arrays = images
    header, rows = predict.predict(run, images=str(folder / "*.png"), batch_size=3)
    assert header[:3] == ["image", "case_id", "prediction"]
    assert header[3:] == ["prob/class_0", "prob/class_1", "prob/class_2"]
    assert sorted(os.path.basename(r[0]) for r in rows) == sorted(arrays)
    probs = np.array([[float(v) for v in r[3:]] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [r[2] for r in rows] == [header[3 + int(np.argmax(p))][5:] for p in probs]
    out = tmp_path / "sub" / "predictions.csv"
    predict.write_csv(str(out), header, rows)
    with open(out) as f:
        read = list(csv.reader(f))
    assert read[0] == header and len(read) == 1 + len(arrays)


def test_files_and_records_get_the_same_preprocessing(run, images, tmp_path):
    """The same images as PNG files and as records (pipeline 'eval' mode) agree."""
    folder, arrays = images
    rgb = {k: v for k, v in arrays.items() if v.shape[-1] != 4}  # records: no alpha
    examples = [
        records.make_case_example(
            f"case-{name}", [tf.io.encode_png(a).numpy()], [name], ["png"], label_class=[0]
        ).SerializeToString()
        for name, a in rgb.items()
    ]
    path = str(tmp_path / "records")
    written = shards.write_split(path, "test", examples, num_shards=1)
    info = records.DatasetInfo(
        name="new",
        label_type="multiclass",
        class_names=["class_0", "class_1", "class_2"],
        splits={"test": shards.make_split_info(written, [1] * len(rgb))},
    )
    records.write_info(path, info)
    _, from_records = predict.predict(run, records=path, split="test")
    _, from_files = predict.predict(run, images=str(folder / "*.png"))
    by_id = {r[0]: np.array(r[3:], float) for r in from_records}
    by_file = {os.path.basename(r[0]): np.array(r[3:], float) for r in from_files}
    assert set(by_id) == set(rgb)
    for name in rgb:
        np.testing.assert_allclose(by_file[name], by_id[name], atol=1e-5)


def test_predict_input_errors(run, images):
    folder, _ = images
    with pytest.raises(FileNotFoundError, match="matches no file"):
        predict.predict(run, images=str(folder / "*.jpg"))
    with pytest.raises(ValueError, match="not PNG or JPEG"):
        predict.predict(run, images=str(folder / "*"))
    with pytest.raises(ValueError, match="exactly one"):
        predict.predict(run)
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        predict.predict(run, images=str(folder / "*.png"), which="best")
    with pytest.raises(FileNotFoundError, match="task_info.json"):
        predict.predict(str(folder), images=str(folder / "*.png"))
