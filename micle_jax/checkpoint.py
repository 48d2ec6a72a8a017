"""Checkpoints: Orbax CheckpointManager, resume, and init-from-another-stage.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `state` is the whole train
state pytree (step, params, batch_stats, optimizer state); `meta` is JSON
(global batch size, seed, config name) checked on resume. Orbax writes each
step to a temporary folder and renames it when complete, so a killed save
never leaves a checkpoint that looks whole.

Resume order (big_vision): this workdir's latest checkpoint, then the
config's init checkpoint (weights only), then scratch.

A workdir may be a gs:// URL: Orbax writes there through etils.epath
(tf.io.gfile) and TensorStore, and asks google-cloud-storage about the bucket
(pip install -e '.[gcs]').
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from micle_jax import fs, rundir

PROJECTION_HEAD = "projection_head"
# A `merge_variables` prefix: every leading projection layer that the checkpoint
# and the model share (same arrays, same shapes), however many that is.
SHARED_PROJECTION_LAYERS = "projection_head/*"


def _single_process_array_saving() -> None:
    """With one process, jax.Arrays are saved without Orbax's replica-parallel slicing.

    Replica-parallel saving has each replica of a replicated array write a
    slice of it, which spreads a pod's checkpoint write over its hosts. With
    one process every slice is written by that process anyway, and each
    array's slice is a compiled computation: on 8 CPU devices the first save
    of the tiny test network (196 arrays) took 5.0 s with it and 0.46 s
    without. Several processes keep Orbax's default.
    """
    if jax.process_count() == 1:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over WORKDIR/checkpoints keeping the last `keep` steps."""
    _single_process_array_saving()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    folder = workdir if fs.is_url(workdir) else os.path.abspath(workdir)
    return ocp.CheckpointManager(
        os.path.join(folder, rundir.CHECKPOINT_DIR),
        options=options,
        item_names=("state", "meta"),
    )


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Saves `state` and `meta` at `step` (asynchronously when the manager is async)."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Restores (state, meta) at `step` with the shardings of `abstract_state`.

    Args:
      manager: from `make_manager`.
      step: a step in `manager.all_steps()`.
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding`, same
        structure as the saved state.
    """
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
    except (ValueError, KeyError, TypeError) as e:
        path = os.path.join(str(manager.directory), str(step))
        raise ValueError(
            f"checkpoint {path} does not match this config's model/optimizer ({e}). "
            "Use a fresh --workdir for a different config, or set config.init.checkpoint "
            "to start from these weights only."
        ) from e
    return restored.state, dict(restored.meta)


def resolve(path: str) -> pathlib.Path | epath.Path:
    """Finds the state folder of a checkpoint given a workdir, its checkpoints folder or a step.

    Accepts WORKDIR (latest step), WORKDIR/checkpoints (latest step),
    WORKDIR/checkpoints/<step> or WORKDIR/checkpoints/<step>/state; a local
    path gives a pathlib.Path, a URL (gs://...) an etils.epath.Path.
    """
    # Absolute: Orbax reads no metadata through a relative path.
    p = epath.Path(path) if fs.is_url(path) else pathlib.Path(path).expanduser().absolute()
    if not p.exists():
        raise FileNotFoundError(
            f"checkpoint path {p} does not exist; give a training workdir or one of its "
            f"{rundir.CHECKPOINT_DIR}/<step> folders"
        )
    if (p / "state").is_dir():
        return p / "state"
    if p.name == "state" and p.is_dir():
        return p
    ckpt_dir = p / rundir.CHECKPOINT_DIR if (p / rundir.CHECKPOINT_DIR).is_dir() else p
    steps = sorted(int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit() and d.is_dir())
    steps = [s for s in steps if (ckpt_dir / str(s) / "state").is_dir()]
    if not steps:
        raise FileNotFoundError(
            f"no finished checkpoint under {ckpt_dir}: the run saved none yet, or this is not "
            "a micle_jax workdir"
        )
    return ckpt_dir / str(steps[-1]) / "state"


def select(workdir: str, which: str) -> str:
    """The checkpoint `which` of a run, as a path `resolve` and `load_variables` accept.

    Args:
      workdir: a run's workdir.
      which: 'final' (its latest checkpoint), 'best' (WORKDIR/best, kept by
        fine-tuning with config.select_best) or a checkpoint path.
    """
    if which == "final":
        return workdir
    if which == "best":
        path = rundir.best_dir(workdir)
        if not fs.isdir(path):
            raise FileNotFoundError(
                f"{path} does not exist: the run kept no best checkpoint (only fine-tuning "
                "with config.select_best keeps one); use --checkpoint=final"
            )
        return path
    return which


def load_variables(path: str) -> dict:
    """Loads {'params': ..., 'batch_stats': ...} of a checkpoint as host numpy trees."""
    state_dir = resolve(path)
    # Restored as host numpy arrays: the checkpoint may come from another
    # topology (a TPU pod for stage 1, a GPU box for stage 2).
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(state_dir).item_metadata
        if metadata is None:
            raise ValueError(
                f"{state_dir} has no readable Orbax metadata: not a finished checkpoint"
            )
        tree = metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        raw = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    if not isinstance(raw, dict) or "params" not in raw:
        raise ValueError(f"{state_dir} is not a micle_jax train state (no 'params')")
    logging.info("Loaded weights from %s", state_dir)
    return {
        "params": jax.tree.map(np.asarray, raw["params"]),
        "batch_stats": jax.tree.map(np.asarray, raw.get("batch_stats", {})),
    }


def variable_differences(abstract: dict, loaded: dict) -> list[tuple]:
    """Where a model's and a checkpoint's {'params', 'batch_stats'} differ.

    Returns:
      ('collection/path', checkpoint shape or None when absent, model shape or
      None when absent) for every array missing on one side or of another
      shape, sorted by path within each collection.
    """
    out = []
    for collection in ("params", "batch_stats"):
        want = traverse_util.flatten_dict(abstract.get(collection, {}), sep="/")
        have = traverse_util.flatten_dict(loaded.get(collection, {}), sep="/")
        for name in sorted(set(want) | set(have)):
            have_shape = tuple(np.shape(have[name])) if name in have else None
            want_shape = tuple(want[name].shape) if name in want else None
            if have_shape != want_shape:
                out.append((f"{collection}/{name}", have_shape, want_shape))
    return out


def check_variables(abstract: dict, loaded: dict, source: str) -> None:
    """Errors naming every array where a checkpoint and the config's model differ.

    Args:
      abstract: {'params', 'batch_stats'} shapes of the config's model.
      loaded: the same from `load_variables`.
      source: the checkpoint path, for the message.
    """
    problems = []
    for where, have, want in variable_differences(abstract, loaded):
        if have is None:
            problems.append(f"{where}: in the model, not in the checkpoint")
        elif want is None:
            problems.append(f"{where}: in the checkpoint, not in the model")
        else:
            problems.append(f"{where}: checkpoint {have} vs model {want}")
    if not problems:
        return
    hint = "same arch, width, projection layers and data as the run that wrote it?"
    head = [p for p in problems if p.startswith("params/head/")]
    if head and len(head) == len(problems):
        hint = (
            "the classification head differs: the checkpoint was trained for another number "
            "of classes than the config's data has"
        )
    elif any("backbone" in p for p in problems):
        hint = "the backbone differs: the checkpoint has another arch/width than config.model"
    raise ValueError(
        f"checkpoint {source} does not match the config's model ({hint}):\n  "
        + "\n  ".join(problems[:12])
        + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
    )


def projection_layer_prefixes(layers: int) -> tuple[str, ...]:
    """`merge_variables` prefixes of projection layers 1..layers.

    models/heads.py names projection layer i (1-based) 'dense{i}' and 'bn{i}'.
    """
    return tuple(
        f"{PROJECTION_HEAD}/{module}{i}" for i in range(1, layers + 1) for module in ("dense", "bn")
    )


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + "/") for p in prefixes)


def _shapes(variables: dict, prefixes) -> dict[str, tuple]:
    """{'collection/path': shape} of the leaves of `variables` under `prefixes`."""
    out = {}
    for collection, tree in variables.items():
        for name, value in traverse_util.flatten_dict(tree, sep="/").items():
            if _under(name, prefixes):
                out[f"{collection}/{name}"] = tuple(np.shape(value))
    return out


def _layer_shapes(variables: dict, i: int) -> dict[str, tuple]:
    return _shapes(variables, projection_layer_prefixes(i)[-2:])


def num_projection_layers(variables: dict) -> int:
    """Depth of the projection head in {'params': ..., 'batch_stats': ...}."""
    depth = 0
    while _layer_shapes(variables, depth + 1):
        depth += 1
    return depth


def shared_projection_layers(target: dict, loaded: dict) -> int:
    """How many leading projection layers `loaded` can fill in `target`.

    Layer i counts when its arrays (Dense kernel, BatchNorm scale, bias and
    statistics) have the same names and shapes in both, and so do layers
    1..i-1: a deeper, shallower or narrower head shares only its first layers
    (a last layer, whose BatchNorm has no bias, never matches a hidden one).
    """
    shared = 0
    while True:
        mine = _layer_shapes(target, shared + 1)
        if not mine or mine != _layer_shapes(loaded, shared + 1):
            return shared
        shared += 1


def _layer_difference(target: dict, loaded: dict, i: int) -> str:
    """Why projection layer i of `loaded` does not fit `target`, in words."""
    mine, theirs = _layer_shapes(target, i), _layer_shapes(loaded, i)
    if not theirs:
        return "the checkpoint has no such layer"
    if not mine:
        return "the model has no such layer"
    diffs = [
        f"{name}: checkpoint {theirs.get(name, 'absent')} vs model {mine.get(name, 'absent')}"
        for name in sorted(set(mine) | set(theirs))
        if mine.get(name) != theirs.get(name)
    ]
    return "; ".join(diffs[:4])


def _expand_shared_projection(target: dict, loaded: dict, prefixes) -> list[str]:
    """`prefixes` with SHARED_PROJECTION_LAYERS replaced by the layers both heads share."""
    if SHARED_PROJECTION_LAYERS not in prefixes:
        return list(prefixes)
    shared = shared_projection_layers(target, loaded)
    ours, theirs = num_projection_layers(target), num_projection_layers(loaded)
    logging.info(
        "Init projection head: copying %d of the model's %d layers (the checkpoint has %d)",
        shared,
        ours,
        theirs,
    )
    if shared < ours:
        logging.warning(
            "Init projection head: layers %d..%d start fresh; layer %d: %s",
            shared + 1,
            ours,
            shared + 1,
            _layer_difference(target, loaded, shared + 1),
        )
    rest = [p for p in prefixes if p != SHARED_PROJECTION_LAYERS]
    return rest + list(projection_layer_prefixes(shared))


def merge_variables(target: dict, loaded: dict, prefixes: tuple[str, ...]) -> tuple[dict, list]:
    """Copies the loaded weights under `prefixes` into `target` (weights only).

    Under each prefix (e.g. 'backbone', 'projection_head/dense1'), the model
    and the checkpoint must have the same arrays with the same shapes, and the
    model must have some; anything else keeps its fresh initialisation.
    SHARED_PROJECTION_LAYERS stands for the leading projection layers both
    share (`shared_projection_layers`, possibly none), logged.

    Args:
      target: {'params': tree, 'batch_stats': tree} of the new model.
      loaded: the same from `load_variables`.
      prefixes: top-level module names (or 'a/b' path prefixes) to copy.

    Returns:
      (merged variables, list of copied 'collection/path' names).
    """
    prefixes = _expand_shared_projection(target, loaded, prefixes)
    ours, theirs = _shapes(target, prefixes), _shapes(loaded, prefixes)
    absent = [p for p in prefixes if not _shapes(target, [p])]
    missing = [f"{name}: not in the checkpoint" for name in ours if name not in theirs]
    extra = [f"{name}: not in the model" for name in theirs if name not in ours]
    mismatched = [
        f"{name}: checkpoint {theirs[name]} vs model {shape}"
        for name, shape in ours.items()
        if name in theirs and theirs[name] != shape
    ]
    if absent:
        raise ValueError(
            f"init asks for {absent}, which the model does not have (fewer projection "
            "layers than init.init_proj_layers?)"
        )
    if missing or extra or mismatched:
        lines = missing[:10] + extra[:10] + mismatched[:10]
        hint = "same arch/width/head layers?"
        if all(line.split("/")[:2] == ["params", "head"] for line in lines):
            hint = (
                "the supervised head differs: the checkpoint was trained for other classes or "
                "reads another projection layer (init_proj_layers); set config.init.init_head="
                "False to start the head fresh"
            )
        elif any("backbone/stem/" in line for line in lines):
            hint = (
                "the stems differ: SimCLR uses the CIFAR stem for images of at most 32 px and "
                "the ImageNet stem above; set config.data.image_size or config.model.cifar_stem "
                "to the checkpoint's"
            )
        raise ValueError(
            f"init checkpoint does not match the model ({hint}):\n  " + "\n  ".join(lines)
        )
    merged, copied = {}, []
    for collection, tree in target.items():
        flat = traverse_util.flatten_dict(tree, sep="/")
        src = traverse_util.flatten_dict(loaded.get(collection, {}), sep="/")
        for name, value in flat.items():
            if _under(name, prefixes):
                flat[name] = np.asarray(src[name], dtype=np.asarray(value).dtype)
                copied.append(f"{collection}/{name}")
        merged[collection] = traverse_util.unflatten_dict(flat, sep="/")
    if not copied:
        raise ValueError(f"init checkpoint has nothing under {prefixes}")
    return merged, copied
