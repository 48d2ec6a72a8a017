r"""Per-image class probabilities from a fine-tuned run, written as CSV.

  python -m micle_jax.predict --workdir=/runs/ft_derm --images='/data/new/*.png' \
      --output=predictions.csv
  python -m micle_jax.predict --workdir=/runs/ft_cxr --records=/data/cxr --split=test \
      --output=predictions.csv --checkpoint=best

Images of any size and format PNG/JPEG (gray, RGB or with alpha) get the
evaluation preprocessing (SimCLR's centre crop keeping 87.5%, resized to the
run's image size), exactly as the run's evaluations saw them; records go
through the pipeline's 'eval' mode. Batches are padded to a multiple of the
devices and the padding dropped. The CSV has one row per image: `image`
(path or image id), `case_id`, `prediction` (the most likely class), then
`prob/<class>` for every class (softmax for multiclass runs, independent
sigmoids for multilabel ones).
"""

from __future__ import annotations

import csv
import glob
import os
import sys
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np

from micle_jax import checkpoint, rundir, sharding
from micle_jax.data import records
from micle_jax.evaluators import metrics
from micle_jax.evaluators.predictor import Predictor
from micle_jax.task import TaskInfo, build_model


def load_run(workdir: str, which: str = "final"):
    """The model, its variables on the mesh and its task, from a fine-tuning workdir.

    Args:
      workdir: a run of micle_jax.trainers.finetune (config.json, task_info.json,
        checkpoints).
      which: 'final' (the latest checkpoint), 'best' (WORKDIR/best) or a
        checkpoint path.

    Returns:
      (model, variables {'params', 'batch_stats'}, task: TaskInfo, mesh).
    """
    task = TaskInfo.load(workdir)
    config = ml_collections.ConfigDict(rundir.read_config(workdir))
    path = checkpoint.select(workdir, which)
    mesh = sharding.make_mesh(config.mesh)
    model = build_model(config, task)
    loaded = checkpoint.load_variables(path)
    image = np.zeros((1, task.image_size, task.image_size, 3), np.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
    abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    checkpoint.check_variables(abstract, loaded, path)
    variables = jax.device_put(
        jax.tree.map(lambda x, a: np.asarray(x, a.dtype), loaded, abstract),
        sharding.tree_shardings(abstract, mesh, config.mesh.shard_min_size),
    )
    return model, variables, task, mesh


def find_images(pattern: str) -> list[str]:
    """Sorted image files matching a glob (** recurses); errors naming what is wrong."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise FileNotFoundError(f"--images={pattern!r} matches no file")
    bad = []
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(8)
        if not any(head.startswith(magic) for magic in records.IMAGE_SIGNATURES):
            bad.append(path)
    if bad:
        raise ValueError(
            f"{len(bad)} file(s) are not PNG or JPEG images, e.g. {bad[:3]}; narrow --images"
        )
    return paths


def image_batches(
    paths: Sequence[str], image_size: int, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Host batches of image files in the pipeline's 'eval' layout.

    Yields:
      {'image': float32 [batch_size, s, s, 3], 'mask': float32 [batch_size]
       (0 = padding), 'image_id' and 'case_id': [batch_size] the file paths}.
    """
    import tensorflow as tf

    from micle_jax.data.augment import policies

    def load(path):
        # channels=3: gray becomes RGB (as the evaluation's gray-to-RGB), alpha is dropped.
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return policies.eval_transform(image, image_size)

    dataset = tf.data.Dataset.from_tensor_slices(list(paths)).map(
        load, num_parallel_calls=tf.data.AUTOTUNE
    )
    for start, images in zip(
        range(0, len(paths), batch_size),
        dataset.batch(batch_size).as_numpy_iterator(),
        strict=True,
    ):
        names = np.array(paths[start : start + batch_size], dtype=object)
        pad = batch_size - len(images)
        mask = np.r_[np.ones(len(images)), np.zeros(pad)].astype(np.float32)
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
        names = np.concatenate([names, np.array([""] * pad, dtype=object)])
        yield {"image": images, "mask": mask, "image_id": names, "case_id": names}


def record_batches(
    records: str, split: str, image_size: int, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Host batches of a record set's split through the pipeline's 'eval' mode."""
    from micle_jax import config_lib
    from micle_jax.data.stream import pipeline

    data = config_lib.data_config(
        source=f"records:{records}", split=split, mode="eval", image_size=image_size
    )
    return pipeline.open_data(data, seed=0).dataset("eval", batch_size).as_numpy_iterator()


def predict(
    workdir: str,
    images: str | None = None,
    records: str | None = None,
    split: str = "test",
    which: str = "final",
    batch_size: int = 64,
) -> tuple[list[str], list[list]]:
    """Predicts image files (`images`, a glob) or a record split with a fine-tuned run.

    Returns:
      (CSV header, rows): one row per image [image, case_id, prediction,
      prob/<class> ...].
    """
    if bool(images) == bool(records):
        raise ValueError("give exactly one of --images=GLOB and --records=PATH")
    model, variables, task, mesh = load_run(workdir, which)
    # A multiple of the device count, so the batch splits over the mesh.
    batch_size = -(-max(batch_size, 1) // jax.device_count()) * jax.device_count()
    if images:
        batches = image_batches(find_images(images), task.image_size, batch_size)
    else:
        batches = record_batches(records, split, task.image_size, batch_size)
    out = Predictor(model, mesh).predict(variables, batches, ("logits",))
    if task.label_type == "multiclass":
        probs = metrics.softmax(out["logits"])
    else:
        probs = metrics.sigmoid(out["logits"])
    header = ["image", "case_id", "prediction"] + [f"prob/{c}" for c in task.class_names]
    rows = [
        [image_id, case_id, task.class_names[int(np.argmax(p))]] + [f"{v:.6f}" for v in p]
        for image_id, case_id, p in zip(out["image_id"], out["case_id"], probs, strict=True)
    ]
    return header, rows


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Writes the CSV through a temporary file and a rename."""
    with rundir.atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def main(argv):
    from absl import flags, logging

    del argv
    flag = flags.FLAGS
    logging.set_verbosity(logging.INFO)
    from micle_jax.data.stream import tf_host

    tf_host.keep_tf_on_host()  # TF only decodes; JAX owns the accelerator
    try:
        header, rows = predict(
            flag.workdir, flag.images, flag.records, flag.split, flag.checkpoint, flag.batch_size
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"micle_jax.predict: error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        write_csv(flag.output, header, rows)
        print(f"Wrote {len(rows)} predictions to {flag.output}")


def _define_flags():
    from absl import flags

    flags.DEFINE_string("workdir", None, "A fine-tuning run's workdir.", required=True)
    flags.DEFINE_string("images", None, "Glob of PNG/JPEG files ('**' recurses).")
    flags.DEFINE_string("records", None, "A record set (python -m micle_jax.data.convert).")
    flags.DEFINE_string("split", "test", "With --records: the split.")
    flags.DEFINE_string("output", "predictions.csv", "Where the CSV goes.")
    flags.DEFINE_string("checkpoint", "final", "final | best | a checkpoint path.")
    flags.DEFINE_integer("batch_size", 64, "Images per batch (rounded up to the devices).")


if __name__ == "__main__":
    from absl import app

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _define_flags()
    app.run(main)
