"""Tests of the converter (micle_jax/data/convert/: cli.py, write.py, inputs.py, images.py)."""

import csv
import hashlib
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from micle_jax.data import records, shards
from micle_jax.data.convert import make_demo_data
from micle_jax.data.convert.cli import parse_num_shards
from micle_jax.data.convert.images import ImageOptions, encode_image
from micle_jax.data.convert.inputs import (
    ConversionError,
    ImageSpec,
    assign_split,
    cases_from_csv,
    cases_from_npz,
    parse_split_fractions,
    read_case_list,
)
from micle_jax.data.convert.write import convert, verify_dataset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(path, array, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


def _write_csv(path, rows):
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _toy_rows(root, num_cases=12):
    """Case i has 1 + i % 3 distinct 6 x 5 grayscale PNGs; labels alternate."""
    rows = []
    for i in range(num_cases):
        for j in range(1 + i % 3):
            name = f"img/c{i}_{j}.png"
            _save(os.path.join(root, name), np.full((5, 6), (7 * i + j) % 256, np.uint8))
            label = ("normal", "pneumonia")[i % 2]
            rows.append(dict(case=f"case{i}", path=name, label=label))
    return rows


def _plan(tmp_path, rows, **kwargs):
    kwargs.setdefault("image_column", "path")
    kwargs.setdefault("label_column", "label")
    return cases_from_csv(
        _write_csv(tmp_path / "table.csv", rows),
        "case",
        image_root=str(tmp_path),
        **kwargs,
    )


def _read(path):
    """(info, [(split, parsed case as numpy)]) of a converted dataset."""
    info = records.load_info(str(path))
    cases = []
    for split in info.splits:
        dataset = tf.data.TFRecordDataset(shards.shard_paths(str(path), split))
        parse = lambda s: records.parse_case(s, info.num_classes, info.label_type)
        cases += [(split, c) for c in dataset.map(parse).as_numpy_iterator()]
    return info, cases


def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".incomplete" in n]


def test_assign_split_is_a_fixed_hash_of_seed_and_case():
    fractions = parse_split_fractions("test=0.1,train=0.8,validation=0.1")
    assert list(fractions) == ["train", "validation", "test"]
    ids = [f"patient-{i}" for i in range(4000)]
    splits = [assign_split(c, 7, fractions) for c in ids]
    # Pinned to SHA-256 of 'seed:case_id': changing it would move patients between
    # train and test across versions of the converter.
    for case_id, split in zip(ids[:50], splits[:50], strict=True):
        u = int.from_bytes(hashlib.sha256(f"7:{case_id}".encode()).digest()[:8], "big") / 2**64
        assert split == ("train" if u < 0.8 else "validation" if u < 0.9 else "test")
    for name, fraction in fractions.items():
        count = splits.count(name)
        assert abs(count - 4000 * fraction) < 4 * np.sqrt(4000 * fraction * (1 - fraction))
    assert splits == [assign_split(c, 7, fractions) for c in ids]
    other_seed = [assign_split(c, 8, fractions) for c in ids]
    assert 0.1 < np.mean([a != b for a, b in zip(splits, other_seed, strict=True)]) < 0.5
    with pytest.raises(ConversionError, match="sums to"):
        parse_split_fractions("train=0.8,test=0.1")
    with pytest.raises(ConversionError, match="train=0.8,validation=0.1,test=0.1"):
        parse_split_fractions("training=1")


def test_csv_split_guarantee_labels_and_determinism(tmp_path):
    rows = _toy_rows(tmp_path, 30)
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]  # interleave
    plan = _plan(tmp_path, rows, split_fractions="train=0.6,validation=0.2,test=0.2", seed=3)
    info = convert(plan, str(tmp_path / "out"), num_shards=2)
    info_read, cases = _read(tmp_path / "out")
    assert info_read == info
    ids = [c["case_id"].decode() for _, c in cases]
    assert len(ids) == len(set(ids)) == 30  # every case written once, so in one split
    fractions = parse_split_fractions("train=0.6,validation=0.2,test=0.2")
    for split, case in cases:
        case_id = case["case_id"].decode()
        assert split == assign_split(case_id, 3, fractions)
        expected_rows = [r for r in rows if r["case"] == case_id]
        assert sorted(i.decode() for i in case["image_ids"]) == sorted(
            r["path"] for r in expected_rows
        )
        for image_id, encoded in zip(case["image_ids"], case["images"], strict=True):
            assert encoded == (tmp_path / image_id.decode()).read_bytes()  # kept verbatim
        label = ["normal", "pneumonia"].index(expected_rows[0]["label"])
        np.testing.assert_array_equal(case["label_class"], label)
    assert info.class_names == ["normal", "pneumonia"]
    assert sum(s["num_images"] for s in info.splits.values()) == len(rows)
    again = convert(plan, str(tmp_path / "again"), num_shards=2)
    assert again.splits == info.splits  # same shards, same sha256


