r"""A fine-tuned classifier as a TensorFlow SavedModel, with its model card.

  python -m micle_jax.export --workdir=/runs/ft_derm --out=/exports/derm_v1
  python -m micle_jax.export --workdir=/runs/ft_cxr --out=/exports/cxr_v1 --checkpoint=best

The SavedModel holds the run's evaluation preprocessing (what `python -m
micle_jax.predict` applies: decode with 3 channels, SimCLR's centre crop of
87.5%, bicubic resize to the run's image size), so plain TensorFlow gives the
same probabilities as predict.py (up to float32 rounding):

  model = tf.saved_model.load("/exports/derm_v1")
  out = model.signatures["serving_default"](image_bytes=tf.constant([png_bytes, jpeg_bytes]))
  out = model.signatures["serve_images"](images=uint8_batch)  # [batch, h, w, 3]
  out["probabilities"], out["embedding"], out["logits"]
  model.class_names.numpy()  # the logit order (also assets/class_names.txt)
  model.classify(images)  # already preprocessed: float32 [batch, size, size, 3] in [0, 1]

Signatures (SIGNATURES): `serving_default` takes encoded PNG/JPEG files of
any size (gray, RGB or RGBA), `serve_images` a uint8 batch of RGB images of
one size. Both output `probabilities` (softmax for multiclass runs,
independent sigmoids for multilabel ones, as predict.py), `embedding` (the
backbone's pooled features) and `logits`. The batch dimension is polymorphic
(at least 1 image per call). Export is a single-process tool: the whole
model is gathered to the host.

The model goes through jax2tf (native serialization, lowered for
--platforms: CPU and CUDA GPUs by default), its parameters and BatchNorm
statistics are tf.Variables (not constants: models of any size stay clear of
the 2 GB graph limit). DIR/model_card.md and DIR/model_card.json describe the
model, its pre-training chain, data, metrics, licences and intended use
(micle_jax/model_card.py). Everything is written into a temporary sibling
folder `.DIR.tmp*` and renamed to DIR at the end; an existing DIR is an error.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

import jax
import numpy as np

from micle_jax import checkpoint, model_card, predict, rundir
from micle_jax.task import TaskInfo

DEFAULT_PLATFORMS = ("cpu", "cuda")
CLASS_NAMES_ASSET = "class_names.txt"
SIGNATURES = {
    "serving_default": {
        "inputs": {
            "image_bytes": "string [batch]: encoded PNG or JPEG files, any size, gray, RGB "
            "or RGBA (alpha dropped)"
        }
    },
    "serve_images": {
        "inputs": {"images": "uint8 [batch, height, width, 3]: RGB images of one size"}
    },
}
OUTPUTS = {
    "probabilities": "float32 [batch, classes]: softmax (multiclass) or independent "
    "sigmoids (multilabel)",
    "embedding": "float32 [batch, features]: the backbone's pooled features",
    "logits": "float32 [batch, classes]",
}


@dataclasses.dataclass
class Exported:
    """What `export` wrote.

    Attributes:
      path: the SavedModel folder.
      step: the exported checkpoint's training step.
      which: 'final', 'best' or the checkpoint path given.
      task: the model's task (classes in logit order).
      embedding_dim: the width of the `embedding` output.
      platforms: what the model was lowered for.
    """

    path: str
    step: int | None
    which: str
    task: TaskInfo
    embedding_dim: int
    platforms: tuple[str, ...]

    def summary(self) -> str:
        """The CLI's report: short and deterministic."""
        t, k = self.task, self.task.num_classes
        kind = "softmax" if t.label_type == "multiclass" else "sigmoids"
        return "\n".join(
            [
                f"Wrote SavedModel {self.path}",
                f"  checkpoint: {self.which} (step {self.step}), lowered for "
                + ", ".join(self.platforms),
                "  signatures: serving_default (image_bytes: string [batch], PNG/JPEG files)",
                "              serve_images (images: uint8 [batch, height, width, 3])",
                f"  outputs: probabilities [batch, {k}] ({t.label_type}, {kind}), "
                f"embedding [batch, {self.embedding_dim}], logits [batch, {k}]",
                f"  classes: {k}, in logit order in assets/{CLASS_NAMES_ASSET}",
                f"  model card: {model_card.CARD_MARKDOWN}, {model_card.CARD_JSON}",
            ]
        )


def probabilities(logits, label_type: str):
    """Class probabilities of logits in TensorFlow, as predict.py computes them.

    Args:
      logits: [batch, classes] float tf.Tensor (or array).
      label_type: 'multiclass' (softmax over classes) or 'multilabel'
        (an independent sigmoid per class).
    """
    import tensorflow as tf

    if label_type == "multiclass":
        return tf.nn.softmax(logits, axis=-1)
    if label_type == "multilabel":
        return tf.math.sigmoid(logits)
    raise ValueError(
        f"label_type {label_type!r} has no probabilities; accepted: multiclass, multilabel"
    )


def check_out(out: str) -> str:
    """The absolute export folder; an error if it exists (nothing is ever overwritten)."""
    if not out:
        raise ValueError("--out is required: a new folder for the SavedModel")
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.lexists(path):
        raise ValueError(
            f"--out={out} already exists ({path}); give a new folder (export never overwrites)"
        )
    parent = os.path.dirname(path)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"--out={out}: {parent} is a file, not a folder")
    return path


