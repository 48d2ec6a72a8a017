"""Tests for micle_jax/data/sources/: in-memory, streamed and synthetic sources, image tables."""

import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from fixtures import tiny_records
from sklearn.linear_model import LogisticRegression

from micle_jax.data import records
from micle_jax.data.sources import image_table, in_memory, interface, registry, synthetic
from micle_jax.data.stream import pipeline

SMALL = "synthetic:num_cases=120,num_classes=4,image_size=16,max_images_per_case=3"


def test_synthetic_is_deterministic_multi_image_and_linearly_separable():
    source = registry.get_source(SMALL)
    train = source.table("train", interface.Share())
    again = synthetic.make_table(
        "train", num_cases=120, num_classes=4, image_size=16, max_images_per_case=3
    )
    np.testing.assert_array_equal(train.pixels, again.pixels)
    assert train.num_cases == 120 and set(train.case_size.tolist()) == {1, 2, 3}
    assert np.bincount(train.label_class[train.case_start]).tolist() == [30] * 4
    # Images of one case share the class but are not copies of each other.
    first = int(np.flatnonzero(train.case_size >= 2)[0])
    a, b = (train.image(int(train.case_start[first]) + j) for j in range(2))
    assert a.shape == (16, 16, 3) and not np.array_equal(a, b)
    # A linear probe on raw pixels learns the class on held-out cases.
    test = source.table("test", interface.Share())
    assert test.num_cases == 30

    def features(t):
        return np.stack([t.image(i) for i in range(t.num_images)]).reshape(t.num_images, -1) / 255

    probe = LogisticRegression(max_iter=300).fit(features(train), train.label_class)
    assert probe.score(features(test), test.label_class) > 0.7  # chance is 0.25


def test_synthetic_options_are_checked():
    with pytest.raises(ValueError, match="unknown config argument 'num_case'"):
        registry.get_source("synthetic:num_case=3")
    with pytest.raises(ValueError, match="image_size=4 must be >= 8"):
        registry.get_source("synthetic:image_size=4")
    with pytest.raises(ValueError, match="not understood"):
        registry.get_source("tfrecords:/tmp/x")


def test_from_arrays_groups_images_by_case_id():
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    source = in_memory.from_arrays(
        images, np.array([0, 1, 2, 1, 0]), case_ids=["b", "a", "b", "c", "a"]
    )
    t = source.table("train", interface.Share())
    assert t.case_ids.tolist() == [b"b", b"a", b"c"] and t.case_size.tolist() == [2, 2, 1]
    # Case 'b' holds input images 0 and 2, in that order, with their labels.
    np.testing.assert_array_equal(t.image(0)[..., 0], images[0])
    np.testing.assert_array_equal(t.image(1)[..., 0], images[2])
    assert t.label_class.tolist() == [0, 2, 1, 0, 1]
    assert source.info.label_type == "multiclass" and source.info.class_names == ["0", "1", "2"]
    with pytest.raises(ValueError, match="available splits: \\['train'\\]"):
        source.table("test", interface.Share())
    # Shares take every second case.
    assert source.table("train", interface.Share(1, 2)).case_ids.tolist() == [b"a"]
    assert source.counts("train", interface.Share(0, 2)).images.tolist() == [2, 1]


def test_npz_source_medmnist_layout(tmp_path):
    path = tmp_path / "mini.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_images=rng.integers(0, 256, (6, 5, 5), dtype=np.uint8),
        train_labels=np.array([[0], [1], [2], [0], [1], [2]], np.uint8),
        val_images=np.zeros((2, 5, 5), np.uint8),
        val_labels=np.zeros((2, 1), np.uint8),
    )
    source = registry.get_source(f"arrays:{path}")
    assert source.info.num_classes == 3
    assert source.counts("validation", interface.Share()).images.sum() == 2
    with pytest.raises(ValueError, match="split 'test' not found"):
        source.table("test", interface.Share())
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        registry.get_source(f"arrays:{tmp_path}/missing.npz")


def test_pneumoniamnist_npz(shared_data):
    source = registry.get_source(f"arrays:{shared_data}/pneumoniamnist-balanced/pneumoniamnist.npz")
    counts = {
        s: source.counts(s, interface.Share()).images.sum() for s in ("train", "validation", "test")
    }
    assert counts == {"train": 2428, "validation": 270, "test": 468}
    labels = source.table("test", interface.Share()).label_class
    assert np.bincount(labels).tolist() == [234, 234]


def test_records_counts_and_corrupt_image_skipped(tmp_path):
    cases = tiny_records.make_cases([2, 3, 1])
    cases[1]["images"][0] = b"not an image"
    source = registry.get_source(tiny_records.write(tmp_path, cases, num_shards=1))
    counts = source.counts("train", interface.Share())
    assert counts.images.tolist() == [2, 2, 1]
    got = list(source.cases("train", interface.Share()).as_numpy_iterator())
    assert [c["image_ids"].tolist() for c in got] == [
        [b"case000/img0", b"case000/img1"],
        [b"case001/img1", b"case001/img2"],
        [b"case002/img0"],
    ]
    assert got[0]["label_multi"].shape == (2, 0) and got[1]["label_class"].tolist() == [1, 1]


