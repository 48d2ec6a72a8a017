r"""Imports an official SimCLR TF2 model as a micle_jax workdir that any trainer starts from.

  python -m micle_jax.import_weights --src=r50_1x_sk0/saved_model --workdir=/runs/r50_1x_sk0
  python -m micle_jax.import_weights --src=model_dir/ckpt-1 --workdir=/runs/mine --arch=r50x1 \
      --check=outputs.npz

--src is a SimCLR TF2 SavedModel folder (the released SimCLR v1/v2 models,
gs://simclr-checkpoints-tf2/...) or a checkpoint written by the official
tf2/run.py (a ckpt-N prefix or its model_dir: the latest). Depth, width,
selective kernels, stem, projection head and supervised head are read from
the variables; `--arch` (e.g. r50x1, r152x3_sk or r50_1x_sk0) makes a
mismatch an error. The workdir gets an Orbax checkpoint (checkpoints/0: the
backbone, projection head, supervised head and BatchNorm statistics) and a
config.json with the model block, so that `init=WORKDIR` of every config
(micle_medical, simclr_medical, finetune_*, linear_eval) starts from it.

`--check=outputs.npz` runs the imported model in inference mode on the npz's
`images` (NHWC float32 in [0, 1]) and compares with the official model's
`final_avg_pool`, `proj_head_input`, `proj_head_output` and `logits_sup`
(those present); above a relative error of 1e-4 (max |ours - theirs| /
max |theirs|) it writes nothing and exits 1. Every mismatch is an error
naming the variable, its shape and the expected one; nothing is written on
failure, and an existing non-empty workdir is never overwritten.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import jax
import numpy as np

from micle_jax import checkpoint, config_lib, models, rundir, simclr_tf2
from micle_jax.models import resnet

# --check's tolerance: max |ours - official| / max |official| per output.
CHECK_TOLERANCE = 1e-4
# The official outputs in a --check npz -> this framework's model outputs.
CHECKED_OUTPUTS = {
    "final_avg_pool": "features",
    "proj_head_input": "features",  # SimCLR: tf.identity of the ResNet's output
    "proj_head_output": "projections",
    "logits_sup": "logits",
}


@dataclasses.dataclass
class Imported:
    """A SimCLR TF2 model read and mapped: what `write` saves."""

    variables: dict  # {'params', 'batch_stats'}
    arch: simclr_tf2.Architecture
    model_config: dict
    source: str
    format: str
    num_tf_variables: int


def load(src: str, arch: str | None = None, head_input: int = 0) -> Imported:
    """Reads `src`, maps it onto this framework's model and checks every shape.

    Args:
      src: SavedModel folder, checkpoint prefix or tf2/run.py model_dir.
      arch: None, or the architecture the user expects (config_lib.arch_fields name).
      head_input: which projection hidden the supervised head reads (SimCLR's
        ft_proj_selector, 0 = the backbone features, its default).
    """
    prefix, fmt = simclr_tf2.find_checkpoint(src)
    return from_tf_variables(simclr_tf2.read_variables(prefix), src, fmt, arch, head_input)


def from_tf_variables(
    tf_vars: dict[str, np.ndarray],
    src: str,
    fmt: str,
    arch: str | None = None,
    head_input: int = 0,
) -> Imported:
    """`load` after reading: maps `simclr_tf2.read_variables`' output and checks it.

    Args:
      tf_vars: {structural TF path: array}.
      src, fmt: where they came from and its format, for messages and config.json.
      arch, head_input: as `load`.
    """
    variables, found, sources = simclr_tf2.to_flax(tf_vars)
    if arch:
        _check_arch(arch, found)
    model_config = models.get_config(
        depth=found.depth,
        width=found.width,
        sk_ratio=found.sk_ratio,
        cifar_stem=found.cifar_stem,
        proj_layers=found.proj_layers,
        proj_dim=found.proj_dim,
        num_classes=found.num_classes,
        head_input=head_input,
    )
    model = models.build_model(model_config)
    size = trained_size(found)
    image = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
    _check_shapes(abstract, variables, sources, src)
    return Imported(
        variables=variables,
        arch=found,
        model_config=model_config.to_dict(),
        source=os.path.abspath(src),
        format=fmt,
        num_tf_variables=sum(1 for p in tf_vars if p.startswith("model/")),
    )


def trained_size(arch: simclr_tf2.Architecture) -> int:
    """The image size SimCLR trains a model at: its ImageNet size, or the CIFAR stem's largest."""
    return resnet.CIFAR_STEM_MAX_SIZE if arch.cifar_stem else config_lib.DATA_DEFAULTS["image_size"]