def test_exclude_cases(tmp_path):
    rows = _toy_rows(tmp_path, 10)
    (tmp_path / "exclude.txt").write_text("# evaluation patients\ncase1\n\ncase4  # note\nnobody\n")
    excluded = read_case_list(str(tmp_path / "exclude.txt"))
    assert excluded == {"case1", "case4", "nobody"}
    info = convert(_plan(tmp_path, rows), str(tmp_path / "out"), exclude_cases=excluded)
    _, cases = _read(tmp_path / "out")
    ids = {c["case_id"].decode() for _, c in cases}
    assert ids == {f"case{i}" for i in range(10)} - excluded
    assert info.converter["args"]["excluded_cases"] == 2


def test_verify_dataset_catches_broken_guarantees(tmp_path):
    def example(case_id, image_id):
        return records.make_case_example(case_id, [b"x"], [image_id], ["png"]).SerializeToString()

    splits = {}
    for split, cases in (("train", [("a", "1"), ("b", "2")]), ("test", [("c", "3")])):
        written = shards.write_split(str(tmp_path), split, [example(*c) for c in cases], 1)
        splits[split] = shards.make_split_info(written, [1] * len(cases))
    info = records.DatasetInfo("t", "none", [], splits)
    verify_dataset(str(tmp_path), info, excluded=["z"])
    with pytest.raises(ValueError, match="excluded case 'b' is in split 'train'"):
        verify_dataset(str(tmp_path), info, excluded=["b"])
    shards.write_split(str(tmp_path), "test", [example("a", "4")], 1)
    with pytest.raises(ValueError, match="case 'a' is in splits 'train' and 'test'"):
        verify_dataset(str(tmp_path), info)
    shards.write_split(str(tmp_path), "test", [example("c", "2")], 1)
    with pytest.raises(ValueError, match="repeats an image id"):
        verify_dataset(str(tmp_path), info)
    shards.write_split(str(tmp_path), "test", [example("c", "3"), example("d", "5")], 1)
    with pytest.raises(ValueError, match="read 2 cases / 2 images, info says 1 / 1"):
        verify_dataset(str(tmp_path), info)


def _bad_input(kind, tmp_path, rows):
    """Adds one bad row of `kind`; returns (expected message, its CSV line)."""
    _save(str(tmp_path / "img" / "extra.png"), np.full((4, 4), 99, np.uint8))
    good = dict(case="bad", path="img/extra.png", label="normal")
    if kind == "missing file":
        rows.append(dict(good, path="img/nowhere.png"))
        message = "image file not found"
    elif kind == "corrupt image":
        noise = np.random.default_rng(0).integers(0, 256, (40, 40), np.uint8)
        png = io.BytesIO()
        Image.fromarray(noise).save(png, format="PNG")
        (tmp_path / "img" / "broken.png").write_bytes(png.getvalue()[:800])  # PIL fails
        rows.append(dict(good, path="img/broken.png"))
        message = "cannot decode image (OSError: image file is truncated"
    elif kind == "truncated image":
        png = io.BytesIO()
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(png, format="PNG")
        (tmp_path / "img" / "cut.png").write_bytes(png.getvalue()[:60])  # only TF fails
        rows.append(dict(good, path="img/cut.png"))
        message = "cannot decode image (InvalidArgumentError: Invalid PNG data, size 60)"
    elif kind == "duplicate image id":
        rows.append(dict(rows[0], case="bad"))
        message = "duplicate image id, first on line 2"
    elif kind == "label outside class list":
        rows.append(dict(good, label="fracture"))
        message = "label 'fracture' is not in the class list"
    else:  # case without images
        rows.append(dict(good, path=""))
        message = "no image path"
    return message, len(rows) + 1


ERRORS = [
    "missing file",
    "corrupt image",
    "truncated image",
    "duplicate image id",
    "label outside class list",
    "case without images",
]