def test_truncated_png_is_skipped_when_decoding(tmp_path):
    """A file with a valid header but a broken body passes the byte check, fails decoding."""
    cases = tiny_records.make_cases([2, 1])
    cases[0]["images"][1] = cases[0]["images"][1][:40]
    source_name = tiny_records.write(tmp_path, cases, num_shards=1)
    source = registry.get_source(source_name)
    table = source.table("train", interface.Share())
    assert table.image_ids.tolist() == [b"case000/img0", b"case001/img0"]
    # Streamed: the example is dropped instead of crashing the input pipeline.
    cfg = ml_collections.ConfigDict(dict(source=source_name, image_size=8, augment="none"))
    ds = pipeline.open_data(cfg, seed=0).dataset("simclr", 1)
    ids = [b["image_id1"][0] for b, _ in zip(ds.as_numpy_iterator(), range(6), strict=False)]
    assert b"case000/img1" not in ids and set(ids) == {b"case000/img0", b"case001/img0"}
    # Every image truncated: nothing decodes, which is an error naming the fix.
    for case in cases:
        case["images"] = [image[:40] for image in case["images"]]
    source = registry.get_source(tiny_records.write(tmp_path / "none", cases, num_shards=1))
    with pytest.raises(ValueError, match="no image could be decoded.*micle_jax.data.convert"):
        source.table("train", interface.Share())


def test_records_without_usable_image_is_an_error(tmp_path):
    cases = tiny_records.make_cases([1, 2])
    for case in cases:
        case["images"] = [b"junk"] * len(case["images"])
    source = registry.get_source(tiny_records.write(tmp_path, cases, num_shards=1))
    with pytest.raises(ValueError, match=f"records '{tmp_path}' split 'train' has no usable"):
        source.counts("train", interface.Share())
    with pytest.raises(FileNotFoundError, match="micle_jax.data.convert"):
        registry.get_source(f"records:{tmp_path}/nowhere")
    with pytest.raises(ValueError, match="available splits: \\['train'\\]"):
        source.counts("test", interface.Share())


def test_opening_records_checks_every_shard_against_its_sha256(tmp_path):
    good = tmp_path / "good"
    tiny_records.write(good, tiny_records.make_cases([1, 2, 1, 2]), num_shards=2)
    assert registry.get_source(f"records:{good}").info.name == "tiny"
    # A copy with one byte of a shard changed (same size), and one missing a shard.
    changed, missing = tmp_path / "changed", tmp_path / "missing"
    shutil.copytree(good, changed)
    shutil.copytree(good, missing)
    shard = changed / "train-00001-of-00002"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (missing / "train-00000-of-00002").unlink()
    fix = "convert the data again with `python -m micle_jax.data.convert`"
    with pytest.raises(ValueError, match=f"shard '{shard}' fails its sha256 check.*{fix}"):
        registry.get_source(f"records:{changed}")
    with pytest.raises(ValueError, match="train-00000-of-00002' is missing.*convert the data"):
        registry.get_source(f"records:{missing}")


def test_multilabel_records_keep_their_labels(tmp_path):
    cases = tiny_records.make_cases([2, 1])
    cases[0]["label_multi"] = [[1, records.UNCERTAIN], [0, records.MISSING]]
    cases[1]["label_multi"] = [[0, 1]]
    for case in cases:
        case["label_class"] = [-1] * len(case["images"])
    source = registry.get_source(
        tiny_records.write(tmp_path, cases, num_shards=1, label_type="multilabel")
    )
    assert source.counts("train", interface.Share()).labeled.tolist() == [2, 1]
    table = source.table("train", interface.Share())
    np.testing.assert_array_equal(table.label_multi, [[1, -1], [0, -2], [0, 1]])


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=6):
        source = registry.get_source("tfds:cifar10")
        assert source.info.label_type == "multiclass" and source.info.num_classes == 10
        assert source.counts("train", interface.Share()).images.tolist() == [1] * 6
        cfg = ml_collections.ConfigDict(dict(source="tfds:cifar10", image_size=8, augment="none"))
        data = pipeline.open_data(cfg, seed=0)
        assert data.num_examples("simclr") == 6
        batch = next(data.dataset("simclr", 6).as_numpy_iterator())
        assert batch["view1"].shape == (6, 8, 8, 3) and len(set(batch["image_id1"])) == 6
        assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()
        table = source.table("train", interface.Share())
        assert table.num_images == 6 and table.image(0).shape == (32, 32, 3)


def test_tfds_data_dir_and_unprepared_dataset(tmp_path):
    source = registry.get_source(f"tfds:cifar10?data_dir={tmp_path}")
    assert str(source.builder.data_dir).startswith(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        source.counts("train", interface.Share())


def test_decode_image_keeps_colour_channels_only():
    gray_alpha = tf.io.encode_png(tf.zeros([4, 5, 2], tf.uint8))
    rgba = tf.io.encode_png(tf.fill([4, 5, 4], tf.constant(7, tf.uint8)))
    assert image_table.decode_image(gray_alpha).shape == (4, 5, 1)
    out = image_table.decode_image(rgba)
    assert out.shape == (4, 5, 3) and int(tf.reduce_max(out)) == 7


def test_records_table_is_decoded_once_per_split_and_share(tmp_path, monkeypatch):
    # An eval every N steps reads its split through the same source: one decode per run.
    source = registry.get_source(tiny_records.write(tmp_path, tiny_records.make_cases([2, 1, 3])))
    calls = []
    materialize = image_table.materialize
    monkeypatch.setattr(
        image_table, "materialize", lambda *a, **k: calls.append(a[-1]) or materialize(*a, **k)
    )
    first = source.table("train", interface.Share())
    assert source.table("train", interface.Share()) is first and len(calls) == 1
    # Another share is another table.
    half = source.table("train", interface.Share(0, 2))
    assert len(calls) == 2 and half.num_images < first.num_images