def _check_arch(arch: str, found: simclr_tf2.Architecture) -> None:
    want = config_lib.arch_fields(arch)
    have = dict(depth=found.depth, width=found.width, sk_ratio=found.sk_ratio)
    if any(not np.isclose(float(want[k]), float(have[k])) for k in have):
        raise ValueError(
            f"--arch={arch} is ResNet-{want['depth']} width {want['width']:g} "
            f"sk_ratio {want['sk_ratio']:g}, but the checkpoint holds ResNet-{found.depth} "
            f"width {found.width:g} sk_ratio {found.sk_ratio:g} ({found.name}, arch="
            f"{found.arch}); drop --arch or give the right one"
        )


def _check_shapes(abstract: dict, variables: dict, sources: dict, src: str) -> None:
    """Errors naming every variable whose presence or shape differs from the model's."""
    problems = []
    for where, have, want in checkpoint.variable_differences(abstract, variables):
        origin = sources.get(where, "")
        if have is None:
            problems.append(f"{where}: {want} expected, not in {src}")
        elif want is None:
            problems.append(f"{origin} {have}: has no place in the model")
        else:
            problems.append(f"{origin} -> {where}: shape {have}, expected {want}")
    if problems:
        raise ValueError(
            f"{src} does not fit the SimCLR model its variables describe ({len(problems)} "
            "problem(s); a truncated or modified checkpoint?):\n  " + "\n  ".join(problems[:12])
        )


def check_outputs(imported: Imported, npz_path: str) -> dict[str, float]:
    """Relative errors of the imported model against an official model's outputs.

    Args:
      imported: from `load`.
      npz_path: `images` [N, H, W, 3] float32 in [0, 1] and some of
        CHECKED_OUTPUTS' keys, computed by the official model with
        trainable=False.

    Returns:
      {official output name: max |ours - theirs| / max |theirs|}.
    """
    with np.load(npz_path) as npz:
        data = {k: npz[k] for k in npz.files}
    images = data.get("images")
    if images is None or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"--check={npz_path}: needs 'images' [N, H, W, 3] float32 in [0, 1]; it has "
            f"{ {k: v.shape for k, v in data.items()} }"
        )
    if images.dtype != np.float32 or images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"--check={npz_path}: 'images' must be float32 in [0, 1] (SimCLR's input), got "
            f"{images.dtype} in [{images.min()}, {images.max()}]"
        )
    present = [k for k in CHECKED_OUTPUTS if k in data]
    if not present:
        raise ValueError(f"--check={npz_path} has none of {list(CHECKED_OUTPUTS)} to compare")
    if "logits_sup" in present and imported.arch.num_classes == 0:
        raise ValueError(
            f"--check={npz_path} has logits_sup but {imported.source} has no supervised head"
        )
    model = models.build_model(models.get_config(**imported.model_config))
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(imported.variables, images)
    errors = {}
    for name in present:
        theirs = np.asarray(data[name], np.float64)
        mine = np.asarray(ours[CHECKED_OUTPUTS[name]], np.float64)
        if mine.shape != theirs.shape:
            raise ValueError(
                f"--check: {name} has shape {theirs.shape}, the model gives {mine.shape}"
            )
        errors[name] = float(np.max(np.abs(mine - theirs)) / max(np.max(np.abs(theirs)), 1e-30))
    return errors