def build_module(model, variables, task: TaskInfo, platforms: Sequence[str]):
    """The tf.Module to save: the model through jax2tf, its variables, the two signatures.

    Args:
      model: the Flax SimCLRModel (with a head).
      variables: {'params', 'batch_stats'} host arrays.
      task: classes, label type, image size.
      platforms: jax2tf native serialization platforms, e.g. ('cpu', 'cuda').

    Returns:
      (module, {signature name: tf.function}).
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    from micle_jax.data.augment import policies

    size = task.image_size

    def forward(variables, images):
        out = model.apply(variables, images, train=False)
        return out["logits"], out["features"]

    forward_tf = jax2tf.convert(
        forward,
        polymorphic_shapes=[None, f"(batch, {size}, {size}, 3)"],
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    module = tf.Module()

    # A plain dict for jax2tf; the module's attribute makes TF track and save them.
    def as_variable(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return tf.Variable(x, trainable=False, name=name)

    tf_variables = jax.tree_util.tree_map_with_path(as_variable, variables)
    module.model_variables = tf_variables
    module.class_names = tf.Variable(task.class_names, trainable=False, dtype=tf.string)
    module.label_type = tf.Variable(task.label_type, trainable=False, dtype=tf.string)

    @tf.function(
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], autograph=False
    )
    def classify(images):
        logits, features = forward_tf(tf_variables, images)
        return {
            "probabilities": probabilities(logits, task.label_type),
            "embedding": features,
            "logits": logits,
        }

    def preprocess(image):  # predict.image_batches' transform, on one decoded image
        return policies.eval_transform(image, size)

    image_spec = tf.TensorSpec([size, size, 3], tf.float32)

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")], autograph=False
    )
    def serve_bytes(image_bytes):
        def load(encoded):
            # channels=3: gray becomes RGB, alpha is dropped (as predict.image_batches).
            return preprocess(tf.io.decode_image(encoded, channels=3, expand_animations=False))

        return classify(tf.map_fn(load, image_bytes, fn_output_signature=image_spec))

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
        autograph=False,
    )
    def serve_images(images):
        return classify(tf.map_fn(preprocess, images, fn_output_signature=image_spec))

    module.classify, module.serve_bytes, module.serve_images = classify, serve_bytes, serve_images
    return module, {"serving_default": serve_bytes, "serve_images": serve_images}


def _save(module, signatures: dict, class_names: Sequence[str], folder: str) -> None:
    """tf.saved_model.save into `folder`, with the class names as assets/class_names.txt."""
    import tensorflow as tf

    staging = os.path.join(folder, ".staging")
    os.makedirs(staging)
    staged = os.path.join(staging, CLASS_NAMES_ASSET)
    with open(staged, "w") as f:
        f.writelines(f"{c}\n" for c in class_names)
    module.class_names_file = tf.saved_model.Asset(staged)  # copied to assets/ by save
    tf.saved_model.save(module, folder, signatures=signatures)
    shutil.rmtree(staging)


def export(
    workdir: str, out: str, which: str = "final", platforms: Sequence[str] = DEFAULT_PLATFORMS
) -> Exported:
    """Exports a fine-tuning run's checkpoint as a SavedModel with its model card.

    Args:
      workdir: a run of micle_jax.trainers.finetune.
      out: the new folder to write (must not exist).
      which: 'final', 'best' or a checkpoint path (as predict.py --checkpoint).
      platforms: what to lower the model for ('cpu', 'cuda', 'tpu').

    Returns:
      An `Exported` (its `summary()` is what the CLI prints).

    Raises:
      ValueError, FileNotFoundError: one line naming the problem and the fix;
        nothing is written then.
    """
    path = check_out(out)
    if not platforms or set(platforms) - {"cpu", "cuda", "rocm", "tpu"}:
        raise ValueError(f"--platforms={','.join(platforms)}; accepted: cpu, cuda, rocm, tpu")
    model, variables, task, _ = predict.load_run(workdir, which)
    variables = jax.device_get(variables)
    state_dir = checkpoint.resolve(checkpoint.select(workdir, which))
    step = int(state_dir.parent.name) if state_dir.parent.name.isdigit() else None
    module, signatures = build_module(model, variables, task, platforms)
    image = np.zeros((1, task.image_size, task.image_size, 3), np.float32)
    features = jax.eval_shape(lambda: model.apply(variables, image, train=False))["features"]
    card = model_card.build_card(
        workdir,
        rundir.read_config(workdir),
        task,
        variables["params"],
        {"which": which, "path": str(state_dir), "step": step},
        {"signatures": SIGNATURES, "outputs": OUTPUTS, "platforms": list(platforms)},
    )

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp", dir=os.path.dirname(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is owner-only
        _save(module, signatures, task.class_names, tmp)
        model_card.write_card(tmp, card)
        if os.path.lexists(path):
            raise ValueError(f"--out={out} appeared while exporting; nothing was overwritten")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(path, step, which, task, int(features.shape[-1]), tuple(platforms))


def main(argv):
    from absl import flags, logging

    del argv
    flag = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    from micle_jax.data.stream import tf_host

    tf_host.keep_tf_on_host()  # TF only traces and saves; JAX owns the accelerator
    try:
        exported = export(
            flag.workdir, flag.out, flag.checkpoint, [p for p in flag.platforms.split(",") if p]
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"micle_jax.export: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(exported.summary())


def _define_flags():
    from absl import flags

    flags.DEFINE_string("workdir", None, "A fine-tuning run's workdir.", required=True)
    flags.DEFINE_string("out", None, "The new SavedModel folder (must not exist).", required=True)
    flags.DEFINE_string("checkpoint", "final", "final | best | a checkpoint path.")
    flags.DEFINE_string(
        "platforms", ",".join(DEFAULT_PLATFORMS), "Lower for these: cpu, cuda, rocm, tpu."
    )


if __name__ == "__main__":
    from absl import app

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _define_flags()
    app.run(main)
