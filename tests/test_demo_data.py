"""The real-image demo datasets shipped in data/demo (micle_jax/data/convert/make_demo_data.py).

Counts are recounted from the records with the project's own reader
(streamed.RecordsSource, which parses but does not decode), and compared
with ../shared/data/README.md's independent counts of the sources and with each
dataset_info.json.
"""

import collections
import csv
import json
import os
from dataclasses import fields

import numpy as np
import pytest
import tensorflow as tf

from micle_jax.data import records, shards
from micle_jax.data.convert.images import ImageOptions, encode_image
from micle_jax.data.convert.inputs import ImageSpec
from micle_jax.data.sources import interface, streamed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "data", "demo")

# From ../shared/data/README.md: images, cases, cases with 2 or more images.
EXPECTED = {
    "ham10000": (10015, 7470, 1956, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]),
    "kermany_cxr": (5216, 2846, 1075, ["normal", "pneumonia"]),
}
FRACTIONS = {"train": 0.7, "validation": 0.15, "test": 0.15}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_cases_images_and_splits(name):
    path = os.path.join(DEMO, name)
    source = streamed.RecordsSource(path)
    info = source.info
    shards.verify_shards(path, info)
    num_images, num_cases, multi_image, class_names = EXPECTED[name]
    assert info.label_type == "multiclass" and info.class_names == class_names
    split_of, sizes = {}, []
    for split, entry in info.splits.items():
        counts = source.counts(split, interface.Share())
        for case_id in counts.case_ids:
            assert split_of.setdefault(case_id, split) == split, f"{case_id} in two splits"
        assert len(counts.case_ids) == len(set(counts.case_ids.tolist()))
        histogram = collections.Counter(counts.images.tolist())
        assert (len(counts.images), int(counts.images.sum())) == (
            entry["num_cases"],
            entry["num_images"],
        )
        assert entry["images_per_case"] == {str(k): v for k, v in sorted(histogram.items())}
        np.testing.assert_array_equal(counts.labeled, counts.images)  # every image labelled
        _, labels = source.image_labels(split)
        assert sorted(set(labels.tolist())) == list(range(len(class_names)))  # all in every split
        assert abs(len(counts.images) / num_cases - FRACTIONS[split]) < 0.03
        sizes += counts.images.tolist()
    assert (sum(sizes), len(sizes), sum(n >= 2 for n in sizes)) == (
        num_images,
        num_cases,
        multi_image,
    )
    with open(os.path.join(path, "LICENSE")) as f:
        licence = f.read()
    if name == "ham10000":
        assert "NON-COMMERCIAL" in licence and "by-nc/4.0" in licence
        assert "CC BY-NC 4.0" in info.license and "NON-COMMERCIAL" in info.license
    else:
        assert "creativecommons.org/licenses/by/4.0" in licence and "CC BY 4.0" in info.license


def _first_cases(path: str, info: records.DatasetInfo, count: int) -> list[dict]:
    dataset = tf.data.TFRecordDataset(shards.shard_paths(path, "test")).take(count)
    parse = lambda s: records.parse_case(s, info.num_classes, info.label_type)
    return list(dataset.map(parse).as_numpy_iterator())


@pytest.mark.parametrize(
    "name, table, case_column, image_file, shape",
    [
        ("ham10000", "ham10000", "lesion_id", "images/{image_id}.jpg", (48, 64, 3)),
        ("kermany_cxr", "kermany-pediatric-cxr", "patient_id", "{image}", (64, 64, 1)),
    ],
)
def test_shipped_images_match_their_source(
    name, table, case_column, image_file, shape, shared_data
):
    # Re-encoding the source files with the recorded options gives the shipped
    # bytes (deterministic JPEG), and each image keeps its case, label and meta.
    path = os.path.join(DEMO, name)
    info = records.load_info(path)
    args = info.converter["args"]
    options = ImageOptions(**{f.name: args[f.name] for f in fields(ImageOptions) if f.name in args})
    assert args["image_format"] == "jpeg" and args["jpeg_quality"] == 90
    root = shared_data / table
    with open(root / "metadata.csv", newline="") as f:
        rows = {r.get("image_id") or r["image"]: r for r in csv.DictReader(f)}
    label_column = "dx" if name == "ham10000" else "label"
    meta_columns = args["meta_columns"]
    for case in _first_cases(path, info, 20):
        for image_id, encoded, label, meta in zip(
            case["image_ids"], case["images"], case["label_class"], case["meta"], strict=True
        ):
            row = rows[image_id.decode()]
            assert row[case_column] == case["case_id"].decode()
            assert info.class_names[label] == row[label_column].lower()
            assert json.loads(meta) == {c: row[c] for c in meta_columns}
            spec = ImageSpec(image_id.decode(), file=str(root / image_file.format(**row)))
            assert encode_image(spec, options) == (encoded, "jpeg")
            assert tf.io.decode_jpeg(encoded).shape == shape