def write(imported: Imported, workdir: str, image_size: int | None = None) -> str:
    """Writes the workdir: checkpoints/0 (Orbax) and config.json, all or nothing.

    Everything goes to a temporary sibling folder first, renamed to `workdir`
    at the end. An existing non-empty `workdir` is an error.

    Args:
      imported: from `load`.
      workdir: a new (or empty) folder.
      image_size: the size the model was trained at, recorded as
        config.json's data.image_size (what `embed` uses by default); None =
        SimCLR's: 224, or 32 for the CIFAR stem.

    Returns:
      The workdir's absolute path.
    """
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image_size={image_size} must be a positive number of pixels")
    path = rundir.check_workdir(workdir)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(
            f"--workdir={workdir} exists and is not empty; give a new folder (nothing was "
            "overwritten)"
        )
    tmp = f"{path}.importing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        manager = checkpoint.make_manager(tmp, keep=1, async_save=False)
        meta = {"imported_from": imported.source, "format": imported.format}
        checkpoint.save(manager, 0, imported.variables, meta)
        manager.wait_until_finished()
        manager.close()
        size = image_size or trained_size(imported.arch)
        config = {
            "model": imported.model_config,
            "data": {"image_size": size},
            "imported_from": {
                "source": imported.source,
                "format": imported.format,
                "simclr_name": imported.arch.name,
                "arch": imported.arch.arch,
            },
        }
        rundir.write_json_atomic(os.path.join(tmp, rundir.CONFIG_FILE), config)
        if os.path.isdir(path):
            os.rmdir(path)  # empty, checked above
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def describe(imported: Imported) -> str:
    """One paragraph on what was read, for the CLI."""
    a = imported.arch
    stem = "CIFAR stem" if a.cifar_stem else "ImageNet stem"
    sk = "selective kernels" if a.sk_ratio > 0 else "no selective kernels"
    head = f"supervised head {a.num_classes} classes" if a.num_classes else "no supervised head"
    params = models.count_params(imported.variables["params"])
    return (
        f"Read {imported.format} {imported.source}: {imported.num_tf_variables} variables, "
        f"{params:,} trainable parameters\n"
        f"ResNet-{a.depth} width {a.width:g}, {sk}, {stem} (SimCLR {a.name}; arch={a.arch}); "
        f"projection head {a.proj_layers} layers -> {a.proj_dim}; {head}"
    )


def main(argv) -> None:
    from absl import flags

    from micle_jax.data.stream import tf_host

    del argv
    flag = flags.FLAGS
    tf_host.keep_tf_on_host()  # TF only reads the checkpoint; JAX owns the accelerator
    try:
        imported = load(flag.src, flag.arch, flag.head_input)
        print(describe(imported))
        if flag.check:
            errors = check_outputs(imported, flag.check)
            print(
                f"Check against {flag.check} (max relative error, limit {CHECK_TOLERANCE:g}): "
                + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
            )
            bad = {k: v for k, v in errors.items() if not v <= CHECK_TOLERANCE}
            if bad:
                raise ValueError(
                    f"the imported model differs from the official outputs: {bad}; nothing "
                    "written (wrong --head_input? a modified model?)"
                )
        path = write(imported, flag.workdir, flag.image_size)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"micle_jax.import_weights: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"Wrote {path} (Orbax checkpoint checkpoints/0, config.json)")
    print(
        "Start from it: python -m micle_jax.main --config=configs/micle_medical.py:"
        f"records=DIR,arch={imported.arch.arch},init={path} --workdir=RUN"
    )


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("src", None, "SimCLR TF2 SavedModel or checkpoint.", required=True)
    flags.DEFINE_string("workdir", None, "New folder for the imported weights.", required=True)
    flags.DEFINE_string("arch", None, "Expected architecture (r50x1, r50_1x_sk0, ...).")
    flags.DEFINE_integer("head_input", 0, "SimCLR's ft_proj_selector of the supervised head.")
    flags.DEFINE_string("check", None, "npz with images and the official model's outputs.")
    flags.DEFINE_integer("image_size", None, "Training image size (default 224; CIFAR stem 32).")


if __name__ == "__main__":
    from absl import app

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _define_flags()
    app.run(main)