@pytest.mark.parametrize("kind", ERRORS)
def test_bad_input_fails_before_writing(tmp_path, kind):
    rows = _toy_rows(tmp_path, 4)
    message, line = _bad_input(kind, tmp_path, rows)
    plan = _plan(tmp_path, rows, class_names=["normal", "pneumonia"])
    pattern = f"(?s)--on_error=skip.*line {line}, case 'bad'.*{re.escape(message)}"
    with pytest.raises(ConversionError, match=pattern):
        convert(plan, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize("kind", ERRORS)
def test_bad_input_is_skipped_and_listed(tmp_path, kind):
    rows = _toy_rows(tmp_path, 4)
    message, line = _bad_input(kind, tmp_path, rows)
    plan = _plan(tmp_path, rows, class_names=["normal", "pneumonia"])
    info = convert(plan, str(tmp_path / "out"), on_error="skip")
    assert any(s["line"] == line and message in s["problem"] for s in info.skipped)
    assert records.load_info(str(tmp_path / "out")).skipped == info.skipped
    _, cases = _read(tmp_path / "out")
    ids = {c["case_id"].decode() for _, c in cases}
    assert {f"case{i}" for i in range(4)} <= ids
    num_images = sum(len(c["images"]) for _, c in cases)
    assert num_images == len(rows) - 1  # every row but the bad one
    if kind == "case without images":
        assert "bad" not in ids
        assert any(s["problem"] == "case has no usable images" for s in info.skipped)
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_existing_destination(tmp_path, on_error):
    plan = _plan(tmp_path, _toy_rows(tmp_path, 3))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="exists and is not empty.*--overwrite"):
        convert(plan, str(tmp_path / "out"), on_error=on_error)
    with pytest.raises(ConversionError, match="not a converted dataset"):
        convert(plan, str(tmp_path / "out"), on_error=on_error, overwrite=True)
    assert os.listdir(tmp_path / "out") == ["notes.txt"]
    convert(plan, str(tmp_path / "data"), on_error=on_error)
    (tmp_path / "data" / "stale.txt").write_text("old")
    convert(plan, str(tmp_path / "data"), on_error=on_error, overwrite=True)
    assert not (tmp_path / "data" / "stale.txt").exists()
    assert records.load_info(str(tmp_path / "data")).splits["train"]["num_cases"] == 3
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize("scaling", ["min_max", "full_range"])
def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path, scaling):
    pixels = np.linspace(1000, 4000, 48).reshape(6, 8).astype(np.uint16)
    _save(str(tmp_path / "img" / "deep.png"), pixels)
    assert Image.open(tmp_path / "img" / "deep.png").mode.startswith("I")
    rows = [dict(case="c", path="img/deep.png")]
    plan = _plan(tmp_path, rows, label_column=None)
    convert(plan, str(tmp_path / "out"), options=ImageOptions(sixteen_bit=scaling))
    ((_, case),) = _read(tmp_path / "out")[1]
    assert case["formats"][0] == b"png"
    decoded = tf.io.decode_png(case["images"][0]).numpy()[..., 0]
    values = pixels.astype(np.float64)
    if scaling == "min_max":
        expected = (values - 1000) * (255 / 3000)
    else:
        expected = values * (255 / 65535)
    np.testing.assert_array_equal(decoded, np.round(expected).astype(np.uint8))


@pytest.mark.parametrize("scaling", ["min_max", "full_range"])
def test_sixteen_bit_png_stays_sixteen_bit_with_bit_depth_16(tmp_path, scaling):
    pixels = np.linspace(1000, 4000, 48).reshape(6, 8).astype(np.uint16)
    _save(str(tmp_path / "img" / "deep.png"), pixels)
    _save(str(tmp_path / "img" / "flat.png"), np.full((4, 4), 9, np.uint8))
    rows = [dict(case="c", path="img/deep.png"), dict(case="c", path="img/flat.png")]
    plan = _plan(tmp_path, rows, label_column=None)
    options = ImageOptions(sixteen_bit=scaling, bit_depth=16)
    info = convert(plan, str(tmp_path / "out"), options=options)
    assert info.converter["args"]["bit_depth"] == 16
    ((_, case),) = _read(tmp_path / "out")[1]
    images = dict(zip(case["image_ids"], case["images"], strict=True))
    decoded = tf.io.decode_png(images[b"img/deep.png"], dtype=tf.uint16).numpy()[..., 0]
    values = pixels.astype(np.float64)
    expected = (values - 1000) * (65535 / 3000) if scaling == "min_max" else values
    np.testing.assert_array_equal(decoded, np.round(expected).astype(np.uint16))
    # 8-bit images stay 8-bit, byte for byte.
    assert images[b"img/flat.png"] == (tmp_path / "img" / "flat.png").read_bytes()


