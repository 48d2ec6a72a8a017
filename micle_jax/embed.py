r"""Backbone embeddings of image files from any run, written as an npz (retrieval, k-NN).

  python -m micle_jax.embed --workdir=/runs/ft_derm --images='/data/new/*.png' \
      --output=embeddings.npz
  python -m micle_jax.embed --workdir=/runs/micle_cxr --images='/data/cxr/**/*.jpg' \
      --output=/tmp/cxr.npz --checkpoint=/runs/micle_cxr/checkpoints/5000 --image_size=224

The workdir is any micle_jax run with a config.json and Orbax checkpoints: a
fine-tuning run, a pre-training run (SimCLR or MICLe), or a workdir of
imported released SimCLR weights. Only the backbone is used: the model is
built from the run's `model` block and the checkpoint's backbone weights are
checked against it (the heads are ignored, so a pre-training run's online
probe needs no task). Images get the evaluation preprocessing (SimCLR's
centre crop keeping 87.5%, resized to `--image_size`, by default the run's
`data.image_size`), exactly as `python -m micle_jax.predict`; batches are
padded to a multiple of the devices and the padding dropped.

The npz holds `embeddings` float32 [N, D] (the backbone's pooled features,
BatchNorm on running averages), `paths` [N] str (sorted, the row order),
`image_size` and `checkpoint` (the state folder the weights came from).
"""

from __future__ import annotations

import os
import sys

import jax
import ml_collections
import numpy as np

from micle_jax import checkpoint, config_lib, models, rundir, sharding
from micle_jax.evaluators.predictor import Predictor
from micle_jax.models import resnet
from micle_jax.predict import find_images, image_batches

FEATURES = "features"


def run_image_size(config: dict, image_size: int | None) -> int:
    """`image_size` if given, else the run's data.image_size; an error if neither."""
    if image_size is None:
        image_size = config.get("data", {}).get("image_size")
        if image_size is None:
            raise ValueError("the run's config.json has no data.image_size; give --image_size=N")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image size {image_size!r} must be a positive integer")
    return image_size


def build_backbone(config: dict):
    """The backbone of the run's `model` block, its stem fixed at the run's image size.

    A model block with cifar_stem=None picks the stem from the input size
    (SimCLR's rule: CIFAR stem iff <= 32 px). The weights were trained at the
    run's data.image_size, so the stem is resolved from that size: embedding
    at another --image_size keeps the trained stem instead of asking for
    weights the checkpoint does not have.
    """
    if "model" not in config:
        raise ValueError("the run's config.json has no 'model' block")
    model_config = ml_collections.ConfigDict(config["model"])
    trained_size = config.get("data", {}).get("image_size")
    if model_config.get("cifar_stem") is None and trained_size is not None:
        model_config.cifar_stem = resnet.uses_cifar_stem(None, (1, trained_size, trained_size, 3))
    return models.build_model(model_config).backbone


def backbone_variables(loaded: dict, source: str) -> dict:
    """{'params', 'batch_stats'} of the backbone from a whole model's checkpoint variables."""
    if "backbone" not in loaded["params"]:
        raise ValueError(
            f"checkpoint {source} has no backbone weights (its params hold "
            f"{sorted(loaded['params'])}); is it a micle_jax model checkpoint?"
        )
    return {
        "params": loaded["params"]["backbone"],
        "batch_stats": loaded.get("batch_stats", {}).get("backbone", {}),
    }


class _BackboneFeatures:
    """The backbone as a Predictor model: apply(...) -> {'features': [B, D] float32}."""

    def __init__(self, backbone):
        self.backbone = backbone

    def apply(self, variables, images, train: bool):
        features = self.backbone.apply(variables, images, train=train)
        return {FEATURES: features.astype(np.float32)}


