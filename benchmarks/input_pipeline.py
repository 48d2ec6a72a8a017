r"""Input pipeline throughput: augmented views per second delivered in 'micle' mode.

  python benchmarks/input_pipeline.py [--batches=20] [--batch_size=64]

Converts the Hannover chest X-rays (../shared/data/hannover-covid-cxr, 243 PNGs
of 71 patients, 640 px wide) into case records in a temporary folder, at their
original resolution and downscaled to the demo's 64 px, then times
`pipeline.open_data(...).dataset('micle')` with decode and every augmentation
included, for the 'cxr' and 'simclr' policies, streamed and with
`cache_decoded=True`. A plain reference is timed in the same run on the same
records: decode + bilinear resize, nothing else; each row's ratio to it says
what the augmentations cost. Target: >= 600 views/s at 224 px on a 2-core CPU.
The `where the time goes` rows time single stages on one image in a loop.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import tempfile
import time

import ml_collections
import tensorflow as tf
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from micle_jax.data import records, shards  # noqa: E402
from micle_jax.data.augment import policies  # noqa: E402
from micle_jax.data.sources import image_table  # noqa: E402
from micle_jax.data.stream import pipeline, tf_host  # noqa: E402

flags.DEFINE_string("hannover", "../shared/data/hannover-covid-cxr", "the Hannover folder")
flags.DEFINE_integer("batches", 20, "timed batches per row (after 3 warm-up batches)")
flags.DEFINE_integer("batch_size", 64, "cases per batch (2 views each)")
flags.DEFINE_bool("streamed", True, "also time cache_decoded=False rows")
FLAGS = flags.FLAGS


def write_hannover(root: str, out: str, longer_side: int = 0) -> str:
    """Hannover cases as records at `out` (one split, 4 shards); returns the source string."""
    cases: dict[str, list[str]] = {}
    with open(os.path.join(root, "data.csv")) as f:
        for row in csv.DictReader(f):
            cases.setdefault(row["patient_id"], []).append(row["image_id"])
    examples = []
    for case_id, image_ids in sorted(cases.items()):
        images = []
        for image_id in image_ids:
            with open(os.path.join(root, "png", f"{image_id}.png"), "rb") as f:
                data = f.read()
            if longer_side:
                image = Image.open(io.BytesIO(data))
                image.thumbnail((longer_side, longer_side), Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = buffer.getvalue()
            images.append(data)
        example = records.make_case_example(case_id, images, image_ids, ["png"] * len(images))
        examples.append(example.SerializeToString())
    written = shards.write_split(out, "train", examples, num_shards=4)
    sizes = [len(v) for _, v in sorted(cases.items())]
    info = records.DatasetInfo(
        name="hannover",
        label_type="none",
        class_names=[],
        splits={"train": shards.make_split_info(written, sizes)},
    )
    records.write_info(out, info)
    return f"records:{out}"


def views_per_second(ds: tf.data.Dataset, views_per_batch: int, batches: int):
    """(views/s, CPU ms per view) over `batches` batches after 3 warm-up batches.

    CPU time is this process's, all threads: on a shared machine the wall-clock
    rate depends on the other load, the CPU cost per view does not.
    """
    it = iter(ds)
    for _ in range(3):
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    views = views_per_batch * batches
    return views / (time.perf_counter() - start), (time.process_time() - cpu) / views * 1000


def micle_rate(source: str, size: int, policy: str, cache: bool):
    config = ml_collections.ConfigDict(
        dict(
            source=source, image_size=size, augment=policy, cache_decoded=cache, shuffle_buffer=1000
        )
    )
    ds = pipeline.open_data(config, seed=0).dataset(
        "micle", FLAGS.batch_size, process_index=0, process_count=1
    )
    return views_per_second(ds, 2 * FLAGS.batch_size, FLAGS.batches)


def reference_rate(source: str, size: int):
    """Plain decode + bilinear resize of every image, repeated, batched."""
    path = source.partition(":")[2]
    files = shards.shard_paths(path, "train")
    info = records.load_info(path)

    def images(serialized):
        case = records.parse_case(serialized, info.num_classes, info.label_type)
        return tf.data.Dataset.from_tensor_slices(case["images"])

    def decode_resize(encoded):
        image = tf.io.decode_png(encoded, channels=1)
        return tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), [size, size])

    ds = tf.data.TFRecordDataset(files).flat_map(images).repeat()
    ds = ds.map(decode_resize, num_parallel_calls=tf.data.AUTOTUNE).batch(2 * FLAGS.batch_size)
    return views_per_second(ds.prefetch(tf.data.AUTOTUNE), 2 * FLAGS.batch_size, FLAGS.batches)


def stage_times(source: str, calls: int = 200) -> dict[str, float]:
    """CPU ms per call of single stages on one full-size image, one tf.data thread."""
    path = source.partition(":")[2]
    serialized = next(iter(tf.data.TFRecordDataset(shards.shard_paths(path, "train"))))
    encoded = records.parse_case(serialized, 0, "none")["images"][0]
    image = image_table.decode_image(encoded)
    print(f"stage image: {tuple(image.shape)} uint8")

    def seed(i):
        return tf.stack([tf.cast(i, tf.int64), tf.constant(1, tf.int64)])

    stages = {
        "decode PNG": lambda i: image_table.decode_image(encoded),
        "random crop + resize 224": lambda i: policies.get_policy(["random_resized_crop"], 224)(
            image, seed(i)
        ),
        "cxr view": lambda i: policies.get_policy("cxr", 224)(image, seed(i)),
        "simclr view": lambda i: policies.get_policy("simclr", 224)(image, seed(i)),
    }
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    out = {}
    for name, fn in stages.items():
        ds = tf.data.Dataset.range(calls + 1).map(fn).with_options(options)
        it = iter(ds)
        next(it)
        cpu = time.process_time()
        for _ in range(calls):
            next(it)
        out[name] = (time.process_time() - cpu) / calls * 1000
    return out


def main(argv):
    del argv
    tf_host.keep_tf_on_host()
    with tempfile.TemporaryDirectory() as tmp:
        full = write_hannover(FLAGS.hannover, os.path.join(tmp, "full"))
        demo = write_hannover(FLAGS.hannover, os.path.join(tmp, "demo"), longer_side=64)
        rows = []
        ref_full = reference_rate(full, 224)
        ref_demo = reference_rate(demo, 32)
        rows.append(
            ("reference: decode + resize", "full", 224, "-", "streamed", *ref_full, ref_full)
        )
        rows.append(
            ("reference: decode + resize", "64 px", 32, "-", "streamed", *ref_demo, ref_demo)
        )
        for policy in ("cxr", "simclr"):
            for cache in (True, False) if FLAGS.streamed else (True,):
                rate = micle_rate(full, 224, policy, cache)
                rows.append(("micle", "full", 224, policy, _cache(cache), *rate, ref_full))
            rate = micle_rate(demo, 32, policy, True)
            rows.append(("micle", "64 px", 32, policy, "cached", *rate, ref_demo))
        cores = len(os.sched_getaffinity(0))
        print(
            f"\n{cores} CPU cores, load average {os.getloadavg()[0]:.1f} at the end, batch "
            f"{FLAGS.batch_size} cases, {FLAGS.batches} timed batches per row"
        )
        print(
            f"'{cores}-core bound' = {cores} cores / CPU ms per view: the rate with the "
            "cores to ourselves\n"
        )
        header = (
            "pipeline",
            "images",
            "view px",
            "augment",
            "decode",
            "views/s",
            "CPU ms/view",
            f"{cores}-core bound",
            "x reference (bound)",
        )
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for name, images, px, policy, cache, rate, ms, ref in rows:
            bound = cores * 1000 / ms
            ratio = bound / (cores * 1000 / ref[1])
            print(
                f"| {name} | {images} | {px} | {policy} | {cache} | {rate:.0f} | {ms:.2f} | "
                f"{bound:.0f} | {ratio:.2f} |"
            )
        print("\nwhere the time goes (CPU ms per call, one image, one thread):")
        for name, ms in stage_times(full).items():
            print(f"  {name:28s} {ms:7.2f}")


def _cache(cache: bool) -> str:
    return "cached" if cache else "streamed"


if __name__ == "__main__":
    app.run(main)