def test_image_options_are_checked(tmp_path):
    plan = _plan(tmp_path, _toy_rows(tmp_path, 1), label_column=None)
    for options, message in [
        (
            ImageOptions(bit_depth=16, image_format="jpeg"),
            "--bit_depth=16 needs --image_format=png",
        ),
        (ImageOptions(bit_depth=12), r"bit_depth in \(8, 16\)"),
        (ImageOptions(dicom_voi="first"), "--dicom_voi='first': give an index"),
    ]:
        with pytest.raises(ConversionError, match=message):
            convert(plan, str(tmp_path / "out"), options=options)
    assert not (tmp_path / "out").exists()


def test_rgb_jpeg_kept_or_resized(tmp_path):
    rng = np.random.default_rng(1)
    big = np.repeat(np.repeat(rng.integers(0, 256, (3, 5, 3), np.uint8), 2, 0), 2, 1)  # 6 x 10
    _save(str(tmp_path / "img" / "big.jpg"), big, "JPEG")
    _save(str(tmp_path / "img" / "small.jpg"), big[:3, :4], "JPEG")
    rows = [dict(case="c", path="img/big.jpg"), dict(case="c", path="img/small.jpg")]
    for limit in (0, 4):
        out = tmp_path / f"out{limit}"
        convert(_plan(tmp_path, rows, label_column=None), str(out), options=ImageOptions(limit))
        ((_, case),) = _read(out)[1]
        images = dict(
            zip(case["image_ids"], zip(case["images"], case["formats"], strict=True), strict=True)
        )
        small_bytes, small_format = images[b"img/small.jpg"]
        assert small_format == b"jpeg"  # within the limit: untouched
        assert small_bytes == (tmp_path / "img" / "small.jpg").read_bytes()
        big_bytes, big_format = images[b"img/big.jpg"]
        decoded = tf.io.decode_image(big_bytes).numpy()
        if limit == 0:
            assert big_format == b"jpeg" and decoded.shape == (6, 10, 3)
            assert big_bytes == (tmp_path / "img" / "big.jpg").read_bytes()
        else:
            assert big_format == b"png" and decoded.shape == (2, 4, 3)  # 10 -> 4, 6 -> 2.4
            original = tf.io.decode_jpeg((tmp_path / "img" / "big.jpg").read_bytes()).numpy()
            assert abs(decoded.mean() - original.mean()) < 20


def test_jpeg_reencoding_is_close_to_png_and_deterministic(tmp_path):
    y, x = np.mgrid[0:60, 0:80]
    smooth = np.stack([x * 3, y * 4, (x + y) * 1.5], -1).astype(np.uint8)  # smooth, as photos are
    spec = ImageSpec("rgb", file=_save(str(tmp_path / "rgb.png"), smooth))
    png, png_format = encode_image(spec, ImageOptions(32))
    jpeg, jpeg_format = encode_image(spec, ImageOptions(32, image_format="jpeg"))
    assert (png_format, jpeg_format) == ("png", "jpeg") and jpeg[:3] == b"\xff\xd8\xff"
    assert encode_image(spec, ImageOptions(32, image_format="jpeg")) == (jpeg, "jpeg")
    lossless = tf.io.decode_png(png).numpy().astype(np.int64)
    lossy = tf.io.decode_jpeg(jpeg).numpy().astype(np.int64)
    assert lossless.shape == lossy.shape == (24, 32, 3)
    assert np.abs(lossless - lossy).mean() < 2 and np.abs(lossless - lossy).max() < 16
    coarse, _ = encode_image(spec, ImageOptions(32, image_format="jpeg", jpeg_quality=20))
    assert len(coarse) < len(jpeg)
    # JPEG only changes re-encoded images: a PNG within the size limit keeps its bytes.
    original = (tmp_path / "rgb.png").read_bytes()
    assert encode_image(spec, ImageOptions(image_format="jpeg")) == (original, "png")
    plan = _plan(tmp_path, [dict(case="c", path="rgb.png")], label_column=None)
    for bad in (dict(image_format="gif"), dict(image_format="jpeg", jpeg_quality=0)):
        with pytest.raises(ConversionError, match="bad image options"):
            convert(plan, str(tmp_path / "bad"), options=ImageOptions(**bad))