def load_backbone(workdir: str, which: str = "final", image_size: int | None = None):
    """The backbone, its weights on the mesh, the mesh, the image size and the checkpoint.

    Args:
      workdir: any micle_jax run (config.json with a `model` block, checkpoints).
      which: 'final' (the latest checkpoint), 'best' (WORKDIR/best) or a
        checkpoint path.
      image_size: input side; None = the run's data.image_size.

    Returns:
      (backbone module, variables {'params', 'batch_stats'} on the mesh, mesh,
       image_size, state folder of the checkpoint).
    """
    config = rundir.read_config(workdir)
    image_size = run_image_size(config, image_size)
    backbone = build_backbone(config)
    path = checkpoint.select(workdir, which)
    source = str(checkpoint.resolve(path))
    loaded = backbone_variables(checkpoint.load_variables(path), source)
    image = np.zeros((1, image_size, image_size, 3), np.float32)
    abstract = jax.eval_shape(lambda: backbone.init(jax.random.key(0), image, train=False))
    abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    # Named as in the whole model, so the error reads params/backbone/...
    checkpoint.check_variables(
        {k: {"backbone": v} for k, v in abstract.items()},
        {k: {"backbone": v} for k, v in loaded.items()},
        source,
    )
    mesh_config = ml_collections.ConfigDict(config.get("mesh") or config_lib.mesh_config())
    mesh = sharding.make_mesh(mesh_config)
    min_size = mesh_config.get("shard_min_size", config_lib.mesh_config().shard_min_size)
    variables = jax.device_put(
        jax.tree.map(lambda x, a: np.asarray(x, a.dtype), loaded, abstract),
        sharding.tree_shardings(abstract, mesh, min_size),
    )
    return backbone, variables, mesh, image_size, source


def embed(
    workdir: str,
    images: str,
    which: str = "final",
    batch_size: int = 64,
    image_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Backbone embeddings of the image files matching `images` (a glob, ** recurses).

    Returns:
      {'embeddings': [N, D] float32, 'paths': [N] str (sorted), 'image_size': int,
       'checkpoint': str}.
    """
    paths = find_images(images)
    backbone, variables, mesh, image_size, source = load_backbone(workdir, which, image_size)
    # A multiple of the device count, so the batch splits over the mesh.
    batch_size = -(-max(batch_size, 1) // jax.device_count()) * jax.device_count()
    batches = image_batches(paths, image_size, batch_size)
    out = Predictor(_BackboneFeatures(backbone), mesh).predict(variables, batches, (FEATURES,))
    if list(out["image_id"]) != paths:
        raise RuntimeError("embeddings came back in another order than the images")
    return {
        "embeddings": np.asarray(out[FEATURES], np.float32),
        "paths": np.array(paths, dtype=str),
        "image_size": np.array(image_size),
        "checkpoint": np.array(source),
    }


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes the npz through a temporary file in the same folder and a rename."""
    with rundir.atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def main(argv):
    from absl import flags, logging

    del argv
    flag = flags.FLAGS
    logging.set_verbosity(logging.INFO)
    from micle_jax.data.stream import tf_host

    tf_host.keep_tf_on_host()  # TF only decodes; JAX owns the accelerator
    try:
        arrays = embed(flag.workdir, flag.images, flag.checkpoint, flag.batch_size, flag.image_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"micle_jax.embed: error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        write_npz(flag.output, arrays)
        n, dim = arrays["embeddings"].shape
        print(f"Wrote {n} embeddings of dimension {dim} to {flag.output}")


def _define_flags():
    from absl import flags

    flags.DEFINE_string("workdir", None, "A run: config.json and checkpoints.", required=True)
    flags.DEFINE_string("images", None, "Glob of PNG/JPEG files ('**' recurses).", required=True)
    flags.DEFINE_string("output", "embeddings.npz", "Where the npz goes.")
    flags.DEFINE_string("checkpoint", "final", "final | best | a checkpoint path.")
    flags.DEFINE_integer("batch_size", 64, "Images per batch (rounded up to the devices).")
    flags.DEFINE_integer("image_size", None, "Input side in pixels; default: the run's.")


if __name__ == "__main__":
    from absl import app

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _define_flags()
    app.run(main)
