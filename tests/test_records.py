"""Tests of micle_jax/data/records.py: the case record format round trip."""

import hashlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from micle_jax.data import records, shards


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt.upper())
    return buffer.getvalue()


def _cases():
    """Two cases: one grayscale PNG; three images (PNG, JPEG, PNG), RGB and gray."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 7), np.uint8)
    rgb = rng.integers(0, 256, (6, 4, 3), np.uint8)
    smooth = np.full((8, 8, 3), 120, np.uint8)  # JPEG of a flat image decodes almost exactly
    gray2 = rng.integers(0, 256, (3, 9), np.uint8)
    return [
        dict(
            case_id="patient-1",
            arrays=[gray],
            formats=["png"],
            image_ids=["p1-a"],
            meta=[{"view": "pa"}],
            label_class=[1],
            label_multi=[[1.0, 0.0, records.UNCERTAIN]],
        ),
        dict(
            case_id="patient-2",
            arrays=[rgb, smooth, gray2],
            formats=["png", "jpeg", "png"],
            image_ids=["p2-a", "p2-b", "p2-c"],
            meta=None,
            label_class=[0, -1, 2],
            label_multi=[
                [records.MISSING, 1.0, 0.0],
                [0.0, 0.0, 0.0],
                [1.0, records.UNCERTAIN, 1.0],
            ],
        ),
    ]


def _write_dataset(path, label_type, num_shards=1):
    cases = _cases()
    examples = []
    for case in cases:
        case["images"] = [
            _encode(a, f) for a, f in zip(case["arrays"], case["formats"], strict=True)
        ]
        examples.append(
            records.make_case_example(
                case["case_id"],
                case["images"],
                case["image_ids"],
                case["formats"],
                meta=case["meta"],
                label_class=case["label_class"] if label_type != "none" else None,
                label_multi=case["label_multi"] if label_type == "multilabel" else None,
            ).SerializeToString()
        )
    written = shards.write_split(str(path), "train", examples, num_shards)
    info = records.DatasetInfo(
        name="toy",
        label_type=label_type,
        class_names=["a", "b", "c"] if label_type != "none" else [],
        splits={"train": shards.make_split_info(written, [len(c["images"]) for c in cases])},
    )
    records.write_info(str(path), info)
    return cases


def _check_parsed(parsed, case, label_type):
    n = len(case["images"])
    assert parsed["case_id"] == case["case_id"].encode()
    assert list(parsed["images"]) == case["images"]
    assert [i.decode() for i in parsed["image_ids"]] == case["image_ids"]
    assert [f.decode() for f in parsed["formats"]] == case["formats"]
    expected_meta = case["meta"] or [{}] * n
    assert [json.loads(m) for m in parsed["meta"]] == expected_meta
    assert parsed["label_class"].dtype == np.int32
    if label_type == "none":
        np.testing.assert_array_equal(parsed["label_class"], [-1] * n)
    else:
        np.testing.assert_array_equal(parsed["label_class"], case["label_class"])
    assert parsed["label_multi"].dtype == np.float32
    if label_type == "multilabel":
        np.testing.assert_array_equal(parsed["label_multi"], case["label_multi"])
    else:
        assert parsed["label_multi"].shape == (n, 0)
    for encoded, array, fmt in zip(parsed["images"], case["arrays"], case["formats"], strict=True):
        decoded = tf.io.decode_image(encoded, expand_animations=False).numpy()
        expected = array if array.ndim == 3 else array[..., None]
        if fmt == "png":  # lossless
            np.testing.assert_array_equal(decoded, expected)
        else:
            assert np.abs(decoded.astype(int) - expected).max() <= 2


@pytest.mark.parametrize("label_type", ["none", "multiclass", "multilabel"])
def test_round_trip_eager_and_in_dataset_map(tmp_path, label_type):
    cases = _write_dataset(tmp_path, label_type)
    info = records.load_info(str(tmp_path))
    assert info.num_classes == (0 if label_type == "none" else 3)
    assert info.splits["train"]["images_per_case"] == {"1": 1, "3": 1}
    files = shards.shard_paths(str(tmp_path), "train")
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(files)]
    eager = [
        {k: v.numpy() for k, v in records.parse_case(tf.constant(s), 3, label_type).items()}
        for s in serialized
    ]
    mapped = list(
        tf.data.TFRecordDataset(files)
        .map(lambda s: records.parse_case(s, info.num_classes, label_type))
        .as_numpy_iterator()
    )
    assert len(eager) == len(mapped) == 2
    for case, a, b in zip(cases, eager, mapped, strict=True):
        _check_parsed(a, case, label_type)
        _check_parsed(b, case, label_type)


def test_write_split_round_robin_and_checksums(tmp_path):
    examples = [
        records.make_case_example(f"c{i}", [b"x"], [f"i{i}"], ["png"]).SerializeToString()
        for i in range(7)
    ]
    written = shards.write_split(str(tmp_path), "validation", examples, num_shards=3)
    assert [s["file"] for s in written] == [f"validation-0000{i}-of-00003" for i in range(3)]
    assert [s["num_cases"] for s in written] == [3, 2, 2]
    for shard in written:
        data = (tmp_path / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    paths = shards.shard_paths(str(tmp_path), "validation")
    assert paths == sorted(str(tmp_path / s["file"]) for s in written)
    ids = [
        records.parse_case(r, 0, "none")["case_id"].numpy().decode()
        for r in tf.data.TFRecordDataset(paths)
    ]
    assert sorted(ids) == sorted(f"c{i}" for i in range(7))
    split = shards.make_split_info(written, [1, 2, 2, 1, 1, 5, 1])
    assert split["num_cases"] == 7 and split["num_images"] == 13
    assert split["images_per_case"] == {"1": 4, "2": 2, "5": 1}
    info = records.DatasetInfo("t", "none", [], {"validation": split})
    shards.verify_shards(str(tmp_path), info)
    (tmp_path / written[1]["file"]).write_bytes(b"changed")
    with pytest.raises(ValueError, match="sha256"):
        shards.verify_shards(str(tmp_path), info)
    # Over the size limit only presence is checked (hashing a pod-scale dataset in
    # every process would take minutes); None always hashes.
    size = sum((tmp_path / s["file"]).stat().st_size for s in written)
    shards.verify_shards(str(tmp_path), info, max_hash_bytes=size - 1)
    with pytest.raises(ValueError, match="sha256"):
        shards.verify_shards(str(tmp_path), info, max_hash_bytes=size)
    with pytest.raises(ValueError, match="sha256"):
        shards.verify_shards(str(tmp_path), info, max_hash_bytes=None)
    (tmp_path / written[2]["file"]).unlink()
    with pytest.raises(ValueError, match="is missing; convert the data again"):
        shards.verify_shards(str(tmp_path), info, max_hash_bytes=0)


def test_shard_paths_names_available_splits(tmp_path):
    shards.write_split(str(tmp_path), "train", [b""], 1)
    with pytest.raises(ValueError, match=r"'test'.*available splits: \['train'\]"):
        shards.shard_paths(str(tmp_path), "test")
    with pytest.raises(ValueError, match="micle_jax.data.convert"):
        shards.shard_paths(str(tmp_path / "nothing"), "train")


def test_load_info_errors_name_path_and_fix(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*micle_jax.data.convert"):
        records.load_info(str(missing))
    with pytest.raises(FileNotFoundError, match="dataset_info.json.*micle_jax.data.convert"):
        records.load_info(str(tmp_path))
    (tmp_path / "dataset_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.*micle_jax.data.convert"):
        records.load_info(str(tmp_path))
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"name": "x", "label_type": "regression", "class_names": [], "splits": {}})
    )
    with pytest.raises(ValueError, match="regression"):
        records.load_info(str(tmp_path))


def test_info_round_trip(tmp_path):
    info = records.DatasetInfo(
        name="d",
        label_type="multilabel",
        class_names=["edema", "effusion"],
        splits={
            "test": {"num_cases": 1, "num_images": 2, "images_per_case": {"2": 1}, "shards": []}
        },
        converter={"version": "1", "args": {"seed": 3}},
        license="CC BY 4.0",
        skipped=[{"problem": "image file not found", "line": 4}],
    )
    records.write_info(str(tmp_path), info)
    assert records.load_info(str(tmp_path)) == info
    with pytest.raises(ValueError, match="class_names"):
        records.write_info(str(tmp_path), records.DatasetInfo("d", "multiclass", [], {}))


def test_make_case_example_rejects_inconsistent_cases():
    with pytest.raises(ValueError, match="no images"):
        records.make_case_example("c", [], [], [])
    with pytest.raises(ValueError, match="image_ids has 1 entries for 2 images"):
        records.make_case_example("c", [b"a", b"b"], ["x"], ["png", "png"])
    with pytest.raises(ValueError, match="formats"):
        records.make_case_example("c", [b"a"], ["x"], ["bmp"])
    with pytest.raises(ValueError, match="label_multi"):
        records.make_case_example("c", [b"a"], ["x"], ["png"], label_multi=[1.0, 0.0])


def test_parse_case_checks_multilabel_width():
    example = records.make_case_example(
        "c", [b"a", b"b"], ["x", "y"], ["png", "png"], label_multi=np.zeros((2, 3))
    ).SerializeToString()
    parsed = records.parse_case(tf.constant(example), 3, "multilabel")
    assert parsed["label_multi"].shape == (2, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="label/multilabel"):
        records.parse_case(tf.constant(example), 4, "multilabel")
    with pytest.raises(ValueError, match="label_type"):
        records.parse_case(tf.constant(example), 3, "multi")