def test_grayscale_stores_one_channel(tmp_path):
    y, x = np.mgrid[0:30, 0:40]
    gray = (x * 5 + y * 2).astype(np.uint8)
    xray = _save(str(tmp_path / "img" / "xray.jpg"), np.repeat(gray[..., None], 3, -1), "JPEG")
    spec = ImageSpec("xray", file=xray)
    original = (tmp_path / "img" / "xray.jpg").read_bytes()
    assert encode_image(spec, ImageOptions()) == (original, "jpeg")  # RGB kept as it is
    png, png_format = encode_image(spec, ImageOptions(grayscale=True))
    decoded = tf.io.decode_png(png).numpy()
    assert png_format == "png" and decoded.shape == (30, 40, 1)
    luma = np.asarray(Image.open(xray).convert("L"))  # ITU-R 601-2, PIL's reference
    np.testing.assert_array_equal(decoded[..., 0], luma)
    assert np.abs(decoded[..., 0].astype(np.int64) - gray).max() < 8
    one_channel = _save(str(tmp_path / "img" / "gray.png"), gray)
    kept = encode_image(ImageSpec("gray", file=one_channel), ImageOptions(grayscale=True))
    assert kept == ((tmp_path / "img" / "gray.png").read_bytes(), "png")
    # Through the converter: stored as 1-channel JPEG, the options in dataset_info.json.
    rows = [dict(case="c", path="img/xray.jpg"), dict(case="c", path="img/gray.png")]
    options = ImageOptions(16, image_format="jpeg", jpeg_quality=80, grayscale=True)
    info = convert(_plan(tmp_path, rows, label_column=None), str(tmp_path / "out"), options=options)
    ((_, case),) = _read(tmp_path / "out")[1]
    assert list(case["formats"]) == [b"jpeg", b"jpeg"]
    assert [tf.io.decode_jpeg(i).shape for i in case["images"]] == [(12, 16, 1)] * 2
    args = info.converter["args"]
    assert (args["image_format"], args["jpeg_quality"], args["grayscale"]) == ("jpeg", 80, True)
    default = convert(_plan(tmp_path, rows, label_column=None), str(tmp_path / "default"))
    assert not {"image_format", "jpeg_quality", "grayscale"} & set(default.converter["args"])


def test_default_options_rebuild_the_shipped_demo_byte_for_byte(tmp_path, shared_data, monkeypatch):
    # The demo was converted before --image_format / --grayscale existed: with the
    # defaults, the converter must still write identical shards and dataset_info.json
    # (which records the relative --shared path, hence the chdir).
    del shared_data  # fails, naming the path, when ../shared/data is absent
    monkeypatch.chdir(REPO_ROOT)
    make_demo_data.make_hannover("../shared/data", str(tmp_path), 64)
    shipped = os.path.join(REPO_ROOT, "data", "demo", "hannover_cxr")
    assert sorted(os.listdir(tmp_path / "hannover_cxr")) == sorted(os.listdir(shipped))
    for name in os.listdir(shipped):
        rebuilt = (tmp_path / "hannover_cxr" / name).read_bytes()
        assert rebuilt == open(os.path.join(shipped, name), "rb").read(), name


def test_multilabel_and_multiclass_values(tmp_path):
    _save(str(tmp_path / "img" / "a.png"), np.zeros((3, 3), np.uint8))
    _save(str(tmp_path / "img" / "b.png"), np.ones((3, 3), np.uint8))
    rows = [
        dict(case="c", path="img/a.png", edema="1", effusion="-1"),
        dict(case="c", path="img/b.png", edema="", effusion="0.0"),
    ]
    plan = _plan(tmp_path, rows, label_column=None, label_columns=["edema", "effusion"])
    convert(plan, str(tmp_path / "multi"))
    info, [(_, case)] = _read(tmp_path / "multi")
    assert info.label_type == "multilabel" and info.class_names == ["edema", "effusion"]
    np.testing.assert_array_equal(
        case["label_multi"], [[1.0, records.UNCERTAIN], [records.MISSING, 0.0]]
    )
    rows[1]["edema"] = "2"
    plan = _plan(tmp_path, rows, label_column=None, label_columns=["edema", "effusion"])
    assert [str(p) for p in plan.problems] == [
        f"line 3, case 'c', file '{tmp_path / 'img/b.png'}': "
        "labels ['2', '0.0'] must each be 1, 0, -1 (uncertain) or blank"
    ]
    rows = [dict(case=f"c{i}", path="img/a.png", label=v) for i, v in enumerate("10 2 2".split())]
    plan = _plan(tmp_path, rows, image_id_column="case")
    assert plan.class_names == ["2", "10"]  # numeric order, not '10' < '2'
    assert [c.images[0].label_class for c in plan.cases] == [1, 0, 0]
    rows = [dict(case=f"c{i}", path="img/a.png", label=v) for i, v in enumerate(["yes", "0", ""])]
    plan = _plan(tmp_path, rows, image_id_column="case", class_names=["no", "yes"])
    assert [c.images[0].label_class for c in plan.cases] == [1, 0, -1]  # name, index, blank
    rows[0]["case"] = ""
    assert str(_plan(tmp_path, rows, image_id_column="path").problems[0]) == (
        "line 2: column 'case' is blank"
    )


def test_split_column_conflicts_leave_the_case_out(tmp_path):
    rows = _toy_rows(tmp_path, 3)
    for row in rows:
        row["split"] = "test" if row["case"] == "case2" else "train"
    rows[-1]["split"] = "validation"  # case2's last image
    rows.append(dict(rows[0], path="img/c1_0.png", split="holdout"))
    plan = _plan(tmp_path, rows, split_column="split")
    messages = [str(p) for p in plan.problems]
    assert "the whole case is left out" in messages[0] and "case2" in messages[0]
    assert "split 'holdout' is not one of" in messages[1]
    assert sorted((c.case_id, c.split) for c in plan.cases) == [
        ("case0", "train"),
        ("case1", "train"),
    ]
    with pytest.raises(ConversionError, match="not both"):
        _plan(tmp_path, rows, split_column="split", split_fractions="train=1")
    with pytest.raises(ConversionError, match=r"no column\(s\) \['patient'\].*columns are"):
        _plan(tmp_path, rows, image_column=None, image_path_template="{patient}.png")
    assert parse_num_shards("train=4,test=1") == {"train": 4, "test": 1}
    with pytest.raises(ConversionError, match="split=number"):
        parse_num_shards("four")


def test_npz_input(tmp_path):
    rng = np.random.default_rng(2)
    arrays = dict(
        train_images=rng.integers(0, 256, (5, 4, 4), np.uint8),
        train_labels=np.array([[0, 1], [1, 1], [0, 0], [1, 0], [0, 1]]),
        val_images=rng.integers(0, 256, (2, 4, 4, 3), np.uint8),
        val_labels=np.array([[1, 0], [0, 0]]),
    )
    np.savez(tmp_path / "multi.npz", **arrays)
    plan = cases_from_npz(str(tmp_path / "multi.npz"), ["a", "b"])
    info = convert(plan, str(tmp_path / "out"))
    assert info.label_type == "multilabel" and set(info.splits) == {"train", "validation"}
    _, cases = _read(tmp_path / "out")
    for split, case in cases:
        prefix = "val" if split == "validation" else split
        index = int(case["case_id"].decode().split("-")[1])
        assert case["case_id"].decode() == f"{split}-{index:05d}"
        np.testing.assert_array_equal(case["label_multi"][0], arrays[f"{prefix}_labels"][index])
        decoded = tf.io.decode_png(case["images"][0]).numpy()
        np.testing.assert_array_equal(np.squeeze(decoded), arrays[f"{prefix}_images"][index])
    np.savez(tmp_path / "bad.npz", test_images=np.zeros((2, 4, 4), np.uint8), test_labels=[1, 3])
    plan = cases_from_npz(str(tmp_path / "bad.npz"), ["normal", "pneumonia"])
    assert "label 3 is not in the class list" in str(plan.problems[0])
    np.savez(tmp_path / "short.npz", train_images=np.zeros((3, 4, 4), np.uint8), train_labels=[0])
    with pytest.raises(ConversionError, match="3 train images but 1 labels"):
        cases_from_npz(str(tmp_path / "short.npz"))
    np.savez(tmp_path / "keys.npz", x=np.zeros(3))
    with pytest.raises(ConversionError, match=r"keys are \['x'\]"):
        cases_from_npz(str(tmp_path / "keys.npz"))


def test_pneumoniamnist_npz(tmp_path, shared_data):
    npz = shared_data / "pneumoniamnist-balanced" / "pneumoniamnist.npz"
    info = convert(
        cases_from_npz(str(npz), ["normal", "pneumonia"]), str(tmp_path / "p"), num_shards=2
    )
    counts = {s: (e["num_cases"], e["num_images"]) for s, e in info.splits.items()}
    assert counts == {"train": (2428, 2428), "validation": (270, 270), "test": (468, 468)}
    assert all(e["images_per_case"] == {"1": e["num_cases"]} for e in info.splits.values())
    data = np.load(npz)
    _, cases = _read(tmp_path / "p")
    for split, case in cases:
        prefix = "val" if split == "validation" else split
        index = int(case["case_id"].decode().split("-")[1])
        assert case["label_class"][0] == data[f"{prefix}_labels"][index, 0]
        if index < 20:
            decoded = tf.io.decode_png(case["images"][0]).numpy()[..., 0]
            np.testing.assert_array_equal(decoded, data[f"{prefix}_images"][index])
    labels = [c["label_class"][0] for s, c in cases if s == "test"]
    assert sorted(set(labels)) == [0, 1] and sum(labels) == 234  # balanced 50/50


def test_hannover_cases(tmp_path, shared_data):
    root = shared_data / "hannover-covid-cxr"
    plan = cases_from_csv(
        str(root / "data.csv"),
        "patient_id",
        image_root=str(root),
        image_path_template="png/{image_id}.png",
        image_id_column="image_id",
        meta_columns=["projection"],
        split_fractions="train=0.8,validation=0.1,test=0.1",
    )
    info = convert(plan, str(tmp_path / "h"), options=ImageOptions(resize_longer_side=64))
    _, cases = _read(tmp_path / "h")
    ids = [c["case_id"] for _, c in cases]
    assert len(ids) == len(set(ids)) == 71
    assert sum(len(c["images"]) for _, c in cases) == 243
    assert sum(len(c["images"]) >= 2 for _, c in cases) == 37
    assert sum(e["num_images"] for e in info.splits.values()) == 243
    with open(root / "data.csv") as f:
        patient_of = {r["image_id"]: r["patient_id"] for r in csv.DictReader(f)}
    for _, case in cases:
        assert {patient_of[i.decode()] for i in case["image_ids"]} == {case["case_id"].decode()}
    shape = tf.io.decode_png(cases[0][1]["images"][0]).shape
    assert max(shape[:2]) == 64 and shape[2] == 1


@pytest.mark.slow
def test_command_line(tmp_path):
    rows = _toy_rows(tmp_path, 3) + [dict(case="x", path="img/gone.png")]
    command = [sys.executable, "-m", "micle_jax.data.convert"]
    command += [f"--csv={_write_csv(tmp_path / 't.csv', rows)}", f"--image_root={tmp_path}"]
    command += ["--case_column=case", "--image_column=path", "--label_column=label"]
    command += ["--on_error=skip", "--num_shards=train=2", f"--out={tmp_path / 'out'}"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "line 8, case 'x', file" in done.stdout and "image file not found" in done.stdout
    assert re.search(r"train +3 +6 +1:1 2:1 3:1", done.stdout), done.stdout
    info = records.load_info(str(tmp_path / "out"))
    assert info.class_names == ["normal", "pneumonia"]
    assert len(info.splits["train"]["shards"]) == 2 and len(info.skipped) == 2
    # Another process, same bytes: protobuf map order must not leak into the shards.
    plan = cases_from_csv(
        command[3].split("=", 1)[1], "case", str(tmp_path), "path", label_column="label"
    )
    again = convert(plan, str(tmp_path / "again"), num_shards={"train": 2}, on_error="skip")
    assert again.splits == info.splits
    flags = ["--image_format=jpeg", "--jpeg_quality=80", "--grayscale", "--resize_longer_side=4"]
    done = subprocess.run(
        command[:-1] + flags + [f"--out={tmp_path / 'jpeg'}"], cwd=REPO_ROOT, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    args = records.load_info(str(tmp_path / "jpeg")).converter["args"]
    assert (args["image_format"], args["jpeg_quality"], args["grayscale"]) == ("jpeg", 80, True)
    assert {f for _, case in _read(tmp_path / "jpeg")[1] for f in case["formats"]} == {b"jpeg"}
